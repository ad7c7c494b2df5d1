//! Test helpers: plain events, a Parquet writer for them, and a brute-force reference that
//! computes every window of every event the obvious way.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{
    DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, TimeUnit, TimestampMillisecondType,
};
use lockstep_batch::{BatchJob, SessionLimits};
use lockstep_features::{Definitions, Location, compile_feature};
use lockstep_fixtures::reference::{round_units, units};
use num_bigint::BigInt;
use num_traits::{ToPrimitive, Zero};

/// One event as the reference sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub user: Option<String>,
    pub merchant: Option<String>,
    pub amount: Option<f64>,
    pub qty: Option<i64>,
    pub kind: String,
    pub time: Option<i64>,
}

pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, true),
        Field::new("merchant_id", DataType::Utf8, true),
        Field::new("amount", DataType::Float64, true),
        Field::new("qty", DataType::Int64, true),
        Field::new("event_type", DataType::Utf8, false),
        Field::new("event_time", DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), true),
    ]))
}

pub fn batch(events: &[Event]) -> RecordBatch {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(events.iter().map(|e| e.user.clone()).collect::<Vec<_>>())),
        Arc::new(StringArray::from(events.iter().map(|e| e.merchant.clone()).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(events.iter().map(|e| e.amount).collect::<Vec<_>>())),
        Arc::new(Int64Array::from(events.iter().map(|e| e.qty).collect::<Vec<_>>())),
        Arc::new(StringArray::from(events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())),
        Arc::new(
            TimestampMillisecondArray::from(events.iter().map(|e| e.time).collect::<Vec<_>>()).with_timezone("UTC"),
        ),
    ];
    RecordBatch::try_new(schema(), columns).expect("columns match the schema")
}

pub fn write_parquet(path: &Path, events: &[Event]) {
    let file = std::fs::File::create(path).expect("create parquet file");
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema(), None).expect("parquet writer");
    writer.write(&batch(events)).expect("write batch");
    writer.close().expect("close parquet");
}

/// The definitions file of these tests, with the given window and filter.
pub fn definitions(window: &str, filter: Option<&str>) -> Definitions {
    definitions_delayed(window, filter, "0s")
}

/// Like [`definitions`], with a serving delay.
pub fn definitions_delayed(window: &str, filter: Option<&str>, serving_delay: &str) -> Definitions {
    let filter = filter.map_or(String::new(), |f| format!("    filter: \"{f}\"\n"));
    let text = format!(
        r#"
sources:
  events:
    schema: {{ user_id: string, merchant_id: string, amount: float64, qty: int64, event_type: string, event_time: timestamp }}
    event_time: event_time
features:
  f:
    source: events
    key: [user_id]
{filter}    window: {window}
    serving_delay: {serving_delay}
    aggregations:
      n: count(*)
      n_amount: count(amount)
      total: sum(amount)
      mean: avg(amount)
      low: min(amount)
      high: max(amount)
      merchants: count(distinct merchant_id)
      first_merchant: first(merchant_id)
      last_merchant: last(merchant_id)
      sd: stddev(amount)
      variance: var(amount)
      units: sum(qty)
      purchases: count(*) FILTER (WHERE event_type = 'purchase')
      latest: max(event_time)
"#
    );
    Definitions::parse("test.yaml", &text, Path::new(".")).expect("test definitions are valid")
}

/// Runs the batch job of feature `f` over `history` and returns its rows.
pub async fn run_batch(definitions: &Definitions, history: Location, partitions: usize) -> Result<Vec<Row>, String> {
    let feature = definitions.feature("f").expect("feature f");
    let compiled = compile_feature(definitions, feature).map_err(|e| e.to_string())?;
    let job = BatchJob::new(compiled, Some(history)).map_err(|e| e.to_string())?.with_limits(SessionLimits {
        memory_limit: 256 << 20,
        partitions,
        cluster: None,
        // Small batches: keys and key runs cross many batch edges.
        batch_size: 5,
    });
    let batches = job.collect().await.map_err(|e| e.to_string())?;
    Ok(rows_of(&batches))
}

/// One output value, compared bit for bit (floats by their bits).
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Bits(u64),
    Str(String),
}

impl Cell {
    pub fn float(x: f64) -> Cell {
        Cell::Bits(x.to_bits())
    }
}

/// An output row: key, window start, window end, then the aggregates in declared order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: Option<String>,
    pub start: i64,
    pub end: i64,
    pub values: Vec<Cell>,
}

pub fn rows_of(batches: &[RecordBatch]) -> Vec<Row> {
    let mut rows = Vec::new();
    for batch in batches {
        let key = batch.column(0).as_string::<i32>();
        let start = batch.column(1).as_primitive::<TimestampMillisecondType>();
        let end = batch.column(2).as_primitive::<TimestampMillisecondType>();
        for r in 0..batch.num_rows() {
            let values = (3..batch.num_columns()).map(|c| cell(batch.column(c), r)).collect();
            rows.push(Row {
                key: key.is_valid(r).then(|| key.value(r).to_string()),
                start: start.value(r),
                end: end.value(r),
                values,
            });
        }
    }
    rows
}

fn cell(column: &ArrayRef, row: usize) -> Cell {
    if column.is_null(row) {
        return Cell::Null;
    }
    match column.data_type() {
        DataType::Int64 => Cell::Int(column.as_primitive::<Int64Type>().value(row)),
        DataType::Float64 => Cell::float(column.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => Cell::Str(column.as_string::<i32>().value(row).to_string()),
        DataType::Utf8View => Cell::Str(column.as_string_view().value(row).to_string()),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            Cell::Int(column.as_primitive::<TimestampMillisecondType>().value(row))
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            Cell::Int(column.as_primitive::<arrow::datatypes::TimestampMicrosecondType>().value(row).div_euclid(1000))
        }
        other => panic!("unexpected output type {other}"),
    }
}

/// How the reference cuts time.
#[derive(Debug, Clone, Copy)]
pub enum RefWindow {
    Sliding { size: i64, every: i64, offset: i64 },
    Session { gap: i64 },
}

/// The brute-force reference: every event is put in every window that holds it, then each
/// aggregate is computed from the window's events with exact arithmetic.
pub fn reference(events: &[Event], window: RefWindow, keep: impl Fn(&Event) -> bool) -> Result<Vec<Row>, String> {
    let mut groups: BTreeMap<(Option<String>, i64), (i64, Vec<Event>)> = BTreeMap::new();
    let kept: Vec<&Event> = events.iter().filter(|e| e.time.is_some() && keep(e)).collect();
    match window {
        RefWindow::Sliding { size, every, offset } => {
            for event in &kept {
                let t = event.time.unwrap();
                // Every aligned start s with s <= t < s + size.
                let mut s = (t - offset).div_euclid(every) * every + offset;
                while s + size > t {
                    groups.entry((event.user.clone(), s)).or_insert((s + size, Vec::new())).1.push((*event).clone());
                    s -= every;
                }
            }
        }
        RefWindow::Session { gap } => {
            let mut by_key: BTreeMap<Option<String>, Vec<&Event>> = BTreeMap::new();
            for event in &kept {
                by_key.entry(event.user.clone()).or_default().push(event);
            }
            for (key, mut list) in by_key {
                list.sort_by_key(|e| e.time.unwrap());
                let mut session: Vec<Event> = Vec::new();
                for event in list {
                    let t = event.time.unwrap();
                    if let Some(last) = session.last()
                        && t - last.time.unwrap() >= gap
                    {
                        let start = session[0].time.unwrap();
                        let end = session.last().unwrap().time.unwrap() + gap;
                        groups.insert((key.clone(), start), (end, std::mem::take(&mut session)));
                    }
                    session.push(event.clone());
                }
                if !session.is_empty() {
                    let start = session[0].time.unwrap();
                    let end = session.last().unwrap().time.unwrap() + gap;
                    groups.insert((key.clone(), start), (end, session));
                }
            }
        }
    }
    let mut rows = Vec::new();
    for ((key, start), (end, events)) in groups {
        rows.push(Row { key, start, end, values: aggregates(&events)? });
    }
    Ok(rows)
}

fn aggregates(events: &[Event]) -> Result<Vec<Cell>, String> {
    let amounts: Vec<f64> = events.iter().filter_map(|e| e.amount).collect();
    let merchants: Vec<(i64, &str)> =
        events.iter().filter_map(|e| e.merchant.as_deref().map(|m| (e.time.unwrap(), m))).collect();
    let total = exact_sum(&amounts);
    let mean = total.map(|s| s / amounts.len() as f64);
    let low = amounts.iter().copied().reduce(|a, b| if float_order(b, a).is_lt() { b } else { a });
    let high = amounts.iter().copied().reduce(|a, b| if float_order(b, a).is_gt() { b } else { a });
    let mut distinct: Vec<&str> = merchants.iter().map(|(_, m)| *m).collect();
    distinct.sort();
    distinct.dedup();
    let first = merchants.iter().min().map(|(_, m)| Cell::Str(m.to_string()));
    let last = merchants.iter().max().map(|(_, m)| Cell::Str(m.to_string()));
    let variance = exact_variance(&amounts);
    let qty: Vec<i64> = events.iter().filter_map(|e| e.qty).collect();
    let units = if qty.is_empty() {
        Cell::Null
    } else {
        let sum: i128 = qty.iter().map(|&q| q as i128).sum();
        Cell::Int(i64::try_from(sum).map_err(|_| "sum overflows int64".to_string())?)
    };
    let float_or_null = |x: Option<f64>| x.map_or(Cell::Null, |v| Cell::float(canonical(v)));
    Ok(vec![
        Cell::Int(events.len() as i64),
        Cell::Int(amounts.len() as i64),
        float_or_null(total),
        float_or_null(mean),
        float_or_null(low),
        float_or_null(high),
        Cell::Int(distinct.len() as i64),
        first.unwrap_or(Cell::Null),
        last.unwrap_or(Cell::Null),
        float_or_null(variance.map(f64::sqrt)),
        float_or_null(variance),
        units,
        Cell::Int(events.iter().filter(|e| e.kind == "purchase").count() as i64),
        events.iter().map(|e| e.time.unwrap()).max().map_or(Cell::Null, Cell::Int),
    ])
}

/// NaN above every number, −0.0 below +0.0 (SPEC's total order for min/max).
fn float_order(a: f64, b: f64) -> std::cmp::Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Greater,
        (false, true) => std::cmp::Ordering::Less,
        _ => a.total_cmp(&b),
    }
}

fn canonical(x: f64) -> f64 {
    if x.is_nan() { f64::NAN } else { x }
}

/// SQL sum with IEEE specials and one exact rounding (Python's math.fsum on finite values).
pub fn exact_sum(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let nan = values.iter().any(|v| v.is_nan());
    let pos = values.contains(&f64::INFINITY);
    let neg = values.contains(&f64::NEG_INFINITY);
    if nan || (pos && neg) {
        return Some(f64::NAN);
    }
    if pos || neg {
        return Some(if pos { f64::INFINITY } else { f64::NEG_INFINITY });
    }
    Some(round_units(&values.iter().map(|&v| units(v)).sum()))
}

/// Sample variance from exact rationals; NaN when any value is not finite or its square
/// overflows (|x| ≥ 2^512), as lockstep documents.
fn exact_variance(values: &[f64]) -> Option<f64> {
    if values.len() < 2 {
        return None;
    }
    if values.iter().any(|v| !(v * v).is_finite()) {
        return Some(f64::NAN);
    }
    let n = BigInt::from(values.len());
    let s1: BigInt = values.iter().map(|&v| units(v)).sum();
    let s2: BigInt = values.iter().map(|&v| units(v) * units(v)).sum();
    // var = (n·Σx² − (Σx)²) / (n·(n−1)), in units of 2^-2148.
    let numerator = &n * s2 - &s1 * &s1;
    let denominator = &n * (&n - 1);
    Some(ratio_to_f64(&numerator, &denominator, -2148))
}

/// `numerator / denominator · 2^exponent`, to about 2^-90 relative (enough for a 1e-9 check).
fn ratio_to_f64(numerator: &BigInt, denominator: &BigInt, exponent: i64) -> f64 {
    if numerator.is_zero() {
        return 0.0;
    }
    let shift_n = (numerator.bits() as i64 - 100).max(0);
    let shift_d = (denominator.bits() as i64 - 100).max(0);
    let n = (numerator >> shift_n as usize).to_f64().unwrap_or(f64::NAN);
    let d = (denominator >> shift_d as usize).to_f64().unwrap_or(f64::NAN);
    let e = exponent + shift_n - shift_d;
    let half = (e / 2) as i32;
    n / d * 2f64.powi(half) * 2f64.powi(e as i32 - half)
}

/// Floats are bit-exact except the `approximate` columns (stddev, var), which must match the
/// exact rational to 1e-9 relative plus the given absolute slack (squares of values below 2^-511
/// lose bits to underflow: 1e-300 for a variance, its square root 1e-150 for a deviation).
pub fn assert_rows_match(actual: &[Row], expected: &[Row], approximate: &[(usize, f64)]) {
    assert_eq!(actual.len(), expected.len(), "row count: batch {} vs reference {}", actual.len(), expected.len());
    for (a, e) in actual.iter().zip(expected) {
        assert_eq!((&a.key, a.start, a.end), (&e.key, e.start, e.end), "window of row {a:?} vs {e:?}");
        for (i, (x, y)) in a.values.iter().zip(&e.values).enumerate() {
            if let Some(&(_, slack)) = approximate.iter().find(|(c, _)| *c == i)
                && let (Cell::Bits(x), Cell::Bits(y)) = (x, y)
            {
                let (x, y) = (f64::from_bits(*x), f64::from_bits(*y));
                let close = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-9 * y.abs() + slack;
                assert!(close, "column {i} of key {:?} window {}: {x} vs {y}", a.key, a.start);
                continue;
            }
            assert_eq!(x, y, "column {i} of key {:?} window {}..{}", a.key, a.start, a.end);
        }
    }
}

/// Window definitions under test, as YAML and as the reference's window.
pub fn windows() -> Vec<(&'static str, RefWindow)> {
    vec![
        ("{ sliding: 10m, every: 1m }", RefWindow::Sliding { size: 10 * 60_000, every: 60_000, offset: 0 }),
        (
            "{ sliding: 15m, every: 5m, offset: 2m }",
            RefWindow::Sliding { size: 15 * 60_000, every: 5 * 60_000, offset: 2 * 60_000 },
        ),
        ("{ tumbling: 1h }", RefWindow::Sliding { size: 60 * 60_000, every: 60 * 60_000, offset: 0 }),
        (
            "{ tumbling: 7m, offset: 3m }",
            RefWindow::Sliding { size: 7 * 60_000, every: 7 * 60_000, offset: 3 * 60_000 },
        ),
        ("{ session: 5m }", RefWindow::Session { gap: 5 * 60_000 }),
    ]
}
