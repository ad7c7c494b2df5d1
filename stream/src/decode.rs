//! JSON messages to Arrow rows of the source schema (SPEC §1).
//!
//! Every field of the schema must be present in a message (JSON `null` is a null value; a
//! missing field is an error). Types: `string` a JSON string; `int64` a JSON integer;
//! `float64` a JSON number or one of the strings `"NaN"`, `"Infinity"`, `"-Infinity"` (JSON has
//! no non-finite numbers); `bool` true/false; `timestamp` epoch milliseconds (an integer) or an
//! RFC 3339 string. The event time may not be null. Numbers are parsed with correct rounding, so
//! a float written in shortest round-trip form comes back with the same bits. Fields the schema
//! does not name are ignored.
//!
//! A message that breaks a rule is reported with the rule it broke and is not decoded; the
//! others are. Nothing is dropped silently: the caller sends the reports to the dead-letter
//! topic.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use arrow::datatypes::SchemaRef;
use lockstep_features::{Source, ValueType};
use serde_json::Value as Json;

/// One decoded value, before it is appended to its column.
enum Cell {
    Null,
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// Decodes JSON messages of one source.
pub struct JsonDecoder {
    schema: SchemaRef,
    fields: Vec<(String, ValueType)>,
    event_time: usize,
}

/// The result of decoding a batch of messages.
pub struct Decoded {
    /// The rows that decoded, in message order.
    pub rows: RecordBatch,
    /// For each row, the index of its message.
    pub messages: Vec<usize>,
    /// Messages that did not decode: (index, what is wrong).
    pub errors: Vec<(usize, String)>,
}

impl JsonDecoder {
    /// A decoder for `source`, producing `schema` (the source's declared Arrow schema).
    pub fn new(source: &Source, schema: SchemaRef) -> Self {
        let event_time = source.schema.iter().position(|(name, _)| *name == source.event_time).unwrap_or(0);
        JsonDecoder { schema, fields: source.schema.clone(), event_time }
    }

    /// Decodes `messages` (`None` is a message without a value).
    pub fn decode(&self, messages: &[Option<&[u8]>]) -> Decoded {
        let mut columns: Vec<Column> = self.fields.iter().map(|(_, t)| Column::new(*t, messages.len())).collect();
        let mut rows = Vec::with_capacity(messages.len());
        let mut errors = Vec::new();
        let mut cells = Vec::with_capacity(self.fields.len());
        for (index, message) in messages.iter().enumerate() {
            cells.clear();
            match self.parse(*message, &mut cells) {
                Ok(()) => {
                    for (column, cell) in columns.iter_mut().zip(cells.drain(..)) {
                        column.append(cell);
                    }
                    rows.push(index);
                }
                Err(error) => errors.push((index, error)),
            }
        }
        let arrays: Vec<ArrayRef> = columns.into_iter().map(Column::finish).collect();
        let rows_batch = RecordBatch::try_new(self.schema.clone(), arrays).expect("columns follow the source schema");
        Decoded { rows: rows_batch, messages: rows, errors }
    }

    fn parse(&self, message: Option<&[u8]>, cells: &mut Vec<Cell>) -> Result<(), String> {
        let bytes = message.ok_or("the message has no value")?;
        let json: Json = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
        let Json::Object(object) = json else {
            return Err(format!("expected a JSON object, got {}", kind(&json)));
        };
        for (i, (name, value_type)) in self.fields.iter().enumerate() {
            let value = object.get(name).ok_or_else(|| format!("field `{name}` is missing"))?;
            let cell = cell(value, *value_type).map_err(|e| format!("field `{name}`: {e}"))?;
            if i == self.event_time && matches!(cell, Cell::Null) {
                return Err(format!("the event time `{name}` is null"));
            }
            cells.push(cell);
        }
        Ok(())
    }
}

fn cell(value: &Json, value_type: ValueType) -> Result<Cell, String> {
    let wrong = || format!("expected {}, got {}", expected(value_type), kind(value));
    Ok(match (value_type, value) {
        (_, Json::Null) => Cell::Null,
        (ValueType::String, Json::String(s)) => Cell::Str(s.clone()),
        (ValueType::Int64, Json::Number(n)) => Cell::Int(n.as_i64().ok_or_else(wrong)?),
        (ValueType::Float64, Json::Number(n)) => Cell::Float(n.as_f64().ok_or_else(wrong)?),
        (ValueType::Float64, Json::String(s)) => Cell::Float(match s.as_str() {
            "NaN" => f64::NAN,
            "Infinity" => f64::INFINITY,
            "-Infinity" => f64::NEG_INFINITY,
            _ => return Err(wrong()),
        }),
        (ValueType::Bool, Json::Bool(b)) => Cell::Bool(*b),
        (ValueType::Timestamp, Json::Number(n)) => Cell::Int(n.as_i64().ok_or_else(wrong)?),
        (ValueType::Timestamp, Json::String(s)) => {
            let nanos = string_to_timestamp_nanos(s).map_err(|_| format!("`{s}` is not an RFC 3339 time"))?;
            Cell::Int(nanos.div_euclid(1_000_000))
        }
        _ => return Err(wrong()),
    })
}

fn expected(value_type: ValueType) -> &'static str {
    match value_type {
        ValueType::String => "a string",
        ValueType::Int64 => "an integer",
        ValueType::Float64 => "a number",
        ValueType::Bool => "true or false",
        ValueType::Timestamp => "epoch milliseconds or an RFC 3339 string",
    }
}

fn kind(value: &Json) -> String {
    match value {
        Json::Null => "null".into(),
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => format!("the number {n}"),
        Json::String(s) => format!("the string {:?}", truncate(s)),
        Json::Array(_) => "an array".into(),
        Json::Object(_) => "an object".into(),
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= 40 { s.to_string() } else { format!("{}…", s.chars().take(40).collect::<String>()) }
}

enum Column {
    Str(StringBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Time(TimestampMillisecondBuilder),
}

impl Column {
    fn new(value_type: ValueType, capacity: usize) -> Self {
        match value_type {
            ValueType::String => Column::Str(StringBuilder::with_capacity(capacity, capacity * 8)),
            ValueType::Int64 => Column::Int(Int64Builder::with_capacity(capacity)),
            ValueType::Float64 => Column::Float(Float64Builder::with_capacity(capacity)),
            ValueType::Bool => Column::Bool(BooleanBuilder::with_capacity(capacity)),
            ValueType::Timestamp => {
                Column::Time(TimestampMillisecondBuilder::with_capacity(capacity).with_timezone("UTC"))
            }
        }
    }

    fn append(&mut self, cell: Cell) {
        match (self, cell) {
            (Column::Str(b), Cell::Str(s)) => b.append_value(s),
            (Column::Int(b), Cell::Int(i)) => b.append_value(i),
            (Column::Float(b), Cell::Float(x)) => b.append_value(x),
            (Column::Bool(b), Cell::Bool(x)) => b.append_value(x),
            (Column::Time(b), Cell::Int(t)) => b.append_value(t),
            (Column::Str(b), _) => b.append_null(),
            (Column::Int(b), _) => b.append_null(),
            (Column::Float(b), _) => b.append_null(),
            (Column::Bool(b), _) => b.append_null(),
            (Column::Time(b), _) => b.append_null(),
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Column::Str(mut b) => Arc::new(b.finish()),
            Column::Int(mut b) => Arc::new(b.finish()),
            Column::Float(mut b) => Arc::new(b.finish()),
            Column::Bool(mut b) => Arc::new(b.finish()),
            Column::Time(mut b) => Arc::new(b.finish()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, TimestampMillisecondType};
    use lockstep_features::compile::source_schema;
    use lockstep_features::definitions::Definitions;

    fn decoder() -> JsonDecoder {
        let text = r#"
sources:
  s:
    schema: { id: string, n: int64, x: float64, ok: bool, t: timestamp }
    event_time: t
features:
  f:
    source: s
    key: [id]
    window: { tumbling: 1h }
    aggregations: { c: count(*) }
"#;
        let definitions = Definitions::parse("d.yaml", text, std::path::Path::new(".")).unwrap();
        let source = definitions.sources[0].clone();
        JsonDecoder::new(&source, source_schema(&source))
    }

    #[test]
    fn good_messages_decode_with_exact_floats_and_both_time_forms() {
        let messages: Vec<&[u8]> = vec![
            br#"{"id":"a","n":5,"x":0.1,"ok":true,"t":1000,"extra":[1]}"#,
            br#"{"id":null,"n":null,"x":"NaN","ok":null,"t":"1970-01-01T00:00:02.5Z"}"#,
            br#"{"id":"c","n":-1,"x":-0.0,"ok":false,"t":-1}"#,
        ];
        let decoded = decoder().decode(&messages.iter().map(|m| Some(*m)).collect::<Vec<_>>());
        assert!(decoded.errors.is_empty(), "{:?}", decoded.errors);
        assert_eq!(decoded.messages, vec![0, 1, 2]);
        let x = decoded.rows.column(2).as_primitive::<Float64Type>();
        assert_eq!(x.value(0).to_bits(), 0.1f64.to_bits());
        assert!(x.value(1).is_nan());
        assert_eq!(x.value(2).to_bits(), (-0.0f64).to_bits());
        let t = decoded.rows.column(4).as_primitive::<TimestampMillisecondType>();
        assert_eq!((t.value(0), t.value(1), t.value(2)), (1000, 2500, -1));
        assert!(decoded.rows.column(0).is_null(1));
    }

    #[test]
    fn every_malformed_message_is_reported_and_the_rest_decode() {
        let messages: Vec<Option<&[u8]>> = vec![
            Some(br#"{"id":"a","n":1,"x":1,"ok":true,"t":1}"#),
            Some(b"{not json"),
            Some(br#"{"id":"a","n":1,"x":1,"ok":true}"#),
            Some(br#"{"id":"a","n":1.5,"x":1,"ok":true,"t":1}"#),
            Some(br#"{"id":"a","n":1,"x":"lots","ok":true,"t":1}"#),
            Some(br#"{"id":"a","n":1,"x":1,"ok":true,"t":null}"#),
            Some(br#"{"id":"a","n":1,"x":1,"ok":true,"t":"yesterday"}"#),
            Some(br#"[1,2]"#),
            None,
            Some(br#"{"id":"b","n":2,"x":2,"ok":false,"t":2}"#),
        ];
        let decoded = decoder().decode(&messages);
        assert_eq!(decoded.messages, vec![0, 9]);
        assert_eq!(decoded.rows.num_rows(), 2);
        let errors: Vec<(usize, &str)> = decoded.errors.iter().map(|(i, e)| (*i, e.as_str())).collect();
        assert_eq!(errors.len(), 8);
        assert!(errors[0].1.starts_with("not valid JSON"), "{errors:?}");
        assert_eq!(errors[1].1, "field `t` is missing");
        assert_eq!(errors[2].1, "field `n`: expected an integer, got the number 1.5");
        assert_eq!(errors[3].1, "field `x`: expected a number, got the string \"lots\"");
        assert_eq!(errors[4].1, "the event time `t` is null");
        assert_eq!(errors[5].1, "field `t`: `yesterday` is not an RFC 3339 time");
        assert_eq!(errors[6].1, "expected a JSON object, got an array");
        assert_eq!(errors[7].1, "the message has no value");
    }
}
