//! Reading a source's history: Parquet (a file, folder or glob) or a Delta table, from a local
//! path or an object_store URL, checked against the schema the definitions file declares.

use std::sync::Arc;

use datafusion::dataframe::DataFrame;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::execution::SessionState;
use datafusion::prelude::SessionContext;
use lockstep_features::{Location, Source, ValueType};

use crate::error::BatchError;

/// Turns a local path (relative or absolute) or a URL into a URL.
pub fn to_url(location: &str) -> Result<url::Url, BatchError> {
    if location.contains("://") {
        return url::Url::parse(location)
            .map_err(|e| BatchError::Input { location: location.into(), message: format!("not a valid URL: {e}") });
    }
    let path = std::path::absolute(location)
        .map_err(|e| BatchError::Input { location: location.into(), message: e.to_string() })?;
    url::Url::from_file_path(&path)
        .map_err(|_| BatchError::Input { location: location.into(), message: "not a valid path".into() })
}

/// Opens the history at `location` as a DataFrame with the source's declared columns.
pub async fn read_history(ctx: &SessionContext, source: &Source, location: &Location) -> Result<DataFrame, BatchError> {
    Ok(read_history_at(ctx, source, location, None).await?.frame)
}

/// A table opened for reading; `version` is the Delta version read (`None` for Parquet).
pub struct OpenedTable {
    pub frame: DataFrame,
    pub version: Option<deltalake::kernel::Version>,
}

/// Opens the history at `location`, a Delta history at `version` (default: the latest), checked
/// against the source's declared columns.
pub async fn read_history_at(
    ctx: &SessionContext,
    source: &Source,
    location: &Location,
    version: Option<deltalake::kernel::Version>,
) -> Result<OpenedTable, BatchError> {
    let opened = read_table(ctx, location, version).await?;
    check_schema(source, location.url(), &opened.frame)?;
    Ok(opened)
}

/// Opens any Parquet file, folder or glob, or a Delta table (at `version`, default the latest).
pub async fn read_table(
    ctx: &SessionContext,
    location: &Location,
    version: Option<deltalake::kernel::Version>,
) -> Result<OpenedTable, BatchError> {
    match location {
        Location::Parquet(path) => Ok(OpenedTable { frame: read_parquet(ctx, path).await?, version: None }),
        Location::Delta(path) => read_delta(ctx, path, version).await,
    }
}

/// A local path or URL as a [`Location`]: Delta when it holds a `_delta_log` folder (or `delta`
/// is forced), Parquet otherwise.
pub fn locate(path: &str, delta: Option<bool>) -> Location {
    let is_delta = delta.unwrap_or_else(|| match to_url(path) {
        Ok(url) if url.scheme() == "file" => std::path::Path::new(url.path()).join("_delta_log").is_dir(),
        _ => false,
    });
    if is_delta { Location::Delta(path.to_string()) } else { Location::Parquet(path.to_string()) }
}

/// Opens a Delta table's log (at `version`, default the latest), with a clear error when the
/// location holds no Delta table.
pub async fn open_delta(
    path: &str,
    version: Option<deltalake::kernel::Version>,
) -> Result<deltalake::DeltaTable, BatchError> {
    let input = |message: String| BatchError::Input { location: path.into(), message };
    let url = to_url(path)?;
    if url.scheme() == "file" && !std::path::Path::new(url.path()).join("_delta_log").exists() {
        return Err(input("not a Delta table (no _delta_log folder)".into()));
    }
    let table = match version {
        None => deltalake::open_table(url).await,
        Some(v) => deltalake::open_table_with_version(url, v).await,
    };
    table.map_err(|e| input(format!("cannot open the Delta table: {e}")))
}

async fn read_parquet(ctx: &SessionContext, path: &str) -> Result<DataFrame, BatchError> {
    let input = |message: String| BatchError::Input { location: path.into(), message };
    let local = !path.contains("://");
    if local && !path.contains(['*', '?', '[']) && !std::path::Path::new(path).exists() {
        return Err(input("no such file or folder".into()));
    }
    let url = if local {
        let absolute = std::path::absolute(path).map_err(|e| input(e.to_string()))?;
        let mut text = absolute.display().to_string();
        if absolute.is_dir() && !text.ends_with('/') {
            text.push('/');
        }
        ListingTableUrl::parse(&text).map_err(|e| input(e.to_string()))?
    } else {
        ListingTableUrl::parse(path).map_err(|e| input(e.to_string()))?
    };
    if local && !path.contains(['*', '?', '[']) {
        check_parquet_files(std::path::Path::new(path)).map_err(input)?;
    }
    let state: SessionState = ctx.state();
    let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let schema = options
        .infer_schema(&state, &url)
        .await
        .map_err(|e| input(format!("cannot read Parquet: {}", e.strip_backtrace())))?;
    let config = ListingTableConfig::new(url).with_listing_options(options).with_schema(schema);
    let table = ListingTable::try_new(config).map_err(|e| input(e.to_string()))?;
    ctx.read_table(Arc::new(table)).map_err(|e| input(e.to_string()))
}

/// Checks the framing of local Parquet files (magic bytes and footer length) before DataFusion
/// reads them, so a truncated or foreign file gets a clear message naming it.
fn check_parquet_files(path: &std::path::Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut files = Vec::new();
        let mut pending = vec![path.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
                let entry = entry.map_err(|e| e.to_string())?.path();
                if entry.is_dir() {
                    pending.push(entry);
                } else if entry.extension().is_some_and(|e| e == "parquet") {
                    files.push(entry);
                }
            }
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    for file in files {
        let corrupt = |why: &str| format!("{} is not a readable Parquet file ({why})", file.display());
        let mut handle = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let size = handle.metadata().map_err(|e| e.to_string())?.len();
        if size < 12 {
            return Err(corrupt("too short"));
        }
        let mut head = [0u8; 4];
        let mut tail = [0u8; 8];
        handle.read_exact(&mut head).map_err(|e| e.to_string())?;
        handle.seek(SeekFrom::End(-8)).map_err(|e| e.to_string())?;
        handle.read_exact(&mut tail).map_err(|e| e.to_string())?;
        if &head != b"PAR1" || &tail[4..] != b"PAR1" {
            return Err(corrupt("no PAR1 magic bytes"));
        }
        let footer = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as u64;
        if footer + 12 > size {
            return Err(corrupt("footer length exceeds the file"));
        }
    }
    Ok(())
}

async fn read_delta(
    ctx: &SessionContext,
    path: &str,
    version: Option<deltalake::kernel::Version>,
) -> Result<OpenedTable, BatchError> {
    let input = |message: String| BatchError::Input { location: path.into(), message };
    let table = open_delta(path, version).await?;
    table.update_datafusion_session(&ctx.state()).map_err(|e| input(e.to_string()))?;
    let version = table.version();
    let provider = table.table_provider().await.map_err(|e| input(format!("cannot read the Delta table: {e}")))?;
    Ok(OpenedTable { frame: ctx.read_table(provider).map_err(|e| input(e.to_string()))?, version })
}

/// Every declared column must exist in the history with a compatible type.
pub fn check_schema(source: &Source, location: &str, frame: &DataFrame) -> Result<(), BatchError> {
    let schema = frame.schema();
    for (column, declared) in &source.schema {
        let Some(field) = schema.fields().iter().find(|f| f.name() == column) else {
            let found: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(BatchError::Input {
                location: location.into(),
                message: format!(
                    "column `{column}` of source `{}` is missing; the history has: {}",
                    source.name,
                    found.join(", ")
                ),
            });
        };
        if ValueType::of_arrow(field.data_type()) != Some(*declared) {
            return Err(BatchError::Input {
                location: location.into(),
                message: format!(
                    "column `{column}` has type {} in the history, but the definitions declare {}",
                    field.data_type(),
                    declared.name()
                ),
            });
        }
    }
    Ok(())
}

/// Opens a Delta history (at `version`, default the latest) as the plain Parquet files of that
/// version, for a cluster: Delta's own scan cannot be sent to executors, a list of Parquet files
/// can. The files are pinned when the plan is built, so the cluster reads exactly that version.
/// Tables whose files alone do not hold the rows — partition columns (values in paths), column
/// mapping (renamed physical columns) or deletion vectors — are refused with an explanation.
pub async fn read_delta_files(
    ctx: &SessionContext,
    path: &str,
    version: Option<deltalake::kernel::Version>,
) -> Result<OpenedTable, BatchError> {
    let input = |message: String| BatchError::Input { location: path.into(), message };
    let table = open_delta(path, version).await?;
    let state = table.snapshot().map_err(|e| input(format!("cannot read the Delta table: {e}")))?;
    let on_cluster = "cannot be read on a cluster yet; run without --cluster";
    let metadata = state.metadata();
    if !metadata.partition_columns().is_empty() {
        return Err(input(format!(
            "the Delta table is partitioned by {} (values held in paths, not files) and {on_cluster}",
            metadata.partition_columns().join(", ")
        )));
    }
    if metadata.configuration().get("delta.columnMapping.mode").is_some_and(|mode| mode != "none") {
        return Err(input(format!("the Delta table uses column mapping and {on_cluster}")));
    }
    let mut urls = Vec::new();
    for file in state.log_data().iter() {
        if file.deletion_vector_descriptor().is_some() {
            return Err(input(format!("the Delta table has deletion vectors ({}) and {on_cluster}", file.path())));
        }
        let uri = table.log_store().to_uri(&file.object_store_path());
        urls.push(ListingTableUrl::parse(&uri).map_err(|e| input(format!("{uri}: {e}")))?);
    }
    if urls.is_empty() {
        return Err(input(format!("the Delta table has no data files at version {}", state.version())));
    }
    let schema = state.snapshot().arrow_schema();
    let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension("");
    let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(schema);
    let table_provider = ListingTable::try_new(config).map_err(|e| input(e.to_string()))?;
    let frame = ctx.read_table(Arc::new(table_provider)).map_err(|e| input(e.to_string()))?;
    Ok(OpenedTable { frame, version: Some(state.version()) })
}
