//! Point-in-time training sets (SPEC §6): for each label (key, time `t`) the value of each
//! feature set exactly as the online store would have served it at `t`.
//!
//! - Sliding and tumbling windows: the window ending at
//!   `E = floor((t − serving_delay − offset) / every) · every + offset`, i.e. `[E − size, E)`.
//!   Only the windows some label needs are evaluated: the batch job walks every key's events
//!   once, but writes just the wanted windows ([`WantedWindows`]), and reads only events between
//!   the earliest wanted window and the latest label.
//! - Session windows: the latest session of the key with `window_end + serving_delay <= t`.
//!
//! No event at or after `t − serving_delay` can reach a label. A label whose window has no row
//! gets 0 for counts and null for every other aggregate. Output: the label columns unchanged,
//! then `<feature set>__<aggregate>` columns, one row per label, in the labels' order.

use datafusion::common::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, UInt32Array};
use arrow::compute::{cast, concat_batches, take};
use arrow::datatypes::{DataType, Field, Schema, TimestampMillisecondType};
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::prelude::{CsvReadOptions, SessionContext};
use lockstep_features::window::{serving_cutoff, session_served};
use lockstep_features::{CompiledFeature, Location, Window};

use crate::exec::WantedWindows;
use crate::{BatchError, BatchJob, OutputTarget, Ranges, SessionLimits};

/// Where the labels are and how to read them.
#[derive(Debug, Clone)]
pub struct TrainingOptions {
    /// A Parquet file or folder, a Delta table, or a `.csv` file with a header.
    pub labels: String,
    /// The labels' time column (default: their only timestamp column).
    pub label_time: Option<String>,
    /// The history (default: each source's `history`).
    pub history: Option<Location>,
    pub limits: SessionLimits,
}

/// What a training-set run did.
#[derive(Debug, Clone)]
pub struct TrainingSummary {
    pub labels: usize,
    /// Per feature set: labels that found a window (the rest got the defaults).
    pub found: Vec<(String, usize)>,
    pub elapsed: Duration,
    pub output: String,
}

/// Builds the training set of `features` for the labels and writes it to `target`.
pub async fn training_set(
    features: &[CompiledFeature],
    options: &TrainingOptions,
    target: &OutputTarget,
) -> Result<TrainingSummary, BatchError> {
    let started = Instant::now();
    let labels = read_labels(&options.labels, &options.limits).await?;
    let time_column = label_time(&labels, options)?;
    let times = millis(labels.column_by_name(&time_column).expect("checked"), &options.labels, &time_column)?;
    let mut fields: Vec<Field> = labels.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns: Vec<ArrayRef> = labels.columns().to_vec();
    let mut found = Vec::new();
    for feature in features {
        let (columns_of, with_window) = point_in_time(feature, &labels, &times, options).await?;
        found.push((feature.feature.name.clone(), with_window));
        for (field, values) in columns_of {
            let name = format!("{}__{}", feature.feature.name, field.name());
            if fields.iter().any(|f| f.name() == &name) {
                return Err(BatchError::Config(format!("the labels already have a column `{name}`")));
            }
            fields.push(field.with_name(name));
            columns.push(values);
        }
    }
    let schema = Arc::new(Schema::new(fields));
    let out = RecordBatch::try_new(schema.clone(), columns)?;
    let slices: Vec<RecordBatch> =
        (0..out.num_rows()).step_by(65_536).map(|at| out.slice(at, 65_536.min(out.num_rows() - at))).collect();
    let ctx = SessionContext::new_with_state(crate::plan::session_state(&SessionLimits {
        partitions: 1,
        ..options.limits.clone()
    })?);
    let table = datafusion::datasource::MemTable::try_new(schema, vec![slices])?;
    let frame = ctx.read_table(Arc::new(table))?;
    let mut metadata = serde_json::Map::new();
    let names: Vec<&str> = features.iter().map(|f| f.feature.name.as_str()).collect();
    metadata.insert("lockstep.training_set".into(), names.join(",").into());
    metadata.insert("lockstep.labels".into(), options.labels.clone().into());
    target.write(&ctx.state(), frame, &[], metadata).await?;
    Ok(TrainingSummary { labels: out.num_rows(), found, elapsed: started.elapsed(), output: target.url().to_string() })
}

/// The value of every aggregate of `feature` for each label (`keys` of `labels`, at `times`):
/// one column per aggregate (counts 0 where a label has no window), and how many labels found a
/// window.
pub async fn point_in_time(
    feature: &CompiledFeature,
    labels: &RecordBatch,
    times: &[Option<i64>],
    options: &TrainingOptions,
) -> Result<(Vec<(Field, ArrayRef)>, usize), BatchError> {
    let (indices, rows) = match_windows(feature, labels, times, options).await?;
    let schema = feature.output_schema();
    let first_value = feature.feature.key.len() + 2;
    let mut out = Vec::new();
    for (i, field) in schema.fields().iter().enumerate().skip(first_value) {
        let values = take(rows.column(i).as_ref(), &indices, None)?;
        let values: ArrayRef = if field.is_nullable() {
            values
        } else {
            // Counts: 0 where the label found no window.
            let counts = values.as_primitive::<arrow::datatypes::Int64Type>();
            Arc::new(counts.iter().map(|v| Some(v.unwrap_or(0))).collect::<Int64Array>())
        };
        out.push((field.as_ref().clone(), values));
    }
    Ok((out, indices.len() - indices.null_count()))
}

/// The labels, whole and in file order (one partition).
async fn read_labels(url: &str, limits: &SessionLimits) -> Result<RecordBatch, BatchError> {
    let ctx =
        SessionContext::new_with_state(crate::plan::session_state(&SessionLimits { partitions: 1, ..limits.clone() })?);
    let frame = if url.ends_with(".csv") {
        if !url.contains("://") && !std::path::Path::new(url).exists() {
            return Err(BatchError::Input { location: url.into(), message: "no such file".into() });
        }
        ctx.read_csv(url, CsvReadOptions::new()).await.map_err(|e| BatchError::Input {
            location: url.into(),
            message: format!("cannot read the CSV labels: {}", e.strip_backtrace()),
        })?
    } else {
        crate::source::read_table(&ctx, &crate::source::locate(url, None), None).await?.frame
    };
    let schema = Arc::new(frame.schema().as_arrow().clone());
    let batches = frame.collect().await?;
    Ok(concat_batches(&schema, &batches)?)
}

/// The labels' time column: the one named, or their only timestamp column.
fn label_time(labels: &RecordBatch, options: &TrainingOptions) -> Result<String, BatchError> {
    let schema = labels.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    if let Some(name) = &options.label_time {
        if !names.contains(&name.as_str()) {
            return Err(BatchError::Input {
                location: options.labels.clone(),
                message: format!("no column `{name}` (--label-time); the labels have: {}", names.join(", ")),
            });
        }
        return Ok(name.clone());
    }
    let stamps: Vec<&str> = schema
        .fields()
        .iter()
        .filter(|f| matches!(f.data_type(), DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64))
        .map(|f| f.name().as_str())
        .collect();
    match stamps.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(BatchError::Input {
            location: options.labels.clone(),
            message: format!(
                "no timestamp column; name the label time with --label-time (the labels have: {})",
                names.join(", ")
            ),
        }),
        many => Err(BatchError::Input {
            location: options.labels.clone(),
            message: format!("several timestamp columns ({}); pick one with --label-time", many.join(", ")),
        }),
    }
}

/// A time column in epoch milliseconds (strings are read as RFC 3339).
fn millis(column: &ArrayRef, location: &str, name: &str) -> Result<Vec<Option<i64>>, BatchError> {
    let times = cast(column, &lockstep_features::value::timestamp_type()).map_err(|e| BatchError::Input {
        location: location.into(),
        message: format!("column `{name}` is not a time: {e}"),
    })?;
    let times = times.as_primitive::<TimestampMillisecondType>();
    Ok((0..times.len()).map(|i| times.is_valid(i).then(|| times.value(i))).collect())
}

/// The labels' keys in the row format of `feature`'s key columns.
fn label_keys(
    feature: &CompiledFeature,
    labels: &RecordBatch,
    location: &str,
) -> Result<(RowConverter, Rows), BatchError> {
    let schema = feature.output_schema();
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (i, key) in feature.feature.key.iter().enumerate() {
        let column = labels.column_by_name(key).ok_or_else(|| BatchError::Input {
            location: location.into(),
            message: format!(
                "feature set `{}` is keyed by `{key}`, but the labels have no such column",
                feature.feature.name
            ),
        })?;
        let data_type = schema.field(i).data_type();
        columns.push(cast(column, data_type).map_err(|e| BatchError::Input {
            location: location.into(),
            message: format!("key column `{key}` cannot be read as {data_type}: {e}"),
        })?);
        fields.push(SortField::new(data_type.clone()));
    }
    let converter = RowConverter::new(fields)?;
    let rows = converter.convert_columns(&columns)?;
    Ok((converter, rows))
}

/// For each label, the row of `feature`'s windows it takes (null: none), and those rows.
async fn match_windows(
    feature: &CompiledFeature,
    labels: &RecordBatch,
    times: &[Option<i64>],
    options: &TrainingOptions,
) -> Result<(UInt32Array, RecordBatch), BatchError> {
    let (converter, keys) = label_keys(feature, labels, &options.labels)?;
    let delay = feature.feature.serving_delay;
    let job = BatchJob::new(feature.clone(), options.history.clone())?.with_limits(options.limits.clone());
    let schema = feature.output_schema();
    let nkeys = feature.feature.key.len();
    match feature.window() {
        Window::Session { .. } => {
            // Sessions are few: compute them all, then take per label the latest one that had
            // ended `serving_delay` before it.
            let latest = times.iter().flatten().max().copied().unwrap_or(i64::MIN);
            let job = job.with_ranges(Ranges { events: vec![(i64::MIN, latest)], windows: vec![(i64::MIN, i64::MAX)] });
            let rows = concat_batches(&schema, &job.collect_unordered().await?)?;
            let row_keys = converter.convert_columns(&rows.columns()[..nkeys])?;
            let ends = rows.column(nkeys + 1).as_primitive::<TimestampMillisecondType>();
            let mut by_key: HashMap<&[u8], Vec<(i64, u32)>> = HashMap::new();
            for i in 0..rows.num_rows() {
                by_key.entry(row_keys.row(i).data()).or_default().push((ends.value(i), i as u32));
            }
            for sessions in by_key.values_mut() {
                sessions.sort_unstable();
            }
            let indices: UInt32Array = (0..labels.num_rows())
                .map(|l| {
                    let cutoff = serving_cutoff(times[l]?, delay)?;
                    let sessions = by_key.get(keys.row(l).data())?;
                    let before = sessions.partition_point(|(end, _)| session_served(*end, cutoff));
                    before.checked_sub(1).map(|i| sessions[i].1)
                })
                .collect();
            Ok((indices, rows))
        }
        window => {
            let panes = window.panes().expect("sliding windows have panes");
            let start_of = |t: i64| -> Option<i64> { Some(panes.served_window(serving_cutoff(t, delay)?).0) };
            let (mut low, mut high) = (i64::MAX, i64::MIN);
            let mut pairs = Vec::with_capacity(times.len());
            for (l, time) in times.iter().enumerate() {
                if let Some(start) = time.and_then(start_of) {
                    pairs.push((keys.row(l).data(), start));
                    low = low.min(start);
                    high = high.max(start);
                }
            }
            let wanted = WantedWindows::from_pairs(pairs);
            let rows = if low > high {
                RecordBatch::new_empty(schema.clone())
            } else {
                let end = panes.window_end(panes.pane_of(high));
                let job = job
                    .with_wanted(Arc::new(wanted))
                    .with_ranges(Ranges { events: vec![(low, end)], windows: vec![(low, high + 1)] });
                concat_batches(&schema, &job.collect_unordered().await?)?
            };
            let row_keys = converter.convert_columns(&rows.columns()[..nkeys])?;
            let starts = rows.column(nkeys).as_primitive::<TimestampMillisecondType>();
            let index: HashMap<(&[u8], i64), u32> =
                (0..rows.num_rows()).map(|i| ((row_keys.row(i).data(), starts.value(i)), i as u32)).collect();
            let indices: UInt32Array = (0..labels.num_rows())
                .map(|l| {
                    let start = times[l].and_then(start_of)?;
                    index.get(&(keys.row(l).data(), start)).copied()
                })
                .collect();
            Ok((indices, rows))
        }
    }
}
