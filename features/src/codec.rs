//! A compact binary form of partial states, for durable state (the streaming job's changelog).
//!
//! A state decodes to exactly the state that was encoded — exact sums keep every bit — so a job
//! restored from its changelog continues as if it had never stopped. The first byte of every
//! state is a tag; numbers are little-endian.

use crate::aggregate::Partial;
use crate::exact::ExactSum;
use crate::value::Value;

/// Appends `state` to `out`.
pub fn encode_partial(state: &Partial, out: &mut Vec<u8>) {
    match state {
        Partial::Count(n) => {
            out.push(0);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Partial::IntSum { sum, n } => {
            out.push(1);
            out.extend_from_slice(&sum.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
        Partial::FloatSum { sum, n } => {
            out.push(2);
            out.extend_from_slice(&n.to_le_bytes());
            put_exact(sum, out);
        }
        Partial::Moments { n, s1, s2 } => {
            out.push(3);
            out.extend_from_slice(&n.to_le_bytes());
            put_exact(s1, out);
            put_exact(s2, out);
        }
        Partial::Extreme(value) => {
            out.push(4);
            put_option_value(value.as_ref(), out);
        }
        Partial::Ordered(value) => {
            out.push(5);
            match value {
                None => out.push(0),
                Some((time, value)) => {
                    out.push(1);
                    out.extend_from_slice(&time.to_le_bytes());
                    put_value(value, out);
                }
            }
        }
        Partial::Distinct(values) => {
            out.push(6);
            out.extend_from_slice(&(values.len() as u32).to_le_bytes());
            // Sorted, so equal states encode to equal bytes.
            let mut sorted: Vec<(&Value, &u32)> = values.iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (value, count) in sorted {
                put_value(value, out);
                out.extend_from_slice(&count.to_le_bytes());
            }
        }
    }
}

/// Reads one state from the front of `input`, advancing it; `None` when the bytes are not a
/// state this version wrote.
pub fn decode_partial(input: &mut &[u8]) -> Option<Partial> {
    let state = match take_u8(input)? {
        0 => Partial::Count(take_i64(input)?),
        1 => {
            let sum = i128::from_le_bytes(take(input, 16)?.try_into().ok()?);
            Partial::IntSum { sum, n: take_i64(input)? }
        }
        2 => {
            let n = take_i64(input)?;
            Partial::FloatSum { sum: Box::new(take_exact(input)?), n }
        }
        3 => {
            let n = take_i64(input)?;
            let s1 = Box::new(take_exact(input)?);
            Partial::Moments { n, s1, s2: Box::new(take_exact(input)?) }
        }
        4 => Partial::Extreme(take_option_value(input)?),
        5 => match take_u8(input)? {
            0 => Partial::Ordered(None),
            1 => {
                let time = take_i64(input)?;
                Partial::Ordered(Some((time, take_value(input)?)))
            }
            _ => return None,
        },
        6 => {
            let len = take_u32(input)? as usize;
            let mut values =
                crate::aggregate::DistinctValues::with_capacity_and_hasher(len.min(1 << 16), Default::default());
            for _ in 0..len {
                let value = take_value(input)?;
                values.insert(value, take_u32(input)?);
            }
            Partial::Distinct(values)
        }
        _ => return None,
    };
    Some(state)
}

fn put_exact(sum: &ExactSum, out: &mut Vec<u8>) {
    let bytes = sum.to_bytes();
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&bytes);
}

fn take_exact(input: &mut &[u8]) -> Option<ExactSum> {
    let len = take_u32(input)? as usize;
    ExactSum::from_bytes(take(input, len)?)
}

fn put_option_value(value: Option<&Value>, out: &mut Vec<u8>) {
    match value {
        None => out.push(0),
        Some(value) => {
            out.push(1);
            put_value(value, out);
        }
    }
}

fn take_option_value(input: &mut &[u8]) -> Option<Option<Value>> {
    match take_u8(input)? {
        0 => Some(None),
        1 => Some(Some(take_value(input)?)),
        _ => None,
    }
}

/// Appends one value: a type tag, then its payload.
pub fn put_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Bool(b) => {
            out.push(0);
            out.push(*b as u8);
        }
        Value::Int(i) => {
            out.push(1);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Float(x) => {
            out.push(2);
            out.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        Value::Str(s) => {
            out.push(3);
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Value::Time(t) => {
            out.push(4);
            out.extend_from_slice(&t.to_le_bytes());
        }
    }
}

/// Reads one value written by [`put_value`].
pub fn take_value(input: &mut &[u8]) -> Option<Value> {
    Some(match take_u8(input)? {
        0 => Value::Bool(take_u8(input)? != 0),
        1 => Value::Int(take_i64(input)?),
        2 => Value::Float(f64::from_bits(u64::from_le_bytes(take(input, 8)?.try_into().ok()?))),
        3 => {
            let len = take_u32(input)? as usize;
            Value::Str(std::str::from_utf8(take(input, len)?).ok()?.into())
        }
        4 => Value::Time(take_i64(input)?),
        _ => return None,
    })
}

/// Takes `n` bytes from the front of `input`.
pub fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

pub fn take_u8(input: &mut &[u8]) -> Option<u8> {
    Some(take(input, 1)?[0])
}

pub fn take_u32(input: &mut &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(take(input, 4)?.try_into().ok()?))
}

pub fn take_i64(input: &mut &[u8]) -> Option<i64> {
    Some(i64::from_le_bytes(take(input, 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{AggregateSpec, Function};
    use crate::value::{ArgColumn, ValueType};

    fn spec(function: Function, input: ValueType) -> AggregateSpec {
        let output = function.output_type(Some(input)).unwrap();
        AggregateSpec { name: "a".into(), function, input: Some(input), output }
    }

    #[test]
    fn every_state_round_trips_bit_for_bit() {
        let (floats, strings, _) = crate::aggregate::tests::awkward_columns();
        let cases = [
            (spec(Function::Count, ValueType::Float64), &floats),
            (spec(Function::Sum, ValueType::Float64), &floats),
            (spec(Function::Stddev, ValueType::Float64), &floats),
            (spec(Function::Max, ValueType::Float64), &floats),
            (spec(Function::First, ValueType::String), &strings),
            (spec(Function::Last, ValueType::Float64), &floats),
            (spec(Function::CountDistinct, ValueType::String), &strings),
            (spec(Function::Min, ValueType::String), &strings),
        ];
        for (spec, array) in cases {
            let arg = ArgColumn::new(array).unwrap();
            let mut state = Partial::empty(&spec);
            let mut bytes = Vec::new();
            encode_partial(&state, &mut bytes);
            for row in 0..array.len() {
                state.update(spec.function, Some(&arg), row, 100 - row as i64);
                encode_partial(&state, &mut bytes);
            }
            let mut input = bytes.as_slice();
            let mut decoded = Partial::empty(&spec);
            for _ in 0..=array.len() {
                decoded = decode_partial(&mut input).expect("decodes");
            }
            assert!(input.is_empty(), "{:?}: trailing bytes", spec.function);
            crate::aggregate::tests::assert_same_state(&decoded, &state, &spec, "decoded");
        }
    }

    #[test]
    fn truncated_or_unknown_bytes_are_refused() {
        let mut bytes = Vec::new();
        encode_partial(&Partial::Ordered(Some((5, Value::Str("abc".into())))), &mut bytes);
        for cut in 0..bytes.len() {
            assert!(decode_partial(&mut &bytes[..cut]).is_none(), "cut at {cut}");
        }
        assert!(decode_partial(&mut [9u8].as_slice()).is_none());
    }
}
