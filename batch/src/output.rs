//! Writing feature rows: one Parquet file, a folder of Parquet files, or a Delta table.
//!
//! No partial output ever becomes visible. Parquet is written under a temporary name beside the
//! target and renamed into place when complete; a Delta table changes in one commit, and a failed
//! job commits nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::config::{ParquetColumnOptions, TableParquetOptions};
use datafusion::common::runtime::SpawnedTask;
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

/// Parquet settings for feature rows of `schema`: Snappy (fast, read everywhere); dictionaries
/// only for key columns; window bounds and integer and timestamp values delta-encoded (bounds
/// advance by `every` within a key, counts repeat from one window to the next). Statistics are
/// kept for the keys and window bounds, which readers prune on (a key, a time range); computing
/// them for every aggregate value was a tenth of the writer's time.
fn parquet_options(schema: &Schema, keys: &[String]) -> TableParquetOptions {
    let mut options = TableParquetOptions::default();
    options.global.compression = Some("snappy".into());
    // Values go to the column encoders a batch at a time rather than in slices of 1024.
    options.global.write_batch_size = 8192;
    options.global.dictionary_enabled = Some(false);
    for field in schema.fields() {
        let name = field.name();
        let column = if keys.contains(name) {
            ParquetColumnOptions { dictionary_enabled: Some(true), ..ParquetColumnOptions::default() }
        } else if name == "window_start" || name == "window_end" {
            ParquetColumnOptions { encoding: Some("delta_binary_packed".into()), ..ParquetColumnOptions::default() }
        } else {
            let delta = matches!(field.data_type(), DataType::Int64 | DataType::Timestamp(..));
            ParquetColumnOptions {
                encoding: delta.then(|| "delta_binary_packed".into()),
                statistics_enabled: Some("none".into()),
                ..ParquetColumnOptions::default()
            }
        };
        options.column_specific_options.insert(name.clone(), column);
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
    let staged = PathBuf::from(staging_text.trim_end_matches('/'));
    let result = if !keys.is_empty() && crate::rows_parquet::supports(frame.schema().as_arrow()) {
        let file = if single_file { staged.clone() } else { staged.join("part-00000.parquet") };
        write_rows(frame, &file, keys).await
    } else {
        let options = DataFrameWriteOptions::new().with_single_file_output(single_file);
        let parquet = parquet_options(frame.schema().as_arrow(), keys);
        frame.write_parquet(&staging_text, options, Some(parquet)).await.map(|_| ()).map_err(BatchError::from)
    };
    if let Err(error) = result {
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir_all(&staged);
        return Err(error);
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

/// Runs `frame` (feature rows, sorted by key and window) and writes its rows to the Parquet file
/// `path` with [`crate::rows_parquet::RowsWriter`]. Rows are encoded as they arrive, by a task on
/// the runtime that also runs the plan: the plan's other tasks compute the rows that follow
/// meanwhile, and the batches are freed by the threads that allocated them, so the memory they
/// return is at hand for the next ones rather than fresh memory faulted in.
async fn write_rows(frame: DataFrame, path: &Path, keys: &[String]) -> Result<(), BatchError> {
    use futures::StreamExt;
    let failed = {
        let location = path.display().to_string();
        move |message: String| BatchError::Output { location: location.clone(), message }
    };
    let schema = Arc::new(frame.schema().as_arrow().clone());
    let file = std::fs::File::create(path).map_err(|e| failed(e.to_string()))?;
    let mut writer =
        crate::rows_parquet::RowsWriter::try_new(std::io::BufWriter::with_capacity(1 << 20, file), schema, keys)
            .map_err(|e| failed(e.to_string()))?;
    let encode = failed.clone();
    // A `SpawnedTask` aborts when dropped: a job given up stops computing and writing.
    let task = SpawnedTask::spawn(async move {
        let mut stream = frame.execute_stream().await?;
        while let Some(batch) = stream.next().await {
            writer.write(batch?).map_err(|e| encode(e.to_string()))?;
        }
        let mut out = writer.finish().map_err(|e| encode(e.to_string()))?;
        out.flush().map_err(|e| encode(e.to_string()))
    });
    task.join().await.map_err(|e| failed(format!("the Parquet writer failed: {e}")))?
}

/// The rows of `frame`, in its order, as a plan Delta's writer cannot reorder. Given the plan
/// itself, the writer's physical optimizer drops a sort nothing above it requires, and the files
/// would each span the whole time range; given one ordered stream, each file holds a narrow
/// span of `window_start`.
///
/// With `cluster`, the rows come from a cluster: they are counted as windows (its window stage
/// counted on the executors) and checked to arrive in strictly increasing order of the sort
/// columns, which also means no (key, window) twice; see [`ClusterRows`].
pub async fn ordered_source(
    frame: DataFrame,
    cluster: Option<ClusterRows>,
) -> Result<datafusion::logical_expr::LogicalPlan, BatchError> {
    use datafusion::catalog::streaming::StreamingTable;
    use datafusion::datasource::provider_as_source;
    use datafusion::logical_expr::LogicalPlanBuilder;
    let schema = Arc::new(frame.schema().as_arrow().clone());
    let mut stream = frame.execute_stream().await?;
    if let Some(mut cluster) = cluster {
        use futures::StreamExt;
        let checked = stream.map(move |batch| cluster.check(batch?));
        stream = Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(schema.clone(), checked));
    }
    let partition = OneStream { schema: schema.clone(), stream: std::sync::Mutex::new(Some(stream)) };
    let table = StreamingTable::try_new(schema, vec![Arc::new(partition)])?;
    Ok(LogicalPlanBuilder::scan("lockstep_rows", provider_as_source(Arc::new(table)), None)?.build()?)
}

/// The check on rows a cluster returns. A job's rows are unique per (key, window) and sorted, so
/// each row must sort strictly after the one before. Ballista can break this when it recomputes
/// a stage after losing an executor (a rolled-back stage's finished tasks are read twice); the
/// check turns that into an error naming [`crate::cluster::INCONSISTENT`] before anything is
/// committed, and the job runs again.
pub struct ClusterRows {
    counters: Arc<crate::StageCounters>,
    columns: Vec<usize>,
    converter: arrow::row::RowConverter,
    last: Option<arrow::row::OwnedRow>,
}

impl ClusterRows {
    /// Rows of `schema` sorted by `columns` (ascending, nulls first), counted into `counters`.
    pub fn new(
        schema: &arrow::datatypes::Schema,
        columns: Vec<usize>,
        counters: Arc<crate::StageCounters>,
    ) -> Result<Self, BatchError> {
        let fields = columns.iter().map(|&c| arrow::row::SortField::new(schema.field(c).data_type().clone())).collect();
        Ok(ClusterRows { counters, columns, converter: arrow::row::RowConverter::new(fields)?, last: None })
    }

    fn check(&mut self, batch: arrow::array::RecordBatch) -> datafusion::error::Result<arrow::array::RecordBatch> {
        let columns: Vec<_> = self.columns.iter().map(|&c| batch.column(c).clone()).collect();
        let rows = self.converter.convert_columns(&columns)?;
        for i in 0..rows.num_rows() {
            let previous = if i == 0 { self.last.as_ref().map(|r| r.row()) } else { Some(rows.row(i - 1)) };
            if previous.is_some_and(|p| p >= rows.row(i)) {
                let values: Vec<String> = columns
                    .iter()
                    .map(|c| arrow::util::display::array_value_to_string(c, i).unwrap_or_default())
                    .collect();
                return Err(datafusion::error::DataFusionError::Execution(format!(
                    "{}: ({}) arrived twice or out of order, after {} rows",
                    crate::cluster::INCONSISTENT,
                    values.join(", "),
                    self.counters.windows.load(std::sync::atomic::Ordering::Relaxed) + i as u64
                )));
            }
        }
        if rows.num_rows() > 0 {
            self.last = Some(rows.row(rows.num_rows() - 1).owned());
        }
        self.counters.windows.fetch_add(batch.num_rows() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(batch)
    }
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
    let plan = ordered_source(frame, None).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(keys: &[Option<&str>], starts: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, true),
            Field::new("window_start", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(keys.to_vec())), Arc::new(Int64Array::from(starts.to_vec()))],
        )
        .unwrap()
    }

    #[test]
    fn cluster_rows_must_strictly_increase_across_batches() {
        let first = batch(&[None, Some("a"), Some("a")], &[5, 1, 2]);
        let schema = first.schema();
        let counters = Arc::new(crate::StageCounters::default());
        let mut check = ClusterRows::new(&schema, vec![0, 1], counters.clone()).unwrap();
        check.check(first).unwrap();
        check.check(batch(&[Some("a"), Some("b")], &[3, 0])).unwrap();
        assert_eq!(counters.windows.load(std::sync::atomic::Ordering::Relaxed), 5);
        // The last row again, at the start of the next batch: a repeated (key, window).
        let error = check.check(batch(&[Some("b"), Some("c")], &[0, 0])).unwrap_err().to_string();
        assert!(error.contains(crate::cluster::INCONSISTENT) && error.contains("(b, 0)"), "{error}");
        assert!(crate::cluster::inconsistent(&error));

        // Out of order within a batch.
        let mut check = ClusterRows::new(&schema, vec![0, 1], counters).unwrap();
        let error = check.check(batch(&[Some("a"), Some("a")], &[2, 1])).unwrap_err().to_string();
        assert!(error.contains("(a, 1) arrived twice or out of order"), "{error}");
        // By time first: (window_start, key).
        let counters = Arc::new(crate::StageCounters::default());
        let mut by_time = ClusterRows::new(&schema, vec![1, 0], counters).unwrap();
        by_time.check(batch(&[Some("b"), Some("a"), Some("a")], &[1, 2, 3])).unwrap();
    }
}
