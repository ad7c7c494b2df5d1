//! The final value of every window a bounded run fired (`--out`), and the too-late events
//! (`--late-out`), gathered from the engine's effects.
//!
//! A window may fire more than once (late updates) or be retracted (sessions merged by a late
//! event); only its last change counts. The engine fires a window on time at most once, and
//! refires and retractions are rare, so only windows with a refire or retraction are remembered
//! by key (a late event can also give a window its first row, as a refire); every other row is
//! kept as fired.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, RecordBatch, StringBuilder, TimestampMillisecondBuilder, UInt32Array,
};
use arrow::compute::{filter_record_batch, take};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use datafusion::common::Result;
use lockstep_features::value::timestamp_type;

use crate::engine::{ChangeKind, Effects};

/// What the last change of a window that changed more than once was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Last {
    Row { batch: usize, row: usize },
    Retracted,
}

/// Final windows of a bounded run; see the module documentation.
pub struct FinalWindows {
    schema: SchemaRef,
    keys: usize,
    /// Whether the rows are kept, or only counted.
    keep: bool,
    batches: Vec<RecordBatch>,
    last: HashMap<(Box<[u8]>, i64), Last>,
}

impl FinalWindows {
    /// Final windows of rows of `schema` (the first `keys` columns are the key). Without
    /// `keep`, nothing is gathered: a run without `--out` holds no window in memory.
    pub fn new(schema: SchemaRef, keys: usize, keep: bool) -> Self {
        FinalWindows { schema, keys, keep, batches: Vec::new(), last: HashMap::new() }
    }

    /// Takes the fired rows and retractions of one engine call.
    pub fn add(&mut self, effects: &Effects) {
        if !self.keep {
            return;
        }
        let batch = self.batches.len();
        for change in &effects.changes {
            // A window fires on time at most once, and never after a refire (the watermark had
            // passed it): if nothing else changes it, that row is its last.
            if change.kind == ChangeKind::Fire {
                continue;
            }
            let window = (Box::<[u8]>::from(change.key.row().as_ref()), change.start);
            let last = match change.row {
                Some(row) => Last::Row { batch, row },
                None => Last::Retracted,
            };
            self.last.insert(window, last);
        }
        if let Some(rows) = &effects.rows {
            self.batches.push(rows.clone());
        }
    }

    /// The final rows: each window's last value, retracted windows left out (none unless kept).
    pub fn finish(self) -> Result<Vec<RecordBatch>> {
        if self.last.is_empty() {
            return Ok(self.batches);
        }
        let fields: Vec<SortField> =
            self.schema.fields()[..self.keys].iter().map(|f| SortField::new(f.data_type().clone())).collect();
        let converter = RowConverter::new(fields)?;
        let mut out = Vec::with_capacity(self.batches.len());
        for (b, batch) in self.batches.into_iter().enumerate() {
            let keys = converter.convert_columns(&batch.columns()[..self.keys])?;
            let starts = batch.column(self.keys).as_any().downcast_ref::<arrow::array::TimestampMillisecondArray>();
            let Some(starts) = starts else { return Ok(vec![batch]) };
            let keep: BooleanArray = (0..batch.num_rows())
                .map(|row| {
                    let window = (Box::<[u8]>::from(keys.row(row).as_ref()), starts.value(row));
                    Some(self.last.get(&window).is_none_or(|last| *last == Last::Row { batch: b, row }))
                })
                .collect();
            out.push(filter_record_batch(&batch, &keep)?);
        }
        Ok(out)
    }
}

/// The columns a too-late event gets besides its source columns.
pub const LATE_COLUMNS: [&str; 5] =
    ["late_event_time", "late_window_start", "late_window_end", "late_watermark", "late_reason"];

/// The schema of too-late rows: the source columns, then [`LATE_COLUMNS`].
pub fn late_schema(source: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = source.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(LATE_COLUMNS[0], timestamp_type(), false));
    fields.push(Field::new(LATE_COLUMNS[1], timestamp_type(), true));
    fields.push(Field::new(LATE_COLUMNS[2], timestamp_type(), true));
    fields.push(Field::new(LATE_COLUMNS[3], timestamp_type(), false));
    fields.push(Field::new(LATE_COLUMNS[4], arrow::datatypes::DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

/// Too-late rows for the events of `effects`: one row per (event, window it was too late for),
/// or one row with null window bounds for a session event; `late_event_time` is the event time
/// in milliseconds. `source` is the batch the engine
/// processed, in source columns.
pub fn late_rows(schema: &SchemaRef, source: &RecordBatch, effects: &Effects) -> Result<Option<RecordBatch>> {
    if effects.late.is_empty() {
        return Ok(None);
    }
    let mut indices = Vec::new();
    let mut times = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut starts = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut ends = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut watermarks = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut reasons = StringBuilder::new();
    for late in &effects.late {
        let windows: Vec<Option<(i64, i64)>> =
            if late.windows.is_empty() { vec![None] } else { late.windows.iter().copied().map(Some).collect() };
        for window in windows {
            indices.push(late.row as u32);
            times.append_value(late.event_time);
            starts.append_option(window.map(|w| w.0));
            ends.append_option(window.map(|w| w.1));
            watermarks.append_value(late.watermark);
            reasons.append_value(&late.reason);
        }
    }
    let indices = UInt32Array::from(indices);
    let mut columns: Vec<ArrayRef> =
        source.columns().iter().map(|c| take(c.as_ref(), &indices, None)).collect::<std::result::Result<_, _>>()?;
    columns.push(Arc::new(times.finish()));
    columns.push(Arc::new(starts.finish()));
    columns.push(Arc::new(ends.finish()));
    columns.push(Arc::new(watermarks.finish()));
    columns.push(Arc::new(reasons.finish()));
    Ok(Some(RecordBatch::try_new(schema.clone(), columns)?))
}

/// Writes `batches` (of `schema`) to `target`, ordered by `order` columns; one Parquet file or
/// folder renamed into place, or one Delta commit.
pub async fn write_table(
    target: &lockstep_batch::OutputTarget,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    order: &[String],
    dictionary_columns: &[String],
    metadata: serde_json::Map<String, serde_json::Value>,
) -> Result<(), crate::StreamError> {
    use datafusion::datasource::MemTable;
    use datafusion::logical_expr::col;
    use datafusion::prelude::SessionContext;
    let state = lockstep_batch::plan::session_state(&lockstep_batch::SessionLimits::default())?;
    let ctx = SessionContext::new_with_state(state);
    let table = MemTable::try_new(schema, vec![batches])?;
    let mut frame = ctx.read_table(Arc::new(table))?;
    if !order.is_empty() {
        frame =
            frame.sort(order.iter().map(|c| col(lockstep_features::compile::quoted(c)).sort(true, true)).collect())?;
    }
    target.write(&ctx.state(), frame, dictionary_columns, metadata).await?;
    Ok(())
}
