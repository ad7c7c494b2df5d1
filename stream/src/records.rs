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
//! - headers: `lockstep.change` = `fire`, `refire` or `retract`; `lockstep.feature`.
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
use serde_json::{Map, Number, Value as Json};

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

/// The record key of a window: its key columns and `window_start`.
pub fn window_key(batch: &RecordBatch, keys: usize, row: usize) -> Vec<u8> {
    let mut object = Map::new();
    for (i, field) in batch.schema().fields().iter().enumerate().take(keys) {
        object.insert(field.name().clone(), cell_json(batch.column(i), row));
    }
    object.insert("window_start".into(), cell_json(batch.column(keys), row));
    serde_json::to_vec(&Json::Object(object)).expect("JSON values serialize")
}

/// The record key of a window given as key columns (one row each) and a start.
pub fn window_key_of(names: &[String], key_columns: &[ArrayRef], row: usize, start: i64) -> Vec<u8> {
    let mut object = Map::new();
    for (name, column) in names.iter().zip(key_columns) {
        object.insert(name.clone(), cell_json(column, row));
    }
    object.insert("window_start".into(), Json::from(start));
    serde_json::to_vec(&Json::Object(object)).expect("JSON values serialize")
}

/// The record value of a window: the whole row.
pub fn window_value(batch: &RecordBatch, row: usize) -> Vec<u8> {
    let mut object = Map::new();
    for (i, field) in batch.schema().fields().iter().enumerate() {
        object.insert(field.name().clone(), cell_json(batch.column(i), row));
    }
    serde_json::to_vec(&Json::Object(object)).expect("JSON values serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

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
