//! The one implementation of every aggregate, as mergeable, order-independent partial states.
//!
//! Like DataFusion's `Accumulator` (`update_batch` → `state` → `merge_batch` → `evaluate`), an
//! aggregate here has four steps:
//!
//! ```text
//!   events ──update──▶ Partial (a pane)  ──merge──▶ Partial (a window) ──evaluate──▶ Output
//!                                        ◀─retract─  (invertible kinds)
//! ```
//!
//! A pane of a sliding window *is* a partial state, and a window is the merge of its panes. Batch
//! and stream both go through these steps with this code, so they can only disagree on which
//! events they saw. Every partial state is exact (integers, [`ExactSum`], sets and orderings), so
//! the final value does not depend on event order or on how the events were split into panes,
//! partitions, files or restarts.
//!
//! [`Sliding`] keeps a window over a FIFO of panes: invertible aggregates subtract the pane that
//! leaves; min/max/first/last keep a monotonic deque of pane extremes, so each pane enters and
//! leaves once and a window costs O(1) amortized, whatever `size / every` is.

use std::collections::VecDeque;

use hashbrown::HashMap;
use hashbrown::hash_map::EntryRef;

use crate::exact::ExactSum;
use crate::value::{ArgColumn, Output, Value, ValueType};

/// The aggregate functions of SPEC §1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Function {
    /// `count(*)`: rows.
    CountStar,
    /// `count(x)`: non-null values.
    Count,
    /// `count(distinct x)`: distinct non-null values.
    CountDistinct,
    /// `sum(x)`: int64 (overflow is an error) or exactly rounded float64.
    Sum,
    /// `avg(x)`: exact sum / count, float64.
    Avg,
    Min,
    Max,
    /// `first(x)`: the value with the earliest event time; ties take the smaller value.
    First,
    /// `last(x)`: the value with the latest event time; ties take the larger value.
    Last,
    /// `stddev(x)`: sample standard deviation (n − 1).
    Stddev,
    /// `var(x)`: sample variance (n − 1).
    Var,
}

impl Function {
    /// Looks a function up by its SQL name (lower case). `count` is resolved by the caller.
    pub fn by_name(name: &str) -> Option<Self> {
        Some(match name {
            "count" => Function::Count,
            "sum" => Function::Sum,
            "avg" | "mean" => Function::Avg,
            "min" => Function::Min,
            "max" => Function::Max,
            "first" | "first_value" => Function::First,
            "last" | "last_value" => Function::Last,
            "stddev" | "stddev_samp" => Function::Stddev,
            "var" | "variance" | "var_samp" => Function::Var,
            _ => return None,
        })
    }

    /// The names accepted in definitions files, for error messages.
    pub const NAMES: &'static str =
        "count(*), count(x), count(distinct x), sum, avg, min, max, first, last, stddev, var";

    /// The output type for an argument of type `input` (`None` for `count(*)`), or why not.
    pub fn output_type(self, input: Option<ValueType>) -> Result<ValueType, String> {
        use Function::*;
        match (self, input) {
            (CountStar | Count | CountDistinct, _) => Ok(ValueType::Int64),
            (Sum, Some(t @ (ValueType::Int64 | ValueType::Float64))) => Ok(t),
            (Avg | Stddev | Var, Some(ValueType::Int64 | ValueType::Float64)) => Ok(ValueType::Float64),
            (Min | Max | First | Last, Some(t)) => Ok(t),
            (Sum | Avg | Stddev | Var, Some(t)) => Err(format!(
                "{} needs a numeric argument (int64 or float64), but the argument is {}",
                self.sql_name(),
                t.name()
            )),
            (_, None) => Err(format!("{} needs one argument", self.sql_name())),
        }
    }

    /// The SQL name, for messages.
    pub fn sql_name(self) -> &'static str {
        match self {
            Function::CountStar => "count(*)",
            Function::Count => "count",
            Function::CountDistinct => "count(distinct)",
            Function::Sum => "sum",
            Function::Avg => "avg",
            Function::Min => "min",
            Function::Max => "max",
            Function::First => "first",
            Function::Last => "last",
            Function::Stddev => "stddev",
            Function::Var => "var",
        }
    }
}

/// One compiled aggregation: its output name, function, argument type and output type.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AggregateSpec {
    pub name: String,
    pub function: Function,
    /// The argument's type; `None` for `count(*)`.
    pub input: Option<ValueType>,
    pub output: ValueType,
}

/// Why a final value could not be produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggregateError {
    #[error(
        "sum `{name}` overflows int64 (exact value {value}); sum a float64 expression instead, e.g. sum(CAST(x AS DOUBLE))"
    )]
    SumOverflow { name: String, value: i128 },
}

impl AggregateError {
    #[cold]
    fn overflow(spec: &AggregateSpec, value: i128) -> Self {
        AggregateError::SumOverflow { name: spec.name.clone(), value }
    }
}

/// The values of a `count(distinct)` state, with how many merged states hold each. Hashed with
/// foldhash: these maps are probed once per event and per pane merge, and SipHash's resistance
/// to chosen keys buys nothing for a state that lives one window.
pub type DistinctValues = HashMap<Value, u32, foldhash::fast::RandomState>;

/// The partial state of one aggregate over some events (a pane, a window, a session).
#[derive(Debug, Clone, PartialEq)]
pub enum Partial {
    Count(i64),
    IntSum {
        sum: i128,
        n: i64,
    },
    FloatSum {
        sum: Box<ExactSum>,
        n: i64,
    },
    /// Count, exact Σx and exact Σx² (each square added as an exact two-product).
    Moments {
        n: i64,
        s1: Box<ExactSum>,
        s2: Box<ExactSum>,
    },
    Extreme(Option<Value>),
    /// (event time, value) of the first or last event.
    Ordered(Option<(i64, Value)>),
    /// Distinct values; the count is how many merged partial states hold the value, so a pane
    /// can be retracted.
    Distinct(DistinctValues),
}

impl Partial {
    /// The empty state of `spec`.
    pub fn empty(spec: &AggregateSpec) -> Self {
        use Function::*;
        match (spec.function, spec.input) {
            (CountStar | Count, _) => Partial::Count(0),
            (Sum | Avg, Some(ValueType::Int64)) => Partial::IntSum { sum: 0, n: 0 },
            (Sum | Avg, _) => Partial::FloatSum { sum: Box::default(), n: 0 },
            (Stddev | Var, _) => Partial::Moments { n: 0, s1: Box::default(), s2: Box::default() },
            (Min | Max, _) => Partial::Extreme(None),
            (First | Last, _) => Partial::Ordered(None),
            (CountDistinct, _) => Partial::Distinct(DistinctValues::default()),
        }
    }

    /// Empties the state (equal to [`Partial::empty`] of its aggregate), keeping its storage
    /// (exact-sum limbs, distinct sets) for reuse.
    pub fn clear(&mut self) {
        match self {
            Partial::Count(n) => *n = 0,
            Partial::IntSum { sum, n } => (*sum, *n) = (0, 0),
            Partial::FloatSum { sum, n } => {
                sum.clear();
                *n = 0;
            }
            Partial::Moments { n, s1, s2 } => {
                *n = 0;
                s1.clear();
                s2.clear();
            }
            Partial::Extreme(value) => *value = None,
            Partial::Ordered(value) => *value = None,
            Partial::Distinct(values) => values.clear(),
        }
    }

    /// Adds one event (row `row` of `arg`, at event time `time`).
    ///
    /// `arg` is `None` only for `count(*)`. Rows the aggregate's `FILTER` rejects are never passed.
    pub fn update(&mut self, function: Function, arg: Option<&ArgColumn<'_>>, row: usize, time: i64) {
        if let Partial::Count(n) = self {
            if function == Function::CountStar || arg.is_some_and(|a| !a.is_null(row)) {
                *n += 1;
            }
            return;
        }
        let Some(arg) = arg.filter(|a| !a.is_null(row)) else { return };
        match self {
            Partial::Count(_) => {}
            Partial::IntSum { sum, n } => {
                *sum += arg.i64(row) as i128;
                *n += 1;
            }
            Partial::FloatSum { sum, n } => {
                sum.add(arg.f64(row));
                *n += 1;
            }
            Partial::Moments { n, s1, s2 } => {
                let x = arg.f64(row);
                s1.add(x);
                s2.add_product(x, x);
                *n += 1;
            }
            Partial::Extreme(current) => {
                let value = arg.value(row);
                let better = match current {
                    None => true,
                    Some(old) if function == Function::Min => value < *old,
                    Some(old) => value > *old,
                };
                if better {
                    *current = Some(value);
                }
            }
            Partial::Ordered(current) => {
                let candidate = (time, arg.value(row));
                if current.as_ref().is_none_or(|old| ordered_wins(function, &candidate, old)) {
                    *current = Some(candidate);
                }
            }
            Partial::Distinct(values) => {
                let value = arg.value_ref(row).for_distinct();
                if let EntryRef::Vacant(vacant) = values.entry_ref(&value) {
                    vacant.insert_with_key(Value::from(&value), 1);
                }
            }
        }
    }

    /// Merges another partial state of the same aggregate into this one.
    pub fn merge(&mut self, function: Function, other: &Partial) {
        match (self, other) {
            (Partial::Count(a), Partial::Count(b)) => *a += b,
            (Partial::IntSum { sum, n }, Partial::IntSum { sum: s, n: m }) => {
                *sum += s;
                *n += m;
            }
            (Partial::FloatSum { sum, n }, Partial::FloatSum { sum: s, n: m }) => {
                sum.merge(s);
                *n += m;
            }
            (Partial::Moments { n, s1, s2 }, Partial::Moments { n: m, s1: t1, s2: t2 }) => {
                *n += m;
                s1.merge(t1);
                s2.merge(t2);
            }
            (Partial::Extreme(current), Partial::Extreme(Some(value))) => {
                let better = match current {
                    None => true,
                    Some(old) if function == Function::Min => value < old,
                    Some(old) => value > old,
                };
                if better {
                    *current = Some(value.clone());
                }
            }
            (Partial::Ordered(current), Partial::Ordered(Some(candidate)))
                if current.as_ref().is_none_or(|old| ordered_wins(function, candidate, old)) =>
            {
                *current = Some(candidate.clone());
            }
            (Partial::Distinct(values), Partial::Distinct(other)) => {
                for (value, count) in other {
                    // Clone a value only when it is new to this state.
                    values.entry_ref(value).and_modify(|held| *held += count).or_insert(*count);
                }
            }
            _ => {}
        }
    }

    /// Removes a partial state previously merged in. Only for invertible states; min, max,
    /// first and last are kept by [`Sliding`] instead.
    fn retract(&mut self, other: &Partial) {
        match (self, other) {
            (Partial::Count(a), Partial::Count(b)) => *a -= b,
            (Partial::IntSum { sum, n }, Partial::IntSum { sum: s, n: m }) => {
                *sum -= s;
                *n -= m;
            }
            (Partial::FloatSum { sum, n }, Partial::FloatSum { sum: s, n: m }) => {
                sum.retract(s);
                *n -= m;
            }
            (Partial::Moments { n, s1, s2 }, Partial::Moments { n: m, s1: t1, s2: t2 }) => {
                *n -= m;
                s1.retract(t1);
                s2.retract(t2);
            }
            (Partial::Distinct(values), Partial::Distinct(other)) => {
                for (value, count) in other {
                    if let EntryRef::Occupied(mut held) = values.entry_ref(value) {
                        *held.get_mut() -= count;
                        if *held.get() == 0 {
                            held.remove();
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// The final value.
    pub fn evaluate(&self, spec: &AggregateSpec) -> Result<Output, AggregateError> {
        let mut output = Output::Null;
        self.emit(spec, &mut output)?;
        Ok(output)
    }

    /// Writes the final value to `sink` (an output column, or an [`Output`]).
    pub fn emit(&self, spec: &AggregateSpec, sink: &mut impl ValueSink) -> Result<(), AggregateError> {
        match self {
            Partial::Count(n) => sink.int(*n),
            Partial::IntSum { n: 0, .. } | Partial::FloatSum { n: 0, .. } => sink.null(),
            Partial::IntSum { sum, n } => match spec.function {
                Function::Avg => sink.float(*sum as f64 / *n as f64),
                _ => sink.int(i64::try_from(*sum).map_err(|_| AggregateError::overflow(spec, *sum))?),
            },
            Partial::FloatSum { sum, n } => match spec.function {
                Function::Avg => sink.float(sum.to_f64() / *n as f64),
                _ => sink.float(sum.to_f64()),
            },
            Partial::Moments { n, s1, s2 } => match sample_variance(*n, s1, s2) {
                None => sink.null(),
                Some(var) if spec.function == Function::Stddev => sink.float(var.sqrt()),
                Some(var) => sink.float(var),
            },
            Partial::Extreme(Some(value)) | Partial::Ordered(Some((_, value))) => sink.value(value),
            Partial::Extreme(None) | Partial::Ordered(None) => sink.null(),
            Partial::Distinct(values) => sink.int(values.len() as i64),
        }
        Ok(())
    }
}

/// Where final values go: typed output columns in the jobs, a single [`Output`] in tests.
pub trait ValueSink {
    fn int(&mut self, value: i64);
    fn float(&mut self, value: f64);
    fn value(&mut self, value: &Value);
    fn null(&mut self);
}

impl ValueSink for Output {
    fn int(&mut self, value: i64) {
        *self = Output::Int(value);
    }
    fn float(&mut self, value: f64) {
        *self = Output::Float(value);
    }
    fn value(&mut self, value: &Value) {
        *self = Output::Value(value.clone());
    }
    fn null(&mut self) {
        *self = Output::Null;
    }
}

/// Whether `candidate` replaces `current` as the first (earliest, then smallest) or last (latest,
/// then largest) event.
fn ordered_wins(function: Function, candidate: &(i64, Value), current: &(i64, Value)) -> bool {
    if function == Function::First { candidate < current } else { candidate > current }
}

/// Sample variance from a count and exact Σx, Σx²; `None` for fewer than two values.
///
/// NaN when any value is NaN or infinite, or when a square overflows the double range
/// (|x| ≥ 2⁵¹²), as the textbook formula gives in IEEE arithmetic. Squares of values below 2⁻⁵¹¹
/// lose bits to underflow, so such variances are accurate to about 1e-300 absolute.
///
/// Σ(x − m)² = Σx² − 2mΣx + n·m² holds for any m; with m = round(Σx)/n and every product added
/// as an exact two-product, the only rounding before the final one is Σx's tail beyond a
/// double-double (relative 2⁻¹⁰⁶), so the result is accurate and — the point — a function of the
/// exact partial sums alone, never of event order.
fn sample_variance(n: i64, s1: &ExactSum, s2: &ExactSum) -> Option<f64> {
    if n < 2 {
        return None;
    }
    let head = s1.to_f64();
    let squares = s2.to_f64();
    if !head.is_finite() || !squares.is_finite() {
        return Some(f64::NAN);
    }
    let mut tail = s1.clone();
    tail.sub(head);
    let tail = tail.to_f64();
    let count = n as f64;
    let mean = head / count;
    let mut m2 = s2.clone();
    m2.add_product(-2.0 * mean, head);
    m2.add_product(-2.0 * mean, tail);
    let mean_sq = mean * mean;
    let mean_sq_err = mean.mul_add(mean, -mean_sq);
    m2.add_product(count, mean_sq);
    m2.add_product(count, mean_sq_err);
    // Σ(x − m)² exceeds Σ(x − x̄)² by n·(x̄ − m)² = r²/n with r = Σx − n·m (exact, tiny): without
    // this, identical values would get a variance of a few ulps² instead of zero.
    let mut residual = s1.clone();
    residual.add_product(-count, mean);
    let residual = residual.to_f64();
    m2.add_product(-residual, residual / count);
    Some(m2.to_f64().max(0.0) / (count - 1.0))
}

/// One aggregate over a sliding window of panes that enter at the back and leave at the front,
/// in pane order (a FIFO).
#[derive(Debug, Clone)]
pub enum Sliding {
    /// Count, sums, moments and distinct: merge on entry, retract on exit.
    Invertible(Partial),
    /// Min/max/first/last: a deque of (pane, pane extreme), kept monotonic so its front is the
    /// window's answer.
    Monotonic(VecDeque<(i64, Partial)>),
}

impl Sliding {
    /// An empty window for `spec`.
    pub fn new(spec: &AggregateSpec) -> Self {
        match Partial::empty(spec) {
            Partial::Extreme(_) | Partial::Ordered(_) => Sliding::Monotonic(VecDeque::new()),
            invertible => Sliding::Invertible(invertible),
        }
    }

    /// Min, max, first or last: panes must enter and leave in order.
    pub fn is_monotonic(&self) -> bool {
        matches!(self, Sliding::Monotonic(_))
    }

    /// Pane `pane` enters at the back.
    pub fn push(&mut self, function: Function, pane: i64, state: &Partial) {
        match self {
            Sliding::Invertible(window) => window.merge(function, state),
            Sliding::Monotonic(deque) => {
                if matches!(state, Partial::Extreme(None) | Partial::Ordered(None)) {
                    return;
                }
                while let Some((_, back)) = deque.back() {
                    if dominates(function, state, back) {
                        deque.pop_back();
                    } else {
                        break;
                    }
                }
                deque.push_back((pane, state.clone()));
            }
        }
    }

    /// Pane `pane` (the oldest still in the window) leaves at the front.
    pub fn pop(&mut self, pane: i64, state: &Partial) {
        match self {
            Sliding::Invertible(window) => window.retract(state),
            Sliding::Monotonic(deque) => {
                if deque.front().is_some_and(|(front, _)| *front == pane) {
                    deque.pop_front();
                }
            }
        }
    }

    /// The window's final value.
    pub fn evaluate(&self, spec: &AggregateSpec) -> Result<Output, AggregateError> {
        let mut output = Output::Null;
        self.emit(spec, &mut output)?;
        Ok(output)
    }

    /// Writes the window's final value to `sink`.
    pub fn emit(&self, spec: &AggregateSpec, sink: &mut impl ValueSink) -> Result<(), AggregateError> {
        match self {
            Sliding::Invertible(window) => window.emit(spec, sink),
            Sliding::Monotonic(deque) => match deque.front() {
                Some((_, state)) => state.emit(spec, sink),
                None => {
                    sink.null();
                    Ok(())
                }
            },
        }
    }
}

/// True when a newer pane's extreme makes an older one irrelevant for every later window: it is
/// at least as good, and it stays in the window longer.
fn dominates(function: Function, newer: &Partial, older: &Partial) -> bool {
    match (newer, older) {
        (Partial::Extreme(Some(n)), Partial::Extreme(Some(o))) => {
            if function == Function::Min {
                n <= o
            } else {
                n >= o
            }
        }
        (Partial::Ordered(Some(n)), Partial::Ordered(Some(o))) => match function {
            // The first of a window is in its earliest non-empty pane: a newer pane never
            // displaces an older one.
            Function::First => ordered_wins(function, n, o),
            _ => n >= o,
        },
        _ => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use std::sync::Arc;

    fn spec(function: Function, input: Option<ValueType>) -> AggregateSpec {
        let output = function.output_type(input).unwrap();
        AggregateSpec { name: "a".into(), function, input, output }
    }

    fn over(spec: &AggregateSpec, column: &ArrayRef, times: &[i64]) -> Output {
        let arg = ArgColumn::new(column).unwrap();
        let mut state = Partial::empty(spec);
        for (row, &t) in times.iter().enumerate() {
            state.update(spec.function, Some(&arg), row, t);
        }
        state.evaluate(spec).unwrap()
    }

    /// Columns of awkward values (extremes, zeros of both signs, NaN, subnormals, infinities,
    /// nulls, empty and non-ASCII strings), the last rows repeating earlier ones: (float64,
    /// string, int64), of equal length.
    pub(crate) fn awkward_columns() -> (ArrayRef, ArrayRef, ArrayRef) {
        let floats: ArrayRef = Arc::new(Float64Array::from(vec![
            Some(1e300),
            Some(-0.0),
            None,
            Some(f64::NAN),
            Some(3.5e-310),
            Some(-7.25),
            Some(f64::INFINITY),
            Some(-7.25),
            Some(1e300),
        ]));
        let strings: ArrayRef = Arc::new(StringArray::from(vec![
            Some("b"),
            Some("a"),
            None,
            Some("b"),
            Some(""),
            Some("ü"),
            Some("c"),
            Some("a"),
            Some("b"),
        ]));
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![
            Some(5),
            None,
            Some(-3),
            Some(i64::MAX),
            Some(0),
            Some(1),
            Some(2),
            Some(5),
            Some(-3),
        ]));
        (floats, strings, ints)
    }

    /// Asserts that two states encode to the same bytes and give the same value.
    pub(crate) fn assert_same_state(left: &Partial, right: &Partial, spec: &AggregateSpec, what: &str) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        crate::codec::encode_partial(left, &mut a);
        crate::codec::encode_partial(right, &mut b);
        assert_eq!(a, b, "{:?} {what}: encodings", spec.function);
        let value = |state: &Partial| format!("{:?}", state.evaluate(spec));
        assert_eq!(value(left), value(right), "{:?} {what}: values", spec.function);
    }

    #[test]
    fn a_cleared_state_is_a_new_one() {
        // The last rows meet values of earlier ones again, in the same exact-sum limbs.
        let (floats, strings, ints) = awkward_columns();
        let float = Some(ValueType::Float64);
        let cases = [
            (spec(Function::CountStar, None), &floats),
            (spec(Function::Sum, Some(ValueType::Int64)), &ints),
            (spec(Function::Avg, float), &floats),
            (spec(Function::Var, float), &floats),
            (spec(Function::Max, float), &floats),
            (spec(Function::First, Some(ValueType::String)), &strings),
            (spec(Function::CountDistinct, Some(ValueType::String)), &strings),
        ];
        for (spec, column) in cases {
            let arg = ArgColumn::new(column).unwrap();
            let arg = (spec.function != Function::CountStar).then_some(&arg);
            // Filled with the first rows, cleared, then given the last ones: as a new state given
            // the last ones, in value, encoding and equality.
            for split in 0..=column.len() {
                let mut reused = Partial::empty(&spec);
                for row in 0..split {
                    reused.update(spec.function, arg, row, row as i64);
                }
                reused.clear();
                let mut new = Partial::empty(&spec);
                for row in split..column.len() {
                    reused.update(spec.function, arg, row, row as i64);
                    new.update(spec.function, arg, row, row as i64);
                }
                assert_eq!(reused, new, "{:?} after {split} rows", spec.function);
                assert_same_state(&reused, &new, &spec, &format!("after {split} rows"));
            }
        }
    }

    #[test]
    fn int_sum_overflow_is_an_error_not_a_wrap() {
        let s = spec(Function::Sum, Some(ValueType::Int64));
        let column: ArrayRef = Arc::new(Int64Array::from(vec![i64::MAX, 1]));
        let arg = ArgColumn::new(&column).unwrap();
        let mut state = Partial::empty(&s);
        state.update(s.function, Some(&arg), 0, 0);
        state.update(s.function, Some(&arg), 1, 0);
        assert!(matches!(state.evaluate(&s), Err(AggregateError::SumOverflow { .. })));
        // Overflow in a partial sum that comes back into range is fine: only the final value counts.
        let column: ArrayRef = Arc::new(Int64Array::from(vec![i64::MAX, 1, -5]));
        assert_eq!(over(&s, &column, &[0, 0, 0]), Output::Int(i64::MAX - 4));
    }

    #[test]
    fn nulls_follow_sql() {
        let column: ArrayRef = Arc::new(Float64Array::from(vec![None, None]));
        assert_eq!(over(&spec(Function::Sum, Some(ValueType::Float64)), &column, &[0, 1]), Output::Null);
        assert_eq!(over(&spec(Function::Count, Some(ValueType::Float64)), &column, &[0, 1]), Output::Int(0));
        assert_eq!(over(&spec(Function::Max, Some(ValueType::Float64)), &column, &[0, 1]), Output::Null);
        assert_eq!(over(&spec(Function::Var, Some(ValueType::Float64)), &column, &[0, 1]), Output::Null);
    }

    #[test]
    fn variance_is_exact_for_large_offsets() {
        let column: ArrayRef = Arc::new(Float64Array::from(vec![1e9 + 4.0, 1e9 + 7.0, 1e9 + 13.0, 1e9 + 16.0]));
        assert_eq!(over(&spec(Function::Var, Some(ValueType::Float64)), &column, &[0, 1, 2, 3]), Output::Float(30.0));
        let one: ArrayRef = Arc::new(Float64Array::from(vec![3.0]));
        assert_eq!(over(&spec(Function::Stddev, Some(ValueType::Float64)), &one, &[0]), Output::Null);
    }

    #[test]
    fn first_and_last_break_time_ties_by_value() {
        let column: ArrayRef = Arc::new(StringArray::from(vec!["b", "a", "c", "z"]));
        let times = [5, 5, 9, 9];
        assert_eq!(
            over(&spec(Function::First, Some(ValueType::String)), &column, &times),
            Output::Value(Value::Str("a".into()))
        );
        assert_eq!(
            over(&spec(Function::Last, Some(ValueType::String)), &column, &times),
            Output::Value(Value::Str("z".into()))
        );
    }

    #[test]
    fn sliding_matches_merging_every_pane_afresh() {
        let values: Vec<f64> = (0..40).map(|i| ((i * 37) % 11) as f64 - 3.5).collect();
        let column: ArrayRef = Arc::new(Float64Array::from(values.clone()));
        let arg = ArgColumn::new(&column).unwrap();
        for function in [
            Function::Sum,
            Function::Min,
            Function::Max,
            Function::First,
            Function::Last,
            Function::CountDistinct,
            Function::Var,
        ] {
            let s = spec(function, Some(ValueType::Float64));
            // Four rows to a pane; windows of three panes.
            let panes: Vec<Partial> = (0..10)
                .map(|p| {
                    let mut state = Partial::empty(&s);
                    for row in p * 4..p * 4 + 4 {
                        state.update(function, Some(&arg), row, row as i64 / 3);
                    }
                    state
                })
                .collect();
            let mut sliding = Sliding::new(&s);
            for p in 0..10 {
                sliding.push(function, p as i64, &panes[p]);
                if p >= 3 {
                    sliding.pop(p as i64 - 3, &panes[p - 3]);
                }
                let mut fresh = Partial::empty(&s);
                for pane in &panes[p.saturating_sub(2)..=p] {
                    fresh.merge(function, pane);
                }
                assert_eq!(sliding.evaluate(&s).unwrap(), fresh.evaluate(&s).unwrap(), "{function:?} at pane {p}");
            }
        }
    }
}
