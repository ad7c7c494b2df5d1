//! The record formats the streaming job writes to Kafka.
//!
//! **Output topic** (the feature's `output.topic`, default `<feature set>.windows`): one record
//! per fired window.
//! - key: a JSON object of the key columns and `window_start`, e.g.
//!   `{"user_id":"u1","window_start":1767571200000}`; records of one window share the key, so the
//!   topic can be compacted and a reader keeps the last value per key;
//! - value: a JSON object of the whole row in SPEC §2 order (keys, `window_start`,
//!   `window_end`, aggregates); times are epoch milliseconds, floats are JSON numbers in
//!   shortest round-trip form (read back with correct rounding they give the same bits) or the
//!   strings `"NaN"`, `"Infinity"`, `"-Infinity"`; a retracted session is a tombstone (no value);
//! - headers: `lockstep.change` = `fire`, `refire` or `retract`; `lockstep.feature`;
//! - partition: the windows of input partition `p` go to output partition `p` (modulo the output
//!   topic's partitions), so with the input keyed by the feature key, all windows of a key are in
//!   one partition, in the order they fired;
//! - timestamp: when the record was produced (one clock read per micro-batch of a partition).
//!
//! **Late topic** (`<source topic>.late`): the original message value, with headers
//! `lockstep.reason`, `lockstep.event_time` and `lockstep.watermark` (epoch milliseconds),
//! `lockstep.windows` (JSON `[[start, end], ...]`, empty for a session event) and
//! `lockstep.source` (`partition/offset`).
//!
//! **Dead-letter topic** (`<source topic>.dlq`): the original message key and value unchanged,
//! with headers `lockstep.error` and `lockstep.source`.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit, TimestampMillisecondType};
use serde_json::{Number, Value as Json};

/// The JSON value of one cell.
pub fn cell_json(column: &ArrayRef, row: usize) -> Json {
    if column.is_null(row) {
        return Json::Null;
    }
    match column.data_type() {
        DataType::Int64 => Json::from(column.as_primitive::<Int64Type>().value(row)),
        DataType::Float64 => float_json(column.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => Json::from(column.as_string::<i32>().value(row)),
        DataType::Boolean => Json::from(column.as_boolean().value(row)),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            Json::from(column.as_primitive::<TimestampMillisecondType>().value(row))
        }
        other => Json::String(format!("<unsupported type {other}>")),
    }
}

/// A float as JSON: a number, or a string for NaN and the infinities.
pub fn float_json(x: f64) -> Json {
    match Number::from_f64(x) {
        Some(n) => Json::Number(n),
        None if x.is_nan() => Json::from("NaN"),
        None if x > 0.0 => Json::from("Infinity"),
        None => Json::from("-Infinity"),
    }
}

/// One column of a batch of window rows, read without a type check per cell.
enum Cells<'a> {
    Int(&'a arrow::array::Int64Array),
    Time(&'a arrow::array::TimestampMillisecondArray),
    Float(&'a arrow::array::Float64Array),
    Text(&'a arrow::array::StringArray),
    Bool(&'a arrow::array::BooleanArray),
    Other(&'a ArrayRef),
}

impl<'a> Cells<'a> {
    fn of(column: &'a ArrayRef) -> Self {
        match column.data_type() {
            DataType::Int64 => Cells::Int(column.as_primitive::<Int64Type>()),
            DataType::Timestamp(TimeUnit::Millisecond, _) => {
                Cells::Time(column.as_primitive::<TimestampMillisecondType>())
            }
            DataType::Float64 => Cells::Float(column.as_primitive::<Float64Type>()),
            DataType::Utf8 => Cells::Text(column.as_string::<i32>()),
            DataType::Boolean => Cells::Bool(column.as_boolean()),
            _ => Cells::Other(column),
        }
    }

    /// Appends the JSON text of one cell: the text [`cell_json`] serializes to.
    fn write(&self, out: &mut Vec<u8>, row: usize) {
        let null = match self {
            Cells::Int(a) => a.is_null(row),
            Cells::Time(a) => a.is_null(row),
            Cells::Float(a) => a.is_null(row),
            Cells::Text(a) => a.is_null(row),
            Cells::Bool(a) => a.is_null(row),
            Cells::Other(a) => a.is_null(row),
        };
        if null {
            out.extend_from_slice(b"null");
            return;
        }
        match self {
            Cells::Int(a) => write_int(out, a.value(row)),
            Cells::Time(a) => write_int(out, a.value(row)),
            Cells::Float(a) => write_float(out, a.value(row)),
            Cells::Text(a) => {
                serde_json::to_writer(&mut *out, a.value(row)).expect("writing to a Vec cannot fail");
            }
            Cells::Bool(a) => out.extend_from_slice(if a.value(row) { b"true" } else { b"false" }),
            Cells::Other(a) => {
                serde_json::to_writer(&mut *out, &cell_json(a, row)).expect("writing to a Vec cannot fail");
            }
        }
    }
}

fn write_int(out: &mut Vec<u8>, x: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(x).as_bytes());
}

/// A float as [`float_json`] writes it: shortest round-trip digits (serde_json's own
/// formatter), or a string for NaN and the infinities.
fn write_float(out: &mut Vec<u8>, x: f64) {
    if x.is_finite() {
        out.extend_from_slice(zmij::Buffer::new().format_finite(x).as_bytes());
    } else if x.is_nan() {
        out.extend_from_slice(b"\"NaN\"");
    } else if x > 0.0 {
        out.extend_from_slice(b"\"Infinity\"");
    } else {
        out.extend_from_slice(b"\"-Infinity\"");
    }
}

/// `"name":` with the name escaped as JSON.
fn json_name(name: &str) -> Vec<u8> {
    let mut out = serde_json::to_vec(name).expect("a string serializes");
    out.push(b':');
    out
}

/// The output records of a batch of window rows (output schema: keys, `window_start`,
/// `window_end`, aggregates). Column names are escaped once per batch, and cells are read
/// without a type check each: fired windows are the streaming job's bulk output.
pub struct WindowRecords<'a> {
    keys: usize,
    names: Vec<Vec<u8>>,
    cells: Vec<Cells<'a>>,
}

impl<'a> WindowRecords<'a> {
    /// Records of `batch`, whose first `keys` columns are the key.
    pub fn new(batch: &'a RecordBatch, keys: usize) -> Self {
        WindowRecords {
            keys,
            names: batch.schema_ref().fields().iter().map(|f| json_name(f.name())).collect(),
            cells: batch.columns().iter().map(Cells::of).collect(),
        }
    }

    fn object(&self, out: &mut Vec<u8>, row: usize, columns: std::ops::Range<usize>) {
        out.push(b'{');
        let (names, cells) = (&self.names[columns.clone()], &self.cells[columns]);
        for (i, (name, cells)) in names.iter().zip(cells).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(name);
            cells.write(out, row);
        }
        out.push(b'}');
    }

    /// Appends the record key of row `row`: its key columns and `window_start`.
    pub fn key(&self, out: &mut Vec<u8>, row: usize) {
        self.object(out, row, 0..self.keys + 1);
    }

    /// Appends the record value of row `row`: the whole row (SPEC §2 order).
    pub fn value(&self, out: &mut Vec<u8>, row: usize) {
        self.object(out, row, 0..self.cells.len());
    }

    /// Appends the aggregates of row `row` as a JSON object (the columns after the key and the
    /// window bounds; the same text as in the record value).
    pub fn aggregates(&self, out: &mut Vec<u8>, row: usize) {
        self.object(out, row, (self.keys + 2).min(self.cells.len())..self.cells.len());
    }

    /// Appends the key values of row `row` as a JSON array (the online store's hash name).
    pub fn key_array(&self, out: &mut Vec<u8>, row: usize) {
        out.push(b'[');
        for (i, cells) in self.cells.iter().take(self.keys).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            cells.write(out, row);
        }
        out.push(b']');
    }

    /// The `window_start` of row `row` (epoch milliseconds).
    pub fn start(&self, row: usize) -> i64 {
        match &self.cells[self.keys] {
            Cells::Time(a) => a.value(row),
            Cells::Int(a) => a.value(row),
            _ => 0,
        }
    }
}

/// The record key of a window: its key columns and `window_start`, in that order.
pub fn window_key(batch: &RecordBatch, keys: usize, row: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    WindowRecords::new(batch, keys).key(&mut out, row);
    out
}

/// The record key of a window given as key columns (one row each) and a start.
pub fn window_key_of(names: &[String], key_columns: &[ArrayRef], row: usize, start: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(b'{');
    for (name, column) in names.iter().zip(key_columns) {
        out.extend_from_slice(&json_name(name));
        Cells::of(column).write(&mut out, row);
        out.push(b',');
    }
    out.extend_from_slice(&json_name("window_start"));
    write_int(&mut out, start);
    out.push(b'}');
    out
}

/// The record value of a window: the whole row, in the output schema's order (SPEC §2).
pub fn window_value(batch: &RecordBatch, row: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    WindowRecords::new(batch, 0).value(&mut out, row);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{BooleanArray, Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    #[test]
    fn window_records_are_written_in_schema_order_with_exact_values() {
        let schema = Schema::new(vec![
            Field::new("zone \"q\"", DataType::Utf8, true),
            Field::new("id", DataType::Int64, true),
            Field::new("window_start", lockstep_features::value::timestamp_type(), false),
            Field::new("window_end", lockstep_features::value::timestamp_type(), false),
            Field::new("sum", DataType::Float64, true),
            Field::new("flag", DataType::Boolean, true),
        ]);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![Some("a\"b\\c\u{1}é"), None, Some("")])),
            Arc::new(Int64Array::from(vec![Some(-7), Some(i64::MIN), None])),
            Arc::new(TimestampMillisecondArray::from(vec![-60_000, 0, 1_767_571_200_000]).with_timezone("UTC")),
            Arc::new(TimestampMillisecondArray::from(vec![0, 60_000, 1_767_574_800_000]).with_timezone("UTC")),
            Arc::new(Float64Array::from(vec![Some(0.1), Some(f64::NAN), Some(-f64::INFINITY)])),
            Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)])),
        ];
        let batch = RecordBatch::try_new(Arc::new(schema), columns).unwrap();
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
        assert_eq!(
            text(window_value(&batch, 0)),
            r#"{"zone \"q\"":"a\"b\\c\u0001é","id":-7,"window_start":-60000,"window_end":0,"sum":0.1,"flag":true}"#
        );
        assert_eq!(
            text(window_value(&batch, 1)),
            r#"{"zone \"q\"":null,"id":-9223372036854775808,"window_start":0,"window_end":60000,"sum":"NaN","flag":null}"#
        );
        assert_eq!(text(window_key(&batch, 2, 2)), r#"{"zone \"q\"":"","id":null,"window_start":1767571200000}"#);
        let mut aggregates = Vec::new();
        WindowRecords::new(&batch, 2).aggregates(&mut aggregates, 1);
        assert_eq!(text(aggregates), r#"{"sum":"NaN","flag":null}"#);
        let key_columns = [batch.column(0).clone(), batch.column(1).clone()];
        let names = ["zone \"q\"".to_string(), "id".to_string()];
        assert_eq!(window_key_of(&names, &key_columns, 2, 1_767_571_200_000), window_key(&batch, 2, 2));
        // Every cell reads back as the value `cell_json` gives.
        for row in 0..3 {
            let value: Json = serde_json::from_slice(&window_value(&batch, row)).unwrap();
            for (i, field) in batch.schema_ref().fields().iter().enumerate() {
                assert_eq!(value[field.name()], cell_json(batch.column(i), row), "{} of row {row}", field.name());
            }
        }
    }

    #[test]
    fn floats_keep_their_bits_through_json() {
        for x in [0.1, -0.0, 1e308, 5e-324, 123456.789e-7, f64::MAX] {
            let text = serde_json::to_string(&float_json(x)).unwrap();
            let back: f64 = serde_json::from_str(&text).unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{x} → {text}");
        }
        assert_eq!(float_json(f64::NAN), Json::from("NaN"));
        assert_eq!(float_json(f64::NEG_INFINITY), Json::from("-Infinity"));
    }
}
