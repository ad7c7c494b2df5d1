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
    let frame = match location {
        Location::Parquet(path) => read_parquet(ctx, path).await?,
        Location::Delta(path) => read_delta(ctx, path).await?,
    };
    check_schema(source, location.url(), &frame)?;
    Ok(frame)
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

async fn read_delta(ctx: &SessionContext, path: &str) -> Result<DataFrame, BatchError> {
    let input = |message: String| BatchError::Input { location: path.into(), message };
    let url = to_url(path)?;
    if url.scheme() == "file" && !std::path::Path::new(url.path()).join("_delta_log").exists() {
        return Err(input("not a Delta table (no _delta_log folder)".into()));
    }
    let table = deltalake::open_table(url).await.map_err(|e| input(format!("cannot open the Delta table: {e}")))?;
    table.update_datafusion_session(&ctx.state()).map_err(|e| input(e.to_string()))?;
    let provider = table.table_provider().await.map_err(|e| input(format!("cannot read the Delta table: {e}")))?;
    ctx.read_table(provider).map_err(|e| input(e.to_string()))
}

/// Every declared column must exist in the history with a compatible type.
fn check_schema(source: &Source, location: &str, frame: &DataFrame) -> Result<(), BatchError> {
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
