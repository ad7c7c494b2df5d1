//! The streaming engine against the batch job as the oracle (SPEC §3–§5): the same events,
//! replayed in arrival order, give bit-identical windows, except windows where the stream had a
//! too-late event — and those are exactly the windows the late output names. A run restored from
//! its changelog at random points ends bit-identical to an undisturbed run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::TimestampMillisecondType;
use lockstep_batch::{BatchJob, SessionLimits};
use lockstep_features::{CompiledFeature, Definitions, Location, StageEvaluator, compile_feature};
use lockstep_fixtures::{EventGenerator, GenerateOptions, transactions_schema};
use lockstep_stream::collect::FinalWindows;
use lockstep_stream::engine::Engine;
use lockstep_stream::replay::replay;

mod common;
use common::{Rows, cell, rows_of};
use rand::{RngExt, SeedableRng};

fn definitions(watermark: &str, lateness: &str) -> String {
    format!(
        r#"
sources:
  transactions:
    schema: {{ user_id: string, merchant_id: string, amount: float64, event_type: string, event_time: timestamp, ingest_time: timestamp }}
    event_time: event_time
    arrival_time: ingest_time
    watermark: {watermark}
    allowed_lateness: {lateness}
features:
  velocity:
    source: transactions
    key: [user_id]
    filter: "amount > 0"
    window: {{ sliding: 1h, every: 5m, offset: 1m }}
    aggregations:
      tx_count: count(*)
      total_amount: sum(amount)
      avg_amount: avg(amount)
      max_amount: max(amount)
      unique_merchants: count(distinct merchant_id)
      purchases: count(*) FILTER (WHERE event_type = 'purchase')
      sd: stddev(amount)
      first_merchant: first(merchant_id)
      last_merchant: last(merchant_id)
  daily:
    source: transactions
    key: [merchant_id]
    window: {{ tumbling: 1d }}
    aggregations:
      n: count(*)
      low: min(amount)
      v: var(amount)
  sessions:
    source: transactions
    key: [user_id]
    window: {{ session: 20m }}
    aggregations:
      n: count(*)
      total: sum(amount)
      var_amount: var(amount)
      low: min(amount)
      last_seen: max(event_time)
"#
    )
}

fn compiled(text: &str, feature: &str) -> CompiledFeature {
    let definitions = Definitions::parse("parity.yaml", text, std::path::Path::new(".")).unwrap();
    compile_feature(&definitions, definitions.feature(feature).unwrap()).unwrap()
}

fn options(seed: u64) -> GenerateOptions {
    GenerateOptions { events: 20_000, users: 200, days: 2, seed, late_rate: 0.03, ..GenerateOptions::default() }
}

/// The events in arrival order, written to one Parquet file.
fn history(dir: &std::path::Path, seed: u64) -> (Location, RecordBatch) {
    let batches: Vec<RecordBatch> = EventGenerator::new(options(seed)).collect();
    let events = concat_batches(&transactions_schema(), &batches).unwrap();
    let path = dir.join(format!("events-{seed}.parquet"));
    let file = std::fs::File::create(&path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, events.schema(), None).unwrap();
    writer.write(&events).unwrap();
    writer.close().unwrap();
    (Location::Parquet(path.display().to_string()), events)
}

async fn batch_rows(feature: &CompiledFeature, history: &Location) -> Rows {
    let job = BatchJob::new(feature.clone(), Some(history.clone())).unwrap().with_limits(SessionLimits {
        memory_limit: 256 << 20,
        partitions: 2,
        cluster: None,
        ..SessionLimits::default()
    });
    rows_of(&job.collect().await.unwrap())
}

async fn replay_rows(feature: &CompiledFeature, history: &Location) -> (Rows, Vec<RecordBatch>) {
    let limits = SessionLimits { memory_limit: 256 << 20, partitions: 1, cluster: None, ..SessionLimits::default() };
    let out = replay(feature, history, &limits, true, Arc::new(AtomicU64::new(0))).await.unwrap();
    let unkept = replay(feature, history, &limits, false, Arc::new(AtomicU64::new(0))).await.unwrap();
    assert!(unkept.windows.is_empty(), "windows are not kept without --out");
    assert_eq!(unkept.counters, out.counters, "keeping windows or not, the engine does the same");
    (rows_of(&out.windows), out.late)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_enough_lateness_stream_equals_batch_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let (location, _) = history(dir.path(), 11);
    let text = definitions("30s", "7h");
    for feature in ["velocity", "daily", "sessions"] {
        let feature = compiled(&text, feature);
        let expected = batch_rows(&feature, &location).await;
        let (got, late) = replay_rows(&feature, &location).await;
        assert!(expected.len() > 100, "too few windows for a meaningful check: {}", expected.len());
        assert!(late.is_empty(), "{}: no event is beyond 7h of lateness", feature.feature.name);
        assert_eq!(got.len(), expected.len(), "{}: window count", feature.feature.name);
        for (window, values) in &expected {
            assert_eq!(got.get(window), Some(values), "{}: window {window:?}", feature.feature.name);
        }
    }
}

/// (key, window_start) of every window a too-late event was not applied to.
fn late_windows(late: &[RecordBatch], key_column: &str) -> BTreeSet<(String, i64)> {
    let mut out = BTreeSet::new();
    for batch in late {
        let key = batch.column_by_name(key_column).unwrap();
        let start = batch.column_by_name("late_window_start").unwrap().as_primitive::<TimestampMillisecondType>();
        for r in 0..batch.num_rows() {
            out.insert((cell(key, r), start.value(r)));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differences_are_exactly_the_windows_of_too_late_events() {
    let dir = tempfile::tempdir().unwrap();
    for (seed, watermark, lateness) in [(21, "0s", "0s"), (22, "30s", "2m"), (23, "10s", "30m")] {
        let (location, _) = history(dir.path(), seed);
        let text = definitions(watermark, lateness);
        for (name, key) in [("velocity", "user_id"), ("daily", "merchant_id")] {
            let feature = compiled(&text, name);
            let expected = batch_rows(&feature, &location).await;
            let (got, late) = replay_rows(&feature, &location).await;
            let explained = late_windows(&late, key);
            assert!(!explained.is_empty(), "{name}/{seed}: the fixture has late events");
            let mut differing = BTreeSet::new();
            for (window, values) in &expected {
                if got.get(window) != Some(values) {
                    differing.insert(window.clone());
                }
            }
            for window in got.keys() {
                assert!(expected.contains_key(window), "{name}/{seed}: the stream invented window {window:?}");
            }
            // Every window holding a too-late event differs: count(*) is one of the aggregates and
            // a too-late event passes the filter.
            assert_eq!(differing, explained, "{name}/{seed} (watermark {watermark}, lateness {lateness})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_sessions_differ_only_where_a_too_late_event_lies() {
    let dir = tempfile::tempdir().unwrap();
    let (location, _) = history(dir.path(), 31);
    let feature = compiled(&definitions("30s", "1m"), "sessions");
    let expected = batch_rows(&feature, &location).await;
    let (got, late) = replay_rows(&feature, &location).await;
    let mut late_events: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for batch in &late {
        let key = batch.column_by_name("user_id").unwrap();
        let time = batch.column_by_name("event_time").unwrap().as_primitive::<TimestampMillisecondType>();
        for r in 0..batch.num_rows() {
            late_events.entry(cell(key, r)).or_default().push(time.value(r));
        }
    }
    assert!(!late_events.is_empty());
    let explained = |key: &str, start: i64, end: i64| {
        late_events.get(key).is_some_and(|times| times.iter().any(|t| *t >= start - 20 * 60_000 && *t <= end))
    };
    let mut differing = 0;
    for ((key, start), (end, values)) in &expected {
        if got.get(&(key.clone(), *start)) != Some(&(*end, values.clone())) {
            differing += 1;
            assert!(explained(key, *start, *end), "batch session {key} at {start} differs with no late event near it");
        }
    }
    for ((key, start), (end, values)) in &got {
        if expected.get(&(key.clone(), *start)) != Some(&(*end, values.clone())) {
            assert!(explained(key, *start, *end), "stream session {key} at {start} differs with no late event near it");
        }
    }
    assert!(differing > 0, "too-late session events must change some session");
}

/// Runs the engine over `events` (arrival order) in random chunks; when `restarts` is set,
/// after some chunks the engine is dropped and a new one restored from the changelog so far.
fn run_engine(feature: &CompiledFeature, events: &RecordBatch, seed: u64, restarts: bool) -> Rows {
    let evaluator = StageEvaluator::new(feature).unwrap();
    let mut engine = Engine::new(feature, true).unwrap();
    let mut changelog: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    let mut windows = FinalWindows::new(engine.output_schema().clone(), 1, true);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut at = 0;
    let mut restored = 0;
    while at < events.num_rows() {
        let len = rng.random_range(1..2_000).min(events.num_rows() - at);
        let chunk = events.slice(at, len);
        let source = RecordBatch::try_new(feature.source_schema.clone(), chunk.columns().to_vec()).unwrap();
        let (stage, passes) = evaluator.evaluate(&source).unwrap();
        let seqs: Vec<u64> = (at as u64..(at + len) as u64).collect();
        let effects = engine.process(&stage, &passes, &seqs).unwrap();
        windows.add(&effects);
        changelog.extend(engine.take_changes());
        at += len;
        if restarts && rng.random_bool(0.3) {
            engine = Engine::new(feature, true).unwrap();
            engine.restore(changelog.iter().map(|(k, v)| (k.as_slice(), v.as_deref()))).unwrap();
            restored += 1;
        }
    }
    let effects = engine.finish(events.num_rows() as u64).unwrap();
    windows.add(&effects);
    if restarts {
        assert!(restored > 2, "the run restarted only {restored} times");
    }
    rows_of(&windows.finish().unwrap())
}

#[test]
fn restored_from_the_changelog_at_random_points_the_output_is_unchanged() {
    let batches: Vec<RecordBatch> = EventGenerator::new(options(41)).collect();
    let events = concat_batches(&transactions_schema(), &batches).unwrap();
    let text = definitions("30s", "20m");
    for name in ["velocity", "daily", "sessions"] {
        let feature = compiled(&text, name);
        let undisturbed = run_engine(&feature, &events, 1, false);
        for seed in [2, 3] {
            let restarted = run_engine(&feature, &events, seed, true);
            assert!(restarted == undisturbed, "{name}: restored run (seed {seed}) differs");
        }
    }
}
