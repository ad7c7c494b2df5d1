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
//! Most messages are flat objects of scalars; they are read in one pass over their bytes. Any
//! other message is read by serde_json, with the same outcome.
//!
//! A message that breaks a rule is reported with the rule it broke and is not decoded; the
//! others are. Nothing is dropped silently: the caller sends the reports to the dead-letter
//! topic.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use arrow::datatypes::SchemaRef;
use lockstep_features::{Source, ValueType};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One decoded value, before it is appended to its column. Strings borrow the message when
/// they hold no escapes.
#[derive(Debug)]
enum Cell<'m> {
    Null,
    Str(Cow<'m, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// A field's outcome in one message: its value, or what is wrong with it.
type Slot<'m> = Option<Result<Cell<'m>, String>>;

/// Decodes JSON messages of one source.
pub struct JsonDecoder {
    schema: SchemaRef,
    fields: Vec<(String, ValueType)>,
    /// Field name → position in `fields`.
    positions: HashMap<Box<str>, usize, foldhash::fast::FixedState>,
    /// Each field's name in quotes, for a name that needs no escape (no quote, backslash or
    /// control character): the flat reading takes such a name by comparing bytes. A message
    /// that spells it with escapes leaves the flat reading, as before.
    quoted: Vec<Option<Box<[u8]>>>,
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
        let positions = source.schema.iter().enumerate().map(|(i, (name, _))| (name.as_str().into(), i)).collect();
        let quoted = source
            .schema
            .iter()
            .map(|(name, _)| {
                let plain = !name.bytes().any(ends_plain_string);
                plain.then(|| [b"\"", name.as_bytes(), b"\""].concat().into_boxed_slice())
            })
            .collect();
        JsonDecoder { schema, fields: source.schema.clone(), positions, quoted, event_time }
    }

    /// Decodes `messages` (`None` is a message without a value).
    pub fn decode(&self, messages: &[Option<&[u8]>]) -> Decoded {
        let mut columns: Vec<Column> = self.fields.iter().map(|(_, t)| Column::new(*t, messages.len())).collect();
        let mut rows = Vec::with_capacity(messages.len());
        let mut errors = Vec::new();
        let mut slots: Vec<Slot<'_>> = Vec::with_capacity(self.fields.len());
        for (index, message) in messages.iter().enumerate() {
            match self.parse(*message, &mut slots) {
                Ok(()) => {
                    for (column, slot) in columns.iter_mut().zip(slots.drain(..)) {
                        column.append(slot.and_then(Result::ok).unwrap_or(Cell::Null));
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

    /// Reads one message into `slots` (one per schema field). A message that is valid JSON but
    /// breaks a rule reports the first broken rule in schema order; a syntax error anywhere
    /// wins over those.
    fn parse<'m>(&self, message: Option<&'m [u8]>, slots: &mut Vec<Slot<'m>>) -> Result<(), String> {
        let bytes = message.ok_or("the message has no value")?;
        if self.parse_flat(bytes, slots).is_none() {
            self.parse_full(bytes, slots)?;
        }
        for (i, ((name, _), slot)) in self.fields.iter().zip(slots.iter()).enumerate() {
            match slot {
                None => return Err(format!("field `{name}` is missing")),
                Some(Err(error)) => return Err(format!("field `{name}`: {error}")),
                Some(Ok(Cell::Null)) if i == self.event_time => return Err(format!("the event time `{name}` is null")),
                Some(Ok(_)) => {}
            }
        }
        Ok(())
    }
}

impl JsonDecoder {
    /// Reads a message with serde_json into `slots`: the reference reading, used for every
    /// message [`JsonDecoder::parse_flat`] leaves. `Err` is a syntax error or a message that is
    /// not an object.
    fn parse_full<'m>(&self, bytes: &'m [u8], slots: &mut Vec<Slot<'m>>) -> Result<(), String> {
        slots.clear();
        slots.resize_with(self.fields.len(), || None);
        let mut reader = serde_json::Deserializer::from_slice(bytes);
        reader
            .deserialize_any(MessageVisitor { decoder: self, slots: &mut *slots })
            .and_then(|shape| reader.end().map(|()| shape))
            .map_err(|e| format!("not valid JSON: {e}"))?
    }

    /// Reads the common message, a flat object of scalars whose names and strings hold no
    /// escapes, in one pass over its bytes, with the outcome [`JsonDecoder::parse_full`] would
    /// give. `None` for any other message (nested values, escapes, syntax errors, numbers JSON
    /// readers treat specially: integers beyond 64 bits, `-0`, floats out of range): those are
    /// read again by `parse_full`. Both readings type values with [`CellSeed::scalar`].
    fn parse_flat<'m>(&self, bytes: &'m [u8], slots: &mut Vec<Slot<'m>>) -> Option<()> {
        slots.clear();
        slots.resize_with(self.fields.len(), || None);
        // One UTF-8 check for the whole message; quotes and escapes are ASCII, so every string
        // found below starts and ends on a character boundary.
        let text = std::str::from_utf8(bytes).ok()?;
        let mut scan = Scan { text, bytes, at: 0 };
        scan.skip_space();
        scan.expect(b'{')?;
        scan.skip_space();
        // Messages mostly list their fields in schema order: the next one is tried before hashing.
        let mut next_field = 0;
        if !scan.eat(b'}') {
            loop {
                // The expected name is taken by comparing bytes: a plain name's quoted spelling
                // at the cursor is exactly the string token `scan.string` would read. A name
                // that is not plain never comes out of `scan.string`, which stops at escapes.
                let expected = self.quoted.get(next_field).and_then(Option::as_deref);
                let position = match expected {
                    Some(quoted) if bytes[scan.at..].starts_with(quoted) => {
                        scan.at += quoted.len();
                        Some(next_field)
                    }
                    _ => self.positions.get(scan.string()?).copied(),
                };
                scan.skip_space();
                scan.expect(b':')?;
                scan.skip_space();
                let scalar = scan.scalar()?;
                if let Some(i) = position {
                    slots[i] = Some(CellSeed(self.fields[i].1).scalar(scalar));
                    next_field = i + 1;
                }
                scan.skip_space();
                if scan.eat(b',') {
                    scan.skip_space();
                } else {
                    scan.expect(b'}')?;
                    break;
                }
            }
        }
        scan.skip_space();
        (scan.at == bytes.len()).then_some(())
    }
}

/// A JSON scalar as serde_json reads it: integers that fit 64 bits stay integers.
enum Scalar<'m> {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(&'m str),
}

/// A cursor over a message's bytes for [`JsonDecoder::parse_flat`]; every method returns `None`
/// where the message leaves the flat form.
struct Scan<'m> {
    text: &'m str,
    bytes: &'m [u8],
    at: usize,
}

impl<'m> Scan<'m> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let here = self.peek() == Some(byte);
        self.at += usize::from(here);
        here
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        self.eat(byte).then_some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at + word.len();
        (self.bytes.get(self.at..end)? == word).then(|| self.at = end)
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'m str> {
        self.expect(b'"')?;
        let start = self.at;
        let length = string_length(&self.bytes[start..])?;
        self.at = start + length;
        self.expect(b'"')?;
        self.text.get(start..start + length)
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        self.at - start
    }

    fn scalar(&mut self) -> Option<Scalar<'m>> {
        match self.peek()? {
            b'"' => self.string().map(Scalar::Str),
            b'n' => self.literal(b"null").map(|()| Scalar::Null),
            b't' => self.literal(b"true").map(|()| Scalar::Bool(true)),
            b'f' => self.literal(b"false").map(|()| Scalar::Bool(false)),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A number in JSON's grammar. Integers: `u64` when positive, `i64` when negative (as
    /// serde_json; `-0` and integers beyond 64 bits are left to it). Others: the correctly
    /// rounded double, finite.
    fn number(&mut self) -> Option<Scalar<'m>> {
        let start = self.at;
        let negative = self.eat(b'-');
        let int_start = self.at;
        let int_digits = self.digits();
        if int_digits == 0 || (int_digits > 1 && self.bytes[int_start] == b'0') {
            return None;
        }
        let int_end = self.at;
        let mut fraction = None;
        if self.eat(b'.') {
            let fraction_start = self.at;
            if self.digits() == 0 {
                return None;
            }
            fraction = Some(fraction_start..self.at);
        }
        let mut exponent = false;
        if matches!(self.peek(), Some(b'e' | b'E')) {
            exponent = true;
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        if fraction.is_some() || exponent {
            if let (Some(fraction), false) = (&fraction, exponent)
                && let Some(x) = short_decimal(&self.bytes[int_start..int_end], &self.bytes[fraction.clone()])
            {
                return Some(Scalar::F64(if negative { -x } else { x }));
            }
            let x: f64 = self.text.get(start..self.at)?.parse().ok()?;
            return x.is_finite().then_some(Scalar::F64(x));
        }
        // Up to 19 digits cannot overflow a u64; longer ones are checked.
        let digits = &self.bytes[int_start..int_end];
        let magnitude = if digits.len() <= 19 {
            digits.iter().fold(0u64, |m, d| m * 10 + u64::from(d - b'0'))
        } else {
            let mut magnitude: u64 = 0;
            for &digit in digits {
                magnitude = magnitude.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
            }
            magnitude
        };
        match (negative, magnitude) {
            (false, _) => Some(Scalar::U64(magnitude)),
            (true, 1..=0x8000_0000_0000_0000) => Some(Scalar::I64((magnitude as i64).wrapping_neg())),
            (true, _) => None,
        }
    }
}

/// The value of the decimal `integer.fraction` (ASCII digits, no sign), when it is exact by the
/// fast path every correct reader starts with (Clinger's): all its digits as one integer of at
/// most 2^53, divided by a power of ten up to 10^22. Both are doubles exactly, so one division
/// rounds correctly. `None` for any other number, which is left to the full parser.
fn short_decimal(integer: &[u8], fraction: &[u8]) -> Option<f64> {
    const POWERS: [f64; 23] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19,
        1e20, 1e21, 1e22,
    ];
    if integer.len() + fraction.len() > 19 || fraction.len() >= POWERS.len() {
        return None;
    }
    let mantissa = integer.iter().chain(fraction).fold(0u64, |m, d| m * 10 + u64::from(d - b'0'));
    (mantissa <= 1 << 53).then(|| mantissa as f64 / POWERS[fraction.len()])
}

/// The position of the first byte of `bytes` that ends a plain string: a quote, a backslash or a
/// control character. Eight bytes at a time: in each word, a byte equal to `b` turns into a zero
/// byte of `word ^ b`, and `(v - 0x01..) & !v & 0x80..` flags zero bytes of `v` (and bytes below
/// 0x20 of `word` with 0x20 for 0x01), exactly for the lowest one, which is all that is read.
fn string_length(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH;
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let found =
            below(word ^ (ONES * u64::from(b'"')), 1) | below(word ^ (ONES * u64::from(b'\\')), 1) | below(word, 0x20);
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    bytes[at..].iter().position(|&b| ends_plain_string(b)).map(|p| at + p)
}

/// A byte that ends a plain string (one the flat reading takes): a quote, a backslash or a
/// control character.
fn ends_plain_string(b: u8) -> bool {
    b == b'"' || b == b'\\' || b < 0x20
}

/// Reads a message's top level: an object whose fields the schema names go to their slots
/// (the last of repeated names wins); anything else is consumed and reported.
struct MessageVisitor<'d, 's, 'm> {
    decoder: &'d JsonDecoder,
    slots: &'s mut Vec<Slot<'m>>,
}

impl<'de> Visitor<'de> for MessageVisitor<'_, '_, 'de> {
    /// `Err` when the message is valid JSON but not an object.
    type Value = Result<(), String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while let Some(position) = map.next_key_seed(FieldSeed(self.decoder))? {
            match position {
                Some(i) => {
                    let value_type = self.decoder.fields[i].1;
                    self.slots[i] = Some(map.next_value_seed(CellSeed(value_type))?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Ok(()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq)?;
        Ok(Err(not_an_object(Shape::Array)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Err(not_an_object(Shape::Null)))
    }

    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Err(not_an_object(Shape::Bool(b))))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Err(not_an_object(Shape::Number(n.into()))))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Err(not_an_object(Shape::Number(n.into()))))
    }

    fn visit_f64<E>(self, x: f64) -> Result<Self::Value, E> {
        Ok(Err(not_an_object(Shape::float(x))))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Err(not_an_object(Shape::Str(s))))
    }
}

fn not_an_object(shape: Shape<'_>) -> String {
    format!("expected a JSON object, got {shape}")
}

/// A key of the message object → its field's position, `None` for fields the schema does not
/// name.
struct FieldSeed<'d>(&'d JsonDecoder);

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
        Ok(self.0.positions.get(name).copied())
    }
}

/// One field's value, read as its declared type.
struct CellSeed(ValueType);

impl<'de> DeserializeSeed<'de> for CellSeed {
    type Value = Result<Cell<'de>, String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl CellSeed {
    /// The cell a scalar makes of a field of this type: the typing rules of both readings.
    /// Inlined: it runs for every field of every message.
    #[inline(always)]
    fn scalar<'m>(&self, value: Scalar<'m>) -> Result<Cell<'m>, String> {
        match (self.0, value) {
            (_, Scalar::Null) => Ok(Cell::Null),
            (ValueType::Bool, Scalar::Bool(b)) => Ok(Cell::Bool(b)),
            (_, Scalar::Bool(b)) => self.wrong(Shape::Bool(b)),
            (ValueType::Int64 | ValueType::Timestamp, Scalar::I64(n)) => Ok(Cell::Int(n)),
            (ValueType::Float64, Scalar::I64(n)) => Ok(Cell::Float(n as f64)),
            (_, Scalar::I64(n)) => self.wrong(Shape::Number(n.into())),
            (ValueType::Int64 | ValueType::Timestamp, Scalar::U64(n)) if n <= i64::MAX as u64 => {
                Ok(Cell::Int(n as i64))
            }
            (ValueType::Float64, Scalar::U64(n)) => Ok(Cell::Float(n as f64)),
            (_, Scalar::U64(n)) => self.wrong(Shape::Number(n.into())),
            (ValueType::Float64, Scalar::F64(x)) => Ok(Cell::Float(x)),
            (_, Scalar::F64(x)) => self.wrong(Shape::float(x)),
            (_, Scalar::Str(s)) => self.string(Cow::Borrowed(s)),
        }
    }

    #[cold]
    fn wrong<'m>(&self, got: Shape<'_>) -> Result<Cell<'m>, String> {
        Err(format!("expected {}, got {got}", expected(self.0)))
    }

    fn string<'m>(&self, s: Cow<'m, str>) -> Result<Cell<'m>, String> {
        match self.0 {
            ValueType::String => Ok(Cell::Str(s)),
            ValueType::Float64 => match &*s {
                "NaN" => Ok(Cell::Float(f64::NAN)),
                "Infinity" => Ok(Cell::Float(f64::INFINITY)),
                "-Infinity" => Ok(Cell::Float(f64::NEG_INFINITY)),
                _ => self.wrong(Shape::Str(&s)),
            },
            ValueType::Timestamp => match string_to_timestamp_nanos(&s) {
                Ok(nanos) => Ok(Cell::Int(nanos.div_euclid(1_000_000))),
                Err(_) => Err(format!("`{s}` is not an RFC 3339 time")),
            },
            _ => self.wrong(Shape::Str(&s)),
        }
    }
}

impl<'de> Visitor<'de> for CellSeed {
    type Value = Result<Cell<'de>, String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(expected(self.0))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(self.scalar(Scalar::Null))
    }

    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(self.scalar(Scalar::Bool(b)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(self.scalar(Scalar::I64(n)))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(self.scalar(Scalar::U64(n)))
    }

    fn visit_f64<E>(self, x: f64) -> Result<Self::Value, E> {
        Ok(self.scalar(Scalar::F64(x)))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(self.scalar(Scalar::Str(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(self.string(Cow::Owned(s.to_string())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq)?;
        Ok(self.wrong(Shape::Array))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map)?;
        Ok(self.wrong(Shape::Object))
    }
}

/// What a JSON value turned out to be, for error messages.
enum Shape<'a> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    Str(&'a str),
    Array,
    Object,
}

impl Shape<'_> {
    fn float(x: f64) -> Self {
        serde_json::Number::from_f64(x).map_or(Shape::Null, Shape::Number)
    }
}

impl fmt::Display for Shape<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Shape::Null => f.write_str("null"),
            Shape::Bool(b) => write!(f, "{b}"),
            Shape::Number(n) => write!(f, "the number {n}"),
            Shape::Str(s) => write!(f, "the string {:?}", truncate(s)),
            Shape::Array => f.write_str("an array"),
            Shape::Object => f.write_str("an object"),
        }
    }
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

    fn append(&mut self, cell: Cell<'_>) {
        match (self, cell) {
            (Column::Str(b), Cell::Str(s)) => b.append_value(&*s),
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
    use proptest::prelude::*;

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

    #[test]
    fn escapes_repeated_names_nesting_and_trailing_bytes_follow_json() {
        let messages: Vec<Option<&[u8]>> = vec![
            Some(br#"{"id":"a\"b\u00e9","n":1,"x":1,"ok":true,"t":1,"id":"last"}"#),
            Some(br#"{"id":"a","n":{"deep":[1,{"x":2}]},"x":1,"ok":true,"t":1}"#),
            Some(br#"{"id":"a","n":1,"x":1,"ok":true,"t":1} trailing"#),
            Some(br#"{"id":5,"n":1,"x":1,"ok":true,"t":1,"broken":}"#),
            Some(br#"{"id":"a","n":18446744073709551615,"x":1,"ok":true,"t":1}"#),
            Some(br#"{"id":"a\"b","n":1,"x":1,"ok":true,"t":1}"#),
            Some(br#"{"t":1,"ok":false,"x":18446744073709551615,"n":-9223372036854775808,"id":""}"#),
            Some(br#"  12.5 "#),
        ];
        let decoded = decoder().decode(&messages);
        assert_eq!(decoded.messages, vec![0, 5, 6]);
        let errors: Vec<(usize, &str)> = decoded.errors.iter().map(|(i, e)| (*i, e.as_str())).collect();
        assert_eq!(errors[0], (1, "field `n`: expected an integer, got an object"));
        assert_eq!(errors[1].0, 2);
        assert!(errors[1].1.starts_with("not valid JSON: trailing characters"), "{errors:?}");
        // A syntax error wins over the type error before it.
        assert_eq!(errors[2].0, 3);
        assert!(errors[2].1.starts_with("not valid JSON"), "{errors:?}");
        assert_eq!(errors[3], (4, "field `n`: expected an integer, got the number 18446744073709551615"));
        assert_eq!(errors[4], (7, "expected a JSON object, got the number 12.5"));
        let ids = decoded.rows.column(0).as_string::<i32>();
        assert_eq!((ids.value(0), ids.value(1), ids.value(2)), ("last", "a\"b", ""));
        let n = decoded.rows.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(n.value(2), i64::MIN);
        let x = decoded.rows.column(2).as_primitive::<Float64Type>();
        assert_eq!(x.value(2), 18446744073709551615u64 as f64);
    }

    /// A cell as a comparable text: floats by their bits.
    fn show(slot: &Slot<'_>) -> String {
        match slot {
            Some(Ok(Cell::Float(x))) => format!("float {:#x}", x.to_bits()),
            other => format!("{other:?}"),
        }
    }

    /// Values awkward for a JSON reader: each is tried in every field by the tests below.
    const AWKWARD: &[&str] = &[
        "null",
        "true",
        "false",
        "nul",
        "-0",
        "-0.0",
        "0",
        "00",
        "01",
        "-01",
        "1.",
        ".5",
        "+1",
        "1e",
        "1e+",
        "-",
        "1E5",
        "1e-5",
        "2.5E+3",
        "0e0",
        "-0e-0",
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "-9223372036854775809",
        "-18446744073709551615",
        "-18446744073709551616",
        "99999999999999999999999",
        "1e308",
        "1.8e308",
        "1e400",
        "-1e400",
        "1e-400",
        "4.9e-324",
        "2.5e-324",
        "0.1000000000000000055511151231257827",
        "9007199254740993",
        "\"NaN\"",
        "\"Infinity\"",
        "\"-Infinity\"",
        "\"1970-01-01T00:00:02.5Z\"",
        "\"yesterday\"",
        "\"\"",
        "\"a\\\"b\"",
        "\"\\u00e9\"",
        "\"é ü\"",
        "\"tab\there\"",
        "[1,2]",
        "{\"a\":1}",
        "[]",
        "{}",
        "\"5\"",
        "\"true\"",
    ];

    fn value_text() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            3 => any::<f64>().prop_map(|x| format!("{x:?}")),
            1 => any::<f64>().prop_map(|x| format!("{x:e}")),
            1 => (-400i32..400, 0u64..1_000_000).prop_map(|(e, m)| format!("{m}e{e}")),
            1 => (0usize..40, 0u64..100).prop_map(|(n, m)| format!("-0.{}{m}", "0".repeat(n))),
            2 => "[a-z0-9 é]{0,8}".prop_map(|s| format!("\"{s}\"")),
            2 => prop::sample::select(AWKWARD).prop_map(str::to_string),
        ]
    }

    /// Awkward values go through both readings in every field, alone and after a valid field.
    #[test]
    fn awkward_values_read_the_same_in_every_field() {
        let decoder = decoder();
        let mut flat_reads = 0;
        for value in AWKWARD {
            for name in ["id", "n", "x", "ok", "t", "other"] {
                for message in [format!("{{\"{name}\":{value}}}"), format!("{{\"id\":\"a\", \"{name}\" : {value} }}")] {
                    let (mut flat, mut full) = (Vec::new(), Vec::new());
                    let full_ok = decoder.parse_full(message.as_bytes(), &mut full).is_ok();
                    if decoder.parse_flat(message.as_bytes(), &mut flat).is_some() {
                        flat_reads += 1;
                        assert!(full_ok, "serde_json refuses {message}");
                        let (flat, full): (Vec<String>, Vec<String>) =
                            (flat.iter().map(show).collect(), full.iter().map(show).collect());
                        assert_eq!(flat, full, "{message}");
                    }
                }
            }
        }
        assert!(flat_reads > 300, "only {flat_reads} messages took the flat reading");
    }

    fn message_text() -> impl Strategy<Value = String> {
        // Besides the schema's names: one spelled with an escape, and names that a schema name
        // begins or that begin one.
        let name = prop::sample::select(vec!["id", "n", "x", "ok", "t", "other", "i\\u0064", "t ", "idd", "i", "x\""]);
        let space = prop::sample::select(vec!["", "", "", " ", "\n\t", "\r "]);
        let field = (name, space.clone(), value_text(), space.clone())
            .prop_map(|(name, s1, value, s2)| format!("{s1}\"{name}\"{s2}:{s1}{value}{s2}"));
        let tail = prop::sample::select(vec!["", "", "", " ", "\n", "x", ",", "}"]);
        (space, prop::collection::vec(field, 0..8), tail)
            .prop_map(|(space, fields, tail)| format!("{space}{{{}}}{space}{tail}", fields.join(",")))
    }

    /// A message with every field, well typed, in a random order, as producers write them.
    fn good_message() -> impl Strategy<Value = String> {
        (
            "[a-z0-9_]{0,12}",
            any::<i64>(),
            any::<f64>().prop_filter("finite", |x| x.is_finite()),
            any::<bool>(),
            any::<u32>(),
            Just(vec![0, 1, 2, 3, 4]).prop_shuffle(),
        )
            .prop_map(|(id, n, x, ok, t, order)| {
                let fields = [
                    format!("\"id\":\"{id}\""),
                    format!("\"n\":{n}"),
                    format!("\"x\":{x:?}"),
                    format!("\"ok\":{ok}"),
                    format!("\"t\":{t}"),
                ];
                let parts: Vec<&str> = order.iter().map(|&i| fields[i].as_str()).collect();
                format!("{{{}}}", parts.join(","))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The word-at-a-time search for a plain string's end finds what a byte-by-byte one
        /// does, wherever the first special byte sits in a word.
        #[test]
        fn plain_strings_end_where_a_byte_by_byte_search_says(
            bytes in prop::collection::vec(prop_oneof![Just(b'"'), Just(b'\\'), 0u8..0x20, 0x20u8..=0xff], 0..40),
            plain in 0usize..40,
        ) {
            let mut bytes = bytes;
            for b in bytes.iter_mut().take(plain) {
                if *b == b'"' || *b == b'\\' || *b < 0x20 {
                    *b = b'a';
                }
            }
            let expected = bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            prop_assert_eq!(string_length(&bytes), expected);
        }

        /// The one-pass reading either leaves a message to serde_json or reads exactly what
        /// serde_json reads: same cells (floats to the bit), same per-field errors.
        #[test]
        fn the_flat_reading_agrees_with_serde_json(message in message_text()) {
            let decoder = decoder();
            let mut flat = Vec::new();
            let mut full = Vec::new();
            let bytes = message.as_bytes();
            if decoder.parse_flat(bytes, &mut flat).is_some() {
                prop_assert!(decoder.parse_full(bytes, &mut full).is_ok(), "serde_json refuses {message:?}");
                let flat: Vec<String> = flat.iter().map(show).collect();
                let full: Vec<String> = full.iter().map(show).collect();
                prop_assert_eq!(flat, full, "{}", message);
            }
        }

        /// Short decimals read by the exact fast path give the bits of a correctly rounding
        /// parser; longer ones are left to it.
        #[test]
        fn short_decimals_read_as_a_correct_parser_reads_them(
            integer in "[0-9]{1,12}",
            fraction in "[0-9]{1,14}",
        ) {
            let expected: f64 = format!("{integer}.{fraction}").parse().unwrap();
            match short_decimal(integer.as_bytes(), fraction.as_bytes()) {
                Some(x) => prop_assert_eq!(x.to_bits(), expected.to_bits(), "{}.{}", integer, fraction),
                None => prop_assert!(integer.len() + fraction.len() > 15, "{}.{} left to the parser", integer, fraction),
            }
        }

        /// Producers' messages never need the second reading.
        #[test]
        fn well_formed_messages_take_the_flat_reading(message in good_message()) {
            let decoder = decoder();
            let mut flat = Vec::new();
            let mut full = Vec::new();
            prop_assert!(decoder.parse_flat(message.as_bytes(), &mut flat).is_some(), "{}", message);
            decoder.parse_full(message.as_bytes(), &mut full).unwrap();
            let flat: Vec<String> = flat.iter().map(show).collect();
            let full: Vec<String> = full.iter().map(show).collect();
            prop_assert_eq!(flat, full, "{}", message);
        }
    }
}
