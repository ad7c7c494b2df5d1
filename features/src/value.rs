//! The column types a definitions file speaks of, and single values of them as aggregates keep
//! them (min, max, first, last, distinct).

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayBuilder, ArrayRef, BooleanArray, BooleanBuilder, Float64Array, Float64Builder, Int64Array,
    Int64Builder, PrimitiveBuilder, StringArray, StringBuilder, TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, TimeUnit};
use compact_str::CompactString;

use crate::aggregate::ValueSink;

/// A column type in a definitions file: `string | int64 | float64 | bool | timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ValueType {
    String,
    Int64,
    Float64,
    Bool,
    /// Milliseconds since the Unix epoch, UTC.
    Timestamp,
}

impl ValueType {
    /// Every type, in the order the documentation lists them.
    pub const ALL: [ValueType; 5] =
        [ValueType::String, ValueType::Int64, ValueType::Float64, ValueType::Bool, ValueType::Timestamp];

    /// The name used in definitions files.
    pub fn name(self) -> &'static str {
        match self {
            ValueType::String => "string",
            ValueType::Int64 => "int64",
            ValueType::Float64 => "float64",
            ValueType::Bool => "bool",
            ValueType::Timestamp => "timestamp",
        }
    }

    /// Reads a type name from a definitions file.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The Arrow type lockstep uses for this column in its own outputs and decoded streams.
    pub fn arrow_type(self) -> DataType {
        match self {
            ValueType::String => DataType::Utf8,
            ValueType::Int64 => DataType::Int64,
            ValueType::Float64 => DataType::Float64,
            ValueType::Bool => DataType::Boolean,
            ValueType::Timestamp => timestamp_type(),
        }
    }

    /// The lockstep type an Arrow type is read as, if any: every integer width reads as int64,
    /// every float as float64, every string flavour as string, every timestamp unit as timestamp.
    pub fn of_arrow(data_type: &DataType) -> Option<Self> {
        match data_type {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Some(ValueType::String),
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32 => Some(ValueType::Int64),
            DataType::Float16 | DataType::Float32 | DataType::Float64 => Some(ValueType::Float64),
            DataType::Boolean => Some(ValueType::Bool),
            DataType::Timestamp(_, _) => Some(ValueType::Timestamp),
            _ => None,
        }
    }

    /// True for the types `sum`, `avg`, `stddev` and `var` accept.
    pub fn is_numeric(self) -> bool {
        matches!(self, ValueType::Int64 | ValueType::Float64)
    }
}

/// Timestamps in lockstep outputs: milliseconds, UTC.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// One non-null value of a column, as min/max/first/last/distinct keep it.
///
/// Values of one aggregate always share a type. Order is SQL's, made total: floats order with NaN
/// above every number and −0.0 just below +0.0; strings by bytes; `false < true`. Floats are kept
/// canonical (one NaN), so equal values have equal bits.
#[derive(Debug, Clone)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Inline up to 24 bytes: distinct sets compare and copy short strings without a pointer.
    Str(CompactString),
    Time(i64),
}

impl Value {
    /// A float value with NaN made canonical, so its bits do not depend on which NaN arrived.
    pub fn float(x: f64) -> Self {
        Value::Float(canonical(x))
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) | (Value::Time(a), Value::Time(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => match (a.is_nan(), b.is_nan()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => a.total_cmp(b),
            },
            (Value::Str(a), Value::Str(b)) => a.as_bytes().cmp(b.as_bytes()),
            // Values of one aggregate share a type; across types order by type for totality.
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl Value {
    fn rank(&self) -> u8 {
        match self {
            Value::Bool(_) => 0,
            Value::Int(_) => 1,
            Value::Float(_) => 2,
            Value::Str(_) => 3,
            Value::Time(_) => 4,
        }
    }
}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.as_ref() == other.as_ref()
    }
}

impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state);
    }
}

impl From<&ValueRef<'_>> for Value {
    fn from(value: &ValueRef<'_>) -> Self {
        match *value {
            ValueRef::Bool(b) => Value::Bool(b),
            ValueRef::Int(i) => Value::Int(i),
            ValueRef::Float(x) => Value::float(x),
            ValueRef::Str(s) => Value::Str(s.into()),
            ValueRef::Time(t) => Value::Time(t),
        }
    }
}

impl Value {
    /// The value borrowed: equal and hashed alike, so sets of values can be probed without an
    /// owned copy.
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Bool(b) => ValueRef::Bool(*b),
            Value::Int(i) => ValueRef::Int(*i),
            Value::Float(x) => ValueRef::Float(*x),
            Value::Str(s) => ValueRef::Str(s),
            Value::Time(t) => ValueRef::Time(*t),
        }
    }
}

/// `x` with NaN made canonical.
fn canonical(x: f64) -> f64 {
    if x.is_nan() { f64::NAN } else { x }
}

/// A [`Value`] borrowed from a column or a value; equality and hashing are `Value`'s (floats by
/// bits, every NaN one value).
#[derive(Debug, Clone, Copy)]
pub enum ValueRef<'a> {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    Time(i64),
}

impl ValueRef<'_> {
    /// The value as `count(distinct ...)` compares it: also −0.0 counts as +0.0.
    pub fn for_distinct(self) -> Self {
        match self {
            ValueRef::Float(0.0) => ValueRef::Float(0.0),
            other => other,
        }
    }
}

impl PartialEq for ValueRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ValueRef::Bool(a), ValueRef::Bool(b)) => a == b,
            (ValueRef::Int(a), ValueRef::Int(b)) | (ValueRef::Time(a), ValueRef::Time(b)) => a == b,
            (ValueRef::Float(a), ValueRef::Float(b)) => (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits(),
            (ValueRef::Str(a), ValueRef::Str(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for ValueRef<'_> {}

impl Hash for ValueRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            ValueRef::Bool(b) => (0u8, b).hash(state),
            ValueRef::Int(i) => (1u8, i).hash(state),
            ValueRef::Float(x) => (2u8, canonical(*x).to_bits()).hash(state),
            ValueRef::Str(s) => (3u8, s).hash(state),
            ValueRef::Time(t) => (4u8, t).hash(state),
        }
    }
}

impl hashbrown::Equivalent<Value> for ValueRef<'_> {
    fn equivalent(&self, key: &Value) -> bool {
        *self == key.as_ref()
    }
}

/// An aggregate's input column, typed; built from the compiled argument expression's output.
#[derive(Debug, Clone, Copy)]
pub enum ArgColumn<'a> {
    Bool(&'a BooleanArray),
    Int(&'a Int64Array),
    Float(&'a Float64Array),
    Str(&'a StringArray),
    Time(&'a TimestampMillisecondArray),
}

impl<'a> ArgColumn<'a> {
    /// Views an evaluated argument array; `None` when its Arrow type is not one the compiler emits.
    pub fn new(array: &'a ArrayRef) -> Option<Self> {
        let any = array.as_any();
        Some(match array.data_type() {
            DataType::Boolean => ArgColumn::Bool(any.downcast_ref()?),
            DataType::Int64 => ArgColumn::Int(any.downcast_ref()?),
            DataType::Float64 => ArgColumn::Float(any.downcast_ref()?),
            DataType::Utf8 => ArgColumn::Str(any.downcast_ref()?),
            DataType::Timestamp(TimeUnit::Millisecond, _) => ArgColumn::Time(any.downcast_ref()?),
            _ => return None,
        })
    }

    /// True when row `row` is null.
    pub fn is_null(&self, row: usize) -> bool {
        match self {
            ArgColumn::Bool(a) => a.is_null(row),
            ArgColumn::Int(a) => a.is_null(row),
            ArgColumn::Float(a) => a.is_null(row),
            ArgColumn::Str(a) => a.is_null(row),
            ArgColumn::Time(a) => a.is_null(row),
        }
    }

    /// The value at a non-null row.
    pub fn value(&self, row: usize) -> Value {
        Value::from(&self.value_ref(row))
    }

    /// The value at a non-null row, borrowed from the column.
    pub fn value_ref(&self, row: usize) -> ValueRef<'a> {
        match self {
            ArgColumn::Bool(a) => ValueRef::Bool(a.value(row)),
            ArgColumn::Int(a) => ValueRef::Int(a.value(row)),
            ArgColumn::Float(a) => ValueRef::Float(canonical(a.value(row))),
            ArgColumn::Str(a) => ValueRef::Str(a.value(row)),
            ArgColumn::Time(a) => ValueRef::Time(a.value(row)),
        }
    }

    /// The value at a non-null row of a numeric column, as a double.
    pub fn f64(&self, row: usize) -> f64 {
        match self {
            ArgColumn::Int(a) => a.value(row) as f64,
            ArgColumn::Float(a) => a.value(row),
            _ => f64::NAN,
        }
    }

    /// The value at a non-null row of an int64 column.
    pub fn i64(&self, row: usize) -> i64 {
        match self {
            ArgColumn::Int(a) => a.value(row),
            _ => 0,
        }
    }
}

/// A final aggregate value, ready to append to an output column.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Null,
    Int(i64),
    Float(f64),
    Value(Value),
}

/// Builds one output column of a given type; aggregates write to it as a [`ValueSink`].
pub enum OutputColumn {
    Bool(BooleanBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Str(StringBuilder),
    Time(TimestampMillisecondBuilder),
}

impl OutputColumn {
    /// An empty column of `value_type`.
    pub fn new(value_type: ValueType, capacity: usize) -> Self {
        match value_type {
            ValueType::Bool => OutputColumn::Bool(BooleanBuilder::with_capacity(capacity)),
            ValueType::Int64 => OutputColumn::Int(Int64Builder::with_capacity(capacity)),
            ValueType::Float64 => OutputColumn::Float(Float64Builder::with_capacity(capacity)),
            ValueType::String => OutputColumn::Str(StringBuilder::with_capacity(capacity, capacity * 8)),
            ValueType::Timestamp => {
                OutputColumn::Time(TimestampMillisecondBuilder::with_capacity(capacity).with_timezone("UTC"))
            }
        }
    }

    /// Appends the last value `n` more times (nulls if it was null). The column must not be
    /// empty.
    pub fn repeat_last(&mut self, n: usize) {
        let last = self.len() - 1;
        self.repeat_row(last, n);
    }

    /// Appends the value at `row` (an existing row) `n` times, or `n` nulls if it is null.
    pub fn repeat_row(&mut self, row: usize, n: usize) {
        fn is_null(validity: Option<&[u8]>, row: usize) -> bool {
            validity.is_some_and(|bits| !arrow::util::bit_util::get_bit(bits, row))
        }
        if n == 0 {
            return;
        }
        match self {
            OutputColumn::Bool(b) => {
                if is_null(b.validity_slice(), row) {
                    b.append_nulls(n);
                } else {
                    let value = arrow::util::bit_util::get_bit(b.values_slice(), row);
                    b.append_n(n, value);
                }
            }
            OutputColumn::Int(b) => repeat_primitive(b, row, n),
            OutputColumn::Float(b) => repeat_primitive(b, row, n),
            OutputColumn::Time(b) => repeat_primitive(b, row, n),
            OutputColumn::Str(b) => {
                if is_null(b.validity_slice(), row) {
                    b.append_nulls(n);
                } else {
                    let offsets = b.offsets_slice();
                    let (from, to) = (offsets[row] as usize, offsets[row + 1] as usize);
                    let value = std::str::from_utf8(&b.values_slice()[from..to])
                        .expect("a string column holds UTF-8")
                        .to_string();
                    for _ in 0..n {
                        b.append_value(&value);
                    }
                }
            }
        }

        fn repeat_primitive<T: arrow::datatypes::ArrowPrimitiveType>(
            b: &mut PrimitiveBuilder<T>,
            row: usize,
            n: usize,
        ) {
            if is_null(b.validity_slice(), row) {
                b.append_nulls(n);
            } else {
                let value = b.values_slice()[row];
                b.append_value_n(value, n);
            }
        }
    }

    /// Number of values appended.
    fn len(&self) -> usize {
        match self {
            OutputColumn::Bool(b) => b.len(),
            OutputColumn::Int(b) => b.len(),
            OutputColumn::Float(b) => b.len(),
            OutputColumn::Str(b) => b.len(),
            OutputColumn::Time(b) => b.len(),
        }
    }

    /// The finished Arrow array.
    pub fn finish(&mut self) -> ArrayRef {
        match self {
            OutputColumn::Bool(b) => Arc::new(b.finish()),
            OutputColumn::Int(b) => Arc::new(b.finish()),
            OutputColumn::Float(b) => Arc::new(b.finish()),
            OutputColumn::Str(b) => Arc::new(b.finish()),
            OutputColumn::Time(b) => Arc::new(b.finish()),
        }
    }
}

impl ValueSink for OutputColumn {
    fn int(&mut self, value: i64) {
        match self {
            OutputColumn::Int(b) => b.append_value(value),
            other => other.null(),
        }
    }

    fn float(&mut self, value: f64) {
        match self {
            OutputColumn::Float(b) => b.append_value(value),
            other => other.null(),
        }
    }

    fn value(&mut self, value: &Value) {
        match (self, value) {
            (OutputColumn::Bool(b), Value::Bool(v)) => b.append_value(*v),
            (OutputColumn::Int(b), Value::Int(v)) => b.append_value(*v),
            (OutputColumn::Float(b), Value::Float(v)) => b.append_value(*v),
            (OutputColumn::Str(b), Value::Str(v)) => b.append_value(v),
            (OutputColumn::Time(b), Value::Time(v)) => b.append_value(*v),
            // The aggregate's output type matches its values; anything else is a null.
            (column, _) => column.null(),
        }
    }

    fn null(&mut self) {
        match self {
            OutputColumn::Bool(b) => b.append_null(),
            OutputColumn::Int(b) => b.append_null(),
            OutputColumn::Float(b) => b.append_null(),
            OutputColumn::Str(b) => b.append_null(),
            OutputColumn::Time(b) => b.append_null(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeating_a_value_copies_it_or_its_null() {
        let values = [
            (ValueType::Bool, Value::Bool(true)),
            (ValueType::Int64, Value::Int(-7)),
            (ValueType::Float64, Value::float(f64::NAN)),
            (ValueType::String, Value::Str("käse".into())),
            (ValueType::Timestamp, Value::Time(-1)),
        ];
        for (value_type, value) in values {
            let mut column = OutputColumn::new(value_type, 4);
            column.value(&value);
            column.repeat_last(1);
            column.null();
            column.repeat_last(2);
            column.repeat_last(0);
            column.value(&value);
            column.repeat_last(3);
            column.repeat_row(2, 1);
            column.repeat_row(0, 2);
            let array = column.finish();
            let nulls: Vec<bool> = (0..array.len()).map(|i| array.is_null(i)).collect();
            let expected = [false, false, true, true, true, false, false, false, false, true, false, false];
            assert_eq!(nulls, expected, "{value_type:?}");
            let column = ArgColumn::new(&array).expect("an output column reads as an argument column");
            for row in [0, 1, 5, 6, 7, 8, 10, 11] {
                assert_eq!(column.value(row), value, "{value_type:?} row {row}");
            }
        }
    }

    #[test]
    fn floats_order_totally_with_nan_on_top() {
        let mut values = [
            Value::float(f64::NAN),
            Value::float(1.0),
            Value::float(-0.0),
            Value::float(0.0),
            Value::float(f64::NEG_INFINITY),
        ];
        values.sort();
        let bits: Vec<u64> = values
            .iter()
            .map(|v| match v {
                Value::Float(x) => x.to_bits(),
                _ => 0,
            })
            .collect();
        assert_eq!(
            bits,
            vec![
                f64::NEG_INFINITY.to_bits(),
                (-0.0f64).to_bits(),
                0.0f64.to_bits(),
                1.0f64.to_bits(),
                f64::NAN.to_bits()
            ]
        );
        assert_eq!(ValueRef::Float(-0.0).for_distinct(), ValueRef::Float(0.0));
        assert_ne!(ValueRef::Float(-0.0), ValueRef::Float(0.0));
        assert_eq!(Value::float(f64::from_bits(0x7ff8_0000_0000_0001)), Value::float(f64::NAN));
    }

    #[test]
    fn borrowed_values_hash_and_compare_as_owned_ones() {
        use std::hash::BuildHasher;
        let state = foldhash::fast::FixedState::default();
        let odd_nan = f64::from_bits(0x7ff8_0000_0000_0001);
        let floats = Float64Array::from(vec![odd_nan, -0.0, 2.5]);
        let strings = StringArray::from(vec!["", "m00085", "é"]);
        let (floats, strings): (ArrayRef, ArrayRef) = (Arc::new(floats), Arc::new(strings));
        for column in [&floats, &strings] {
            let column = ArgColumn::new(column).unwrap();
            for row in 0..3 {
                let (owned, borrowed) = (column.value(row), column.value_ref(row));
                assert_eq!(owned.as_ref(), borrowed);
                assert_eq!(state.hash_one(&owned), state.hash_one(borrowed));
                assert!(hashbrown::Equivalent::equivalent(&borrowed, &owned));
            }
        }
        assert_eq!(ArgColumn::new(&floats).unwrap().value(0), Value::Float(f64::NAN));
        assert_ne!(Value::Int(1), Value::Time(1));
    }

    #[test]
    fn arrow_types_map_to_definition_types() {
        assert_eq!(ValueType::of_arrow(&DataType::Utf8View), Some(ValueType::String));
        assert_eq!(ValueType::of_arrow(&DataType::Int32), Some(ValueType::Int64));
        assert_eq!(ValueType::of_arrow(&DataType::Timestamp(TimeUnit::Nanosecond, None)), Some(ValueType::Timestamp));
        assert_eq!(ValueType::of_arrow(&DataType::UInt64), None);
        assert_eq!(ValueType::parse("float64"), Some(ValueType::Float64));
        assert_eq!(ValueType::parse("double"), None);
    }
}
