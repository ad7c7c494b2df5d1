//! Writing feature rows: one Parquet file, a folder of Parquet files, or a Delta table.
//!
//! No partial output ever becomes visible. Parquet is written under a temporary name beside the
//! target and renamed into place when complete; a Delta table changes in one commit, and a failed
//! job commits nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::common::config::{ParquetColumnOptions, TableParquetOptions};
use datafusion::dataframe::{DataFrame, DataFrameWriteOptions};
use datafusion::execution::SessionState;
use deltalake::protocol::SaveMode;
use lockstep_features::Location;

use crate::error::BatchError;
use crate::source::to_url;

/// Target size of the files written to a Delta table. Rows go to Delta ordered by
/// `window_start`, so each file covers a narrow time range and a backfill's `replaceWhere`
/// rewrites little beside the windows it replaces.
pub const DELTA_FILE_SIZE: u64 = 16 << 20;

/// Where a job writes, resolved from `--out`, `--format` and the feature's `output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    /// A single Parquet file (the URL ends in `.parquet`).
    ParquetFile(String),
    /// A folder of Parquet files.
    ParquetFolder(String),
    Delta(String),
}

/// A forced output format (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Parquet,
    Delta,
}

impl OutputTarget {
    /// Resolves the target: an explicit URL wins over the feature's `output`; a URL ending in
    /// `.parquet` is one file; otherwise `format`, else the feature's output kind, else Delta.
    pub fn resolve(
        out: Option<&str>,
        format: Option<OutputFormat>,
        configured: Option<&Location>,
    ) -> Result<Self, BatchError> {
        let (url, kind) = match (out, configured) {
            (Some(url), configured) => (
                url.to_string(),
                format.or(configured.map(|c| match c {
                    Location::Parquet(_) => OutputFormat::Parquet,
                    Location::Delta(_) => OutputFormat::Delta,
                })),
            ),
            (None, Some(location)) => (
                location.url().to_string(),
                format.or(Some(match location {
                    Location::Parquet(_) => OutputFormat::Parquet,
                    Location::Delta(_) => OutputFormat::Delta,
                })),
            ),
            (None, None) => {
                return Err(BatchError::Config(
                    "no output: pass --out URL, or give the feature set an `output:` with `delta:` or `parquet:`"
                        .into(),
                ));
            }
        };
        if url.ends_with(".parquet") && format != Some(OutputFormat::Delta) {
            return Ok(OutputTarget::ParquetFile(url));
        }
        Ok(match kind.unwrap_or(OutputFormat::Delta) {
            OutputFormat::Parquet => OutputTarget::ParquetFolder(url),
            OutputFormat::Delta => OutputTarget::Delta(url),
        })
    }

    /// The URL or path.
    pub fn url(&self) -> &str {
        match self {
            OutputTarget::ParquetFile(u) | OutputTarget::ParquetFolder(u) | OutputTarget::Delta(u) => u,
        }
    }

    /// Runs `frame` and writes its rows here, replacing what was there. `keys` name the key
    /// columns (dictionary-encoded in Parquet; window bounds and values are mostly distinct).
    pub async fn write(
        &self,
        state: &SessionState,
        frame: DataFrame,
        keys: &[String],
        commit_metadata: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), BatchError> {
        match self {
            OutputTarget::ParquetFile(url) => write_parquet(frame, url, true, keys).await,
            OutputTarget::ParquetFolder(url) => write_parquet(frame, url, false, keys).await,
            OutputTarget::Delta(url) => write_delta(state, frame, url, commit_metadata).await,
        }
    }
}

fn local_path(url: &str) -> Result<PathBuf, BatchError> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Ok(PathBuf::from(rest));
    }
    if url.contains("://") {
        return Err(BatchError::Output {
            location: url.into(),
            message: "Parquet output goes to a local path or file:// URL; write a Delta table for object stores (its commit is atomic)".into(),
        });
    }
    std::path::absolute(url).map_err(|e| BatchError::Output { location: url.into(), message: e.to_string() })
}

/// A temporary sibling of `target`, unique to this process.
fn staging_path(target: &Path) -> PathBuf {
    let name = target.file_name().map_or_else(|| "output".into(), |n| n.to_string_lossy().to_string());
    target.with_file_name(format!(".{name}.lockstep-{}.tmp", std::process::id()))
}

/// Parquet settings for feature rows: Snappy (fast, read everywhere); dictionaries only for key
/// columns; window bounds delta-encoded (they advance by `every` within a key).
fn parquet_options(keys: &[String]) -> TableParquetOptions {
    let mut options = TableParquetOptions::default();
    options.global.compression = Some("snappy".into());
    options.global.dictionary_enabled = Some(false);
    for key in keys {
        let column = ParquetColumnOptions { dictionary_enabled: Some(true), ..ParquetColumnOptions::default() };
        options.column_specific_options.insert(key.clone(), column);
    }
    for bound in ["window_start", "window_end"] {
        let column =
            ParquetColumnOptions { encoding: Some("delta_binary_packed".into()), ..ParquetColumnOptions::default() };
        options.column_specific_options.insert(bound.into(), column);
    }
    options
}

async fn write_parquet(frame: DataFrame, url: &str, single_file: bool, keys: &[String]) -> Result<(), BatchError> {
    let target = local_path(url)?;
    let failed = |message: String| BatchError::Output { location: url.into(), message };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| failed(e.to_string()))?;
    }
    let staging = staging_path(&target);
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_file(&staging);
    let staging_text = if single_file {
        format!("{}.parquet", staging.display())
    } else {
        std::fs::create_dir_all(&staging).map_err(|e| failed(e.to_string()))?;
        format!("{}/", staging.display())
    };
    let options = DataFrameWriteOptions::new().with_single_file_output(single_file);
    let result = frame.write_parquet(&staging_text, options, Some(parquet_options(keys))).await;
    let staged = PathBuf::from(staging_text.trim_end_matches('/'));
    if let Err(error) = result {
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir_all(&staged);
        return Err(BatchError::from(error));
    }
    if single_file {
        std::fs::rename(&staged, &target).map_err(|e| failed(e.to_string()))?;
    } else {
        // Swap folders: the old output stays whole until the new one is complete.
        let previous = target.with_file_name(format!(
            ".{}.lockstep-old",
            target.file_name().map_or_else(String::new, |n| n.to_string_lossy().to_string())
        ));
        let _ = std::fs::remove_dir_all(&previous);
        if target.exists() {
            std::fs::rename(&target, &previous).map_err(|e| failed(e.to_string()))?;
        }
        std::fs::rename(&staged, &target).map_err(|e| failed(e.to_string()))?;
        let _ = std::fs::remove_dir_all(&previous);
    }
    Ok(())
}

/// The rows of `frame`, in its order, as a plan Delta's writer cannot reorder. Given the plan
/// itself, the writer's physical optimizer drops a sort nothing above it requires, and the files
/// would each span the whole time range; given one ordered stream, each file holds a narrow
/// span of `window_start`.
pub async fn ordered_source(frame: DataFrame) -> Result<datafusion::logical_expr::LogicalPlan, BatchError> {
    use datafusion::catalog::streaming::StreamingTable;
    use datafusion::datasource::provider_as_source;
    use datafusion::logical_expr::LogicalPlanBuilder;
    let schema = Arc::new(frame.schema().as_arrow().clone());
    let stream = frame.execute_stream().await?;
    let partition = OneStream { schema: schema.clone(), stream: std::sync::Mutex::new(Some(stream)) };
    let table = StreamingTable::try_new(schema, vec![Arc::new(partition)])?;
    Ok(LogicalPlanBuilder::scan("lockstep_rows", provider_as_source(Arc::new(table)), None)?.build()?)
}

/// A partition that hands out one already-running stream, once.
struct OneStream {
    schema: arrow::datatypes::SchemaRef,
    stream: std::sync::Mutex<Option<datafusion::execution::SendableRecordBatchStream>>,
}

impl std::fmt::Debug for OneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OneStream")
    }
}

impl datafusion::physical_plan::streaming::PartitionStream for OneStream {
    fn schema(&self) -> &arrow::datatypes::SchemaRef {
        &self.schema
    }

    fn execute(
        &self,
        _ctx: Arc<datafusion::execution::TaskContext>,
    ) -> datafusion::execution::SendableRecordBatchStream {
        use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
        match self.stream.lock().expect("not poisoned").take() {
            Some(stream) => stream,
            None => {
                let error = datafusion::error::DataFusionError::Internal("the rows were already written".into());
                Box::pin(RecordBatchStreamAdapter::new(
                    self.schema.clone(),
                    futures::stream::once(async move { Err(error) }),
                ))
            }
        }
    }
}

async fn write_delta(
    state: &SessionState,
    frame: DataFrame,
    url: &str,
    metadata: serde_json::Map<String, serde_json::Value>,
) -> Result<(), BatchError> {
    let failed = |message: String| BatchError::Output { location: url.into(), message };
    let table_url = to_url(url)?;
    if table_url.scheme() == "file" {
        std::fs::create_dir_all(table_url.path()).map_err(|e| failed(e.to_string()))?;
    }
    let table = deltalake::DeltaTable::try_from_url(table_url).await.map_err(|e| failed(e.to_string()))?;
    let plan = ordered_source(frame).await?;
    table
        .write(Vec::new())
        .with_input_plan(plan)
        .with_session_state(Arc::new(state.clone()))
        .with_save_mode(SaveMode::Overwrite)
        .with_schema_mode(deltalake::operations::write::SchemaMode::Overwrite)
        .with_target_file_size(std::num::NonZeroU64::new(DELTA_FILE_SIZE))
        .with_commit_properties(deltalake::kernel::transaction::CommitProperties::default().with_metadata(metadata))
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(())
}
