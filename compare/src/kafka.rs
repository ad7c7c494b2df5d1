//! Kafka inputs of a comparison: a topic of window records (the streaming job's output topic)
//! and a late topic.
//!
//! A topic is read read_committed from the beginning of every partition to its end. Window
//! records are keyed by their key columns and `window_start`; the last record per key wins and a
//! tombstone (a retracted session) deletes. Values are JSON objects typed by the other side's
//! schema, which is why one side of a comparison must be a table.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::dataframe::DataFrame;
use datafusion::prelude::SessionContext;
use lockstep_stream::topic::{Record, read_committed};
use serde_json::Value as Json;

use crate::{CompareError, Input};

/// Every committed message of `topic`, partition by partition in offset order.
async fn read_topic(brokers: &str, topic: &str) -> Result<Vec<Record>, CompareError> {
    let location = format!("kafka://{brokers}/{topic}");
    let (b, t) = (brokers.to_string(), topic.to_string());
    let read = tokio::task::spawn_blocking(move || read_committed(&b, &t))
        .await
        .map_err(|e| CompareError::Input { location: location.clone(), message: e.to_string() })?;
    read.map_err(|message| CompareError::Input { location, message })
}

/// The window records of a topic, as a table typed by `schema` (the other side's).
pub async fn read_windows(
    ctx: &SessionContext,
    input: &Input,
    schema: Option<SchemaRef>,
    _keys: Option<&[String]>,
) -> Result<DataFrame, CompareError> {
    let Input::Kafka { brokers, topic } = input else { unreachable!("called for Kafka inputs") };
    let location = input.describe();
    let schema = schema.ok_or_else(|| CompareError::Input {
        location: location.clone(),
        message: "one side of a comparison must be a table: its schema types the topic's JSON records".into(),
    })?;
    let records = read_topic(brokers, topic).await?;
    // The last record per key; a tombstone deletes.
    let mut last: HashMap<Vec<u8>, usize> = HashMap::new();
    for (i, (key, _, _)) in records.iter().enumerate() {
        last.insert(key.clone().unwrap_or_default(), i);
    }
    let mut kept: Vec<usize> = last.into_values().filter(|&i| records[i].1.is_some()).collect();
    kept.sort_unstable();
    let mut values = Vec::with_capacity(kept.len());
    for i in kept {
        let payload = records[i].1.as_deref().expect("tombstones were removed");
        let value: Json = serde_json::from_slice(payload).map_err(|e| CompareError::Input {
            location: location.clone(),
            message: format!("record {i} is not JSON: {e}"),
        })?;
        values.push(value);
    }
    let batch = to_batch(&schema, &values).map_err(|message| CompareError::Input { location, message })?;
    Ok(ctx.read_batch(batch)?)
}

/// Too-late events of a late topic, as batches of the key columns (typed by `output`),
/// `late_window_start` and `late_event_time`: one row per missed window, or one with a null
/// window for a session event.
pub async fn read_late(
    brokers: &str,
    topic: &str,
    keys: &[String],
    output: &SchemaRef,
) -> Result<Vec<RecordBatch>, CompareError> {
    let location = format!("kafka://{brokers}/{topic}");
    let records = read_topic(brokers, topic).await?;
    let mut fields: Vec<Field> = keys
        .iter()
        .map(|k| output.field_with_name(k).expect("keys were checked").clone().with_nullable(true))
        .collect();
    fields.push(Field::new("late_window_start", lockstep_features::value::timestamp_type(), true));
    fields.push(Field::new("late_event_time", lockstep_features::value::timestamp_type(), true));
    let schema = Arc::new(Schema::new(fields));
    let mut rows = Vec::new();
    for (i, (_, value, headers)) in records.iter().enumerate() {
        let bad =
            |what: &str| CompareError::Input { location: location.clone(), message: format!("record {i}: {what}") };
        let header =
            |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).to_string());
        let Some(Json::Object(mut event)) = value.as_deref().and_then(|v| serde_json::from_slice(v).ok()) else {
            return Err(bad("the value is not a JSON object"));
        };
        let windows: Vec<(i64, i64)> =
            serde_json::from_str(&header("lockstep.windows").ok_or_else(|| bad("no lockstep.windows header"))?)
                .map_err(|_| bad("lockstep.windows is not [[start, end], ...]"))?;
        let time: Option<i64> = header("lockstep.event_time").and_then(|t| t.parse().ok());
        let mut row = serde_json::Map::new();
        for key in keys {
            row.insert(key.clone(), event.remove(key).unwrap_or(Json::Null));
        }
        row.insert("late_event_time".into(), time.map_or(Json::Null, Json::from));
        if windows.is_empty() {
            row.insert("late_window_start".into(), Json::Null);
            rows.push(Json::Object(row));
        } else {
            for (start, _) in windows {
                let mut row = row.clone();
                row.insert("late_window_start".into(), Json::from(start));
                rows.push(Json::Object(row));
            }
        }
    }
    let batch = to_batch(&schema, &rows).map_err(|message| CompareError::Input { location, message })?;
    Ok(vec![batch])
}

/// JSON objects as one batch of `schema`: numbers and the strings `NaN`, `Infinity`,
/// `-Infinity` for floats, epoch milliseconds or RFC 3339 for timestamps.
fn to_batch(schema: &SchemaRef, rows: &[Json]) -> Result<RecordBatch, String> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let name = field.name();
        fn cell<'r>(row: &'r Json, name: &str) -> Option<&'r Json> {
            row.get(name).filter(|v| !v.is_null())
        }
        let wrong = |i: usize, v: &Json| format!("record {i}: `{name}` is {v}, expected {}", field.data_type());
        let column: ArrayRef = match field.data_type() {
            DataType::Int64 => {
                let mut b = Int64Builder::with_capacity(rows.len());
                for (i, row) in rows.iter().enumerate() {
                    match cell(row, name) {
                        None => b.append_null(),
                        Some(v) => b.append_value(v.as_i64().ok_or_else(|| wrong(i, v))?),
                    }
                }
                Arc::new(b.finish())
            }
            DataType::Float64 => {
                let mut b = Float64Builder::with_capacity(rows.len());
                for (i, row) in rows.iter().enumerate() {
                    match cell(row, name) {
                        None => b.append_null(),
                        Some(Json::String(s)) if s == "NaN" => b.append_value(f64::NAN),
                        Some(Json::String(s)) if s == "Infinity" => b.append_value(f64::INFINITY),
                        Some(Json::String(s)) if s == "-Infinity" => b.append_value(f64::NEG_INFINITY),
                        Some(v) => b.append_value(v.as_f64().ok_or_else(|| wrong(i, v))?),
                    }
                }
                Arc::new(b.finish())
            }
            DataType::Boolean => {
                let mut b = BooleanBuilder::with_capacity(rows.len());
                for (i, row) in rows.iter().enumerate() {
                    match cell(row, name) {
                        None => b.append_null(),
                        Some(v) => b.append_value(v.as_bool().ok_or_else(|| wrong(i, v))?),
                    }
                }
                Arc::new(b.finish())
            }
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => {
                let mut b = StringBuilder::new();
                for (i, row) in rows.iter().enumerate() {
                    match cell(row, name) {
                        None => b.append_null(),
                        Some(v) => b.append_value(v.as_str().ok_or_else(|| wrong(i, v))?),
                    }
                }
                arrow::compute::cast(&(Arc::new(b.finish()) as ArrayRef), field.data_type())
                    .map_err(|e| e.to_string())?
            }
            DataType::Timestamp(TimeUnit::Millisecond, tz) => {
                let mut b = TimestampMillisecondBuilder::with_capacity(rows.len()).with_timezone_opt(tz.clone());
                for (i, row) in rows.iter().enumerate() {
                    match cell(row, name) {
                        None => b.append_null(),
                        Some(Json::String(s)) => b.append_value(lockstep_features::rows::parse_time(s)?),
                        Some(v) => b.append_value(v.as_i64().ok_or_else(|| wrong(i, v))?),
                    }
                }
                Arc::new(b.finish())
            }
            other => return Err(format!("column `{name}` has type {other}, which window records do not carry")),
        };
        columns.push(column);
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}
