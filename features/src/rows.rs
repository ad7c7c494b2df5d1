//! Output rows of the window stage: keys, `window_start`, `window_end`, then each aggregate's
//! final value, built column by column into Arrow batches of the SPEC §2 output schema. Both
//! jobs write their windows through [`RowSink`].

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, TimestampMillisecondBuilder, UInt32Builder};
use arrow::compute::take;
use arrow::datatypes::SchemaRef;
use arrow::row::{OwnedRow, RowConverter};
use datafusion::common::{DataFusionError, Result};

use crate::aggregate::AggregateSpec;
use crate::assemble::WindowRow;
use crate::value::OutputColumn;

/// Builds output batches from windows; see the module documentation.
pub struct RowSink {
    specs: Vec<AggregateSpec>,
    schema: SchemaRef,
    /// Distinct keys of this batch, and per row the index of its key.
    keys: Vec<OwnedRow>,
    key_of_row: UInt32Builder,
    starts: TimestampMillisecondBuilder,
    ends: TimestampMillisecondBuilder,
    values: Vec<OutputColumn>,
    pub rows: usize,
}

impl RowSink {
    pub fn new(specs: &[AggregateSpec], schema: SchemaRef, capacity: usize) -> Self {
        RowSink {
            specs: specs.to_vec(),
            schema,
            keys: Vec::new(),
            key_of_row: UInt32Builder::with_capacity(capacity),
            starts: TimestampMillisecondBuilder::with_capacity(capacity).with_timezone("UTC"),
            ends: TimestampMillisecondBuilder::with_capacity(capacity).with_timezone("UTC"),
            values: specs.iter().map(|s| OutputColumn::new(s.output, capacity)).collect(),
            rows: 0,
        }
    }

    /// Output rows that follow are for `key` (called when the key changes).
    pub fn begin_key(&mut self, key: &OwnedRow) {
        self.keys.push(key.clone());
    }

    /// Appends a window of the key last begun. A window that [`WindowRow::repeats`] the previous
    /// row of this batch copies its values (the same states give the same values).
    pub fn append(&mut self, row: WindowRow<'_>, feature: &str) -> Result<()> {
        let key = (self.keys.len() - 1) as u32;
        if row.repeats && self.rows > 0 && self.key_of_row.values_slice().last() == Some(&key) {
            for value in &mut self.values {
                value.repeat_last();
            }
        } else {
            self.compute(&row, feature)?;
        }
        self.key_of_row.append_value(key);
        self.starts.append_value(row.start);
        self.ends.append_value(row.end);
        self.rows += 1;
        Ok(())
    }

    fn compute(&mut self, row: &WindowRow<'_>, feature: &str) -> Result<()> {
        for (i, spec) in self.specs.iter().enumerate() {
            row.states.emit(i, spec, &mut self.values[i]).map_err(|e| {
                DataFusionError::Execution(format!(
                    "feature set `{feature}`, window starting {}: {e}",
                    format_time(row.start)
                ))
            })?;
        }
        Ok(())
    }

    pub fn finish(&mut self, converter: &RowConverter) -> Result<Option<RecordBatch>> {
        if self.rows == 0 {
            return Ok(None);
        }
        // The next batch starts with room for as many rows as this one: builders left empty by
        // `finish` would grow again by doubling, copying what they hold each time.
        let fresh = RowSink::new(&self.specs, self.schema.clone(), self.rows);
        let mut done = std::mem::replace(self, fresh);
        // The key being assembled may continue in the next batch: keep it first.
        self.keys.extend(done.keys.last().cloned());
        let key_columns = converter.convert_rows(done.keys.iter().map(|k| k.row()))?;
        let indices = done.key_of_row.finish();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for key in key_columns {
            columns.push(take(&key, &indices, None)?);
        }
        columns.push(Arc::new(done.starts.finish()));
        columns.push(Arc::new(done.ends.finish()));
        for value in &mut done.values {
            columns.push(value.finish());
        }
        Ok(Some(RecordBatch::try_new(self.schema.clone(), columns)?))
    }
}

/// ISO-8601 text of a millisecond timestamp, for messages.
pub fn format_time(millis: i64) -> String {
    arrow::temporal_conversions::timestamp_ms_to_datetime(millis)
        .map_or_else(|| format!("{millis}ms"), |t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
}

/// Reads a time given as an RFC 3339 string (`2026-01-05T10:00:00Z`, `2026-01-05`) or as epoch
/// milliseconds, to milliseconds (rounded toward the past).
pub fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(millis) = text.trim().parse::<i64>() {
        return Ok(millis);
    }
    arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(text.trim())
        .map(|nanos| nanos.div_euclid(1_000_000))
        .map_err(|_| format!("`{text}` is not a time: give RFC 3339 (2026-01-05T10:00:00Z) or epoch milliseconds"))
}
