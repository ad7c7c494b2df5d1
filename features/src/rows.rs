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
    /// Rows at the end of `key_of_row` whose values repeat the last row of `values` and are
    /// not in `values` yet: runs of repeated windows are appended at once.
    owed: usize,
    /// Scratch space for the bounds of a run.
    bounds: Vec<i64>,
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
            owed: 0,
            bounds: Vec::new(),
            rows: 0,
        }
    }

    /// Output rows that follow are for `key`. A key equal to the last one begun continues it
    /// (the stream begins a key for every window it fires, and fires a key's windows together).
    pub fn begin_key(&mut self, key: &OwnedRow) {
        if self.keys.last().is_none_or(|last| last.row() != key.row()) {
            self.keys.push(key.clone());
        }
    }

    /// Appends a window of the key last begun, and the run of windows with the same states
    /// that follows it ([`WindowRow::then`]). A window that [`WindowRow::repeats`] the previous
    /// row of this batch copies its values (the same states give the same values).
    pub fn append(&mut self, row: WindowRow<'_>, feature: &str) -> Result<()> {
        let key = (self.keys.len() - 1) as u32;
        if row.repeats && self.rows > 0 && self.key_of_row.values_slice().last() == Some(&key) {
            self.owed += 1;
        } else {
            self.pay_owed();
            self.compute(&row, feature)?;
        }
        self.owed += row.then;
        self.push_bounds(&row);
        Ok(())
    }

    /// Appends a window of the key last begun whose states are those of row `from` of this
    /// batch (the caller knows no event reached them since), copying that row's values.
    pub fn append_copy(&mut self, row: WindowRow<'_>, from: usize) -> Result<()> {
        if from >= self.rows {
            return Err(DataFusionError::Internal(format!("row {from} to copy is not in a batch of {}", self.rows)));
        }
        self.pay_owed();
        for value in &mut self.values {
            value.repeat_row(from, 1);
        }
        self.owed += row.then;
        self.push_bounds(&row);
        Ok(())
    }

    /// Appends the key and bounds of `row` and of its run.
    fn push_bounds(&mut self, row: &WindowRow<'_>) {
        let n = 1 + row.then;
        self.key_of_row.append_value_n((self.keys.len() - 1) as u32, n);
        if row.then == 0 {
            self.starts.append_value(row.start);
            self.ends.append_value(row.end);
        } else {
            let step = row.step;
            self.bounds.clear();
            self.bounds.extend((0..n as i64).map(|i| row.start + i * step));
            self.starts.append_slice(&self.bounds);
            for bound in &mut self.bounds {
                *bound += row.end - row.start;
            }
            self.ends.append_slice(&self.bounds);
        }
        self.rows += n;
    }

    /// Appends the owed repeats of the last values.
    fn pay_owed(&mut self) {
        if self.owed > 0 {
            for value in &mut self.values {
                value.repeat_last(self.owed);
            }
            self.owed = 0;
        }
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
        self.pay_owed();
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

#[cfg(test)]
mod tests {
    use arrow::array::{Array, Float64Array, StringArray};
    use arrow::row::SortField;

    use super::*;
    use crate::aggregate::{Function, Partial};
    use crate::assemble::WindowStates;
    use crate::value::{ArgColumn, ValueType};

    fn specs() -> Vec<AggregateSpec> {
        let spec = |name: &str, function, input, output| AggregateSpec { name: name.into(), function, input, output };
        vec![
            spec("n", Function::CountStar, None, ValueType::Int64),
            spec("total", Function::Sum, Some(ValueType::Float64), ValueType::Float64),
            spec("last", Function::Last, Some(ValueType::String), ValueType::String),
        ]
    }

    /// States of `events` (amount, merchant), as one window holds them.
    fn states(specs: &[AggregateSpec], events: &[(Option<f64>, Option<&str>)]) -> Vec<Partial> {
        let amounts: ArrayRef = Arc::new(Float64Array::from(events.iter().map(|e| e.0).collect::<Vec<_>>()));
        let merchants: ArrayRef = Arc::new(StringArray::from(events.iter().map(|e| e.1).collect::<Vec<_>>()));
        let columns = [None, ArgColumn::new(&amounts), ArgColumn::new(&merchants)];
        let mut states: Vec<Partial> = specs.iter().map(Partial::empty).collect();
        for row in 0..events.len() {
            for (i, spec) in specs.iter().enumerate() {
                states[i].update(spec.function, columns[i].as_ref(), row, row as i64);
            }
        }
        states
    }

    /// Rows repeated in runs and copied from earlier rows hold the same values as rows computed
    /// one by one, across keys, nulls and a batch boundary.
    #[test]
    fn repeated_and_copied_rows_equal_computed_rows() {
        let specs = specs();
        let schema = crate::compile::output_schema(&[("user".into(), ValueType::String)], &specs);
        let converter = RowConverter::new(vec![SortField::new(arrow::datatypes::DataType::Utf8)]).unwrap();
        let keys = converter.convert_columns(&[Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef]).unwrap();
        let (a, b) = (keys.row(0).owned(), keys.row(1).owned());
        let windows = [
            states(&specs, &[(Some(0.1), Some("m1")), (Some(0.2), None)]),
            states(&specs, &[(None, Some("m2"))]),
            states(&specs, &[(Some(1e300), Some("m3")), (Some(-1e300), Some("m4")), (Some(3.0), Some("m5"))]),
        ];
        // (key, window, how): 0 computes, 1 repeats the previous row, 2 + r copies row r of the
        // batch. A batch ends after row 9.
        let plan: [(&OwnedRow, usize, usize); 13] = [
            (&a, 0, 0),
            (&a, 0, 1),
            (&a, 0, 1),
            (&a, 1, 0),
            (&a, 1, 1),
            (&b, 1, 1), // another key: computed whatever the flag says
            (&b, 2, 0),
            (&b, 2, 1),
            (&a, 0, 2), // copies row 0 while a repeat of the last row is owed
            (&b, 1, 2 + 5),
            (&b, 1, 1), // first of a batch: computed
            (&a, 1, 2),
            (&a, 1, 1),
        ];
        let mut fast = RowSink::new(&specs, schema.clone(), 2);
        let mut plain = RowSink::new(&specs, schema.clone(), 2);
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for part in [&plan[..10], &plan[10..]] {
            for (i, (key, window, how)) in part.iter().enumerate() {
                let row = |repeats| {
                    WindowRow::single(i as i64, i as i64 + 10, WindowStates::Merged(&windows[*window]), repeats)
                };
                for sink in [&mut fast, &mut plain] {
                    if i == 0 || part[i - 1].0 != *key {
                        sink.begin_key(key);
                    }
                }
                match how {
                    0 | 1 => fast.append(row(*how == 1), "f").unwrap(),
                    copy => fast.append_copy(row(false), copy - 2).unwrap(),
                }
                plain.append(row(false), "f").unwrap();
            }
            got.push(fast.finish(&converter).unwrap().unwrap());
            want.push(plain.finish(&converter).unwrap().unwrap());
        }
        assert_eq!(got, want);
        assert_eq!(got.iter().map(|b| b.num_rows()).collect::<Vec<_>>(), [10, 3]);
        let total = got[0].column(4).as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!(total.value(2).to_bits(), (0.1f64 + 0.2).to_bits());
        assert!(total.is_null(3) && total.is_null(9) && !total.is_null(8));
        assert!(fast.append_copy(WindowRow::single(0, 1, WindowStates::Merged(&windows[0]), false), 0).is_err());
    }
}
