//! Differential test with the batch job as the oracle, on small random and adversarial event
//! streams: events on window edges, times before 1970, out of order, duplicated, null keys,
//! null and NaN values; random window kinds, offsets, watermark delays and lateness; random
//! micro-batch sizes. With enough lateness the stream equals batch bit for bit; otherwise it
//! differs exactly in the windows its too-late events name.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use lockstep_batch::{BatchJob, SessionLimits};
use lockstep_features::{CompiledFeature, Definitions, Location, StageEvaluator, compile_feature};
use lockstep_stream::collect::FinalWindows;
use lockstep_stream::engine::Engine;
use proptest::prelude::*;

mod common;
use common::{Rows, cell, rows_of};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| tokio::runtime::Runtime::new().unwrap());

#[derive(Debug, Clone)]
struct Event {
    key: Option<String>,
    time: i64,
    x: Option<f64>,
    m: String,
}

fn events() -> impl Strategy<Value = Vec<Event>> {
    let time = prop_oneof![
        // Window edges (multiples of 10 around zero) and arbitrary times, before and after 1970.
        (-8i64..8).prop_map(|k| k * 10),
        -90i64..90,
    ];
    let x = prop_oneof![Just(None), Just(Some(f64::NAN)), (-5i32..5).prop_map(|v| Some(v as f64 * 0.1)),];
    let key = prop_oneof![Just(None), Just(Some("a".to_string())), Just(Some("b".to_string()))];
    let event = (key, time, x, 0u8..3).prop_map(|(key, time, x, m)| Event { key, time, x, m: format!("m{m}") });
    // Disordered, with a few duplicates appended.
    (prop::collection::vec(event, 1..60).prop_shuffle(), prop::collection::vec(any::<prop::sample::Index>(), 0..4))
        .prop_map(|(mut events, duplicates)| {
            for d in duplicates {
                let copy = events[d.index(events.len())].clone();
                events.push(copy);
            }
            events
        })
}

fn window() -> impl Strategy<Value = String> {
    prop_oneof![
        (1i64..5, 0i64..10)
            .prop_map(|(k, offset)| format!("{{ sliding: {}ms, every: 10ms, offset: {offset}ms }}", k * 10)),
        Just("{ tumbling: 20ms }".to_string()),
        (5i64..30).prop_map(|gap| format!("{{ session: {gap}ms }}")),
    ]
}

fn compiled(window: &str, watermark: i64, lateness: i64) -> CompiledFeature {
    let text = format!(
        "sources:\n  s:\n    schema: {{ k: string, t: timestamp, x: float64, m: string }}\n    event_time: t\n    watermark: {watermark}ms\n    allowed_lateness: {lateness}ms\nfeatures:\n  f:\n    source: s\n    key: [k]\n    filter: \"m <> 'm2' OR x IS NULL\"\n    window: {window}\n    aggregations:\n      n: count(*)\n      total: sum(x)\n      top: max(x)\n      kinds: count(distinct m)\n      latest: last(m)\n      v: var(x)\n"
    );
    let definitions = Definitions::parse("d.yaml", &text, std::path::Path::new(".")).unwrap();
    compile_feature(&definitions, definitions.feature("f").unwrap()).unwrap()
}

fn batch_of(feature: &CompiledFeature, events: &[Event]) -> RecordBatch {
    RecordBatch::try_new(
        feature.source_schema.clone(),
        vec![
            Arc::new(events.iter().map(|e| e.key.clone()).collect::<StringArray>()),
            Arc::new(
                TimestampMillisecondArray::from(events.iter().map(|e| e.time).collect::<Vec<_>>()).with_timezone("UTC"),
            ),
            Arc::new(events.iter().map(|e| e.x).collect::<Float64Array>()),
            Arc::new(events.iter().map(|e| Some(e.m.clone())).collect::<StringArray>()),
        ],
    )
    .unwrap()
}

fn batch_rows(feature: &CompiledFeature, events: &RecordBatch) -> Rows {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.parquet");
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), events.schema(), None).unwrap();
    writer.write(events).unwrap();
    writer.close().unwrap();
    let job = BatchJob::new(feature.clone(), Some(Location::Parquet(path.display().to_string()))).unwrap().with_limits(
        SessionLimits { memory_limit: 64 << 20, partitions: 1, cluster: None, ..SessionLimits::default() },
    );
    rows_of(&RUNTIME.block_on(job.collect()).unwrap())
}

/// Runs the engine in chunks of the given sizes; returns the final windows and the
/// (key, window start) pairs too-late events name, and whether any session event was too late.
fn stream_rows(
    feature: &CompiledFeature,
    events: &RecordBatch,
    chunks: &[usize],
) -> (Rows, BTreeSet<(String, i64)>, bool) {
    let evaluator = StageEvaluator::new(feature).unwrap();
    let mut engine = Engine::new(feature, true).unwrap();
    let mut windows = FinalWindows::new(engine.output_schema().clone(), 1, true);
    let mut late = BTreeSet::new();
    let mut session_late = false;
    let (mut at, mut c) = (0, 0);
    while at < events.num_rows() {
        let len = chunks[c % chunks.len()].min(events.num_rows() - at);
        c += 1;
        let (stage, passes) = evaluator.evaluate(&events.slice(at, len)).unwrap();
        let seqs: Vec<u64> = (at as u64..(at + len) as u64).collect();
        let effects = engine.process(&stage, &passes, &seqs).unwrap();
        let keys = engine.key_columns(&effects.late.iter().map(|l| &l.key).collect::<Vec<_>>()).unwrap();
        for (i, event) in effects.late.iter().enumerate() {
            session_late |= event.windows.is_empty();
            for (start, _) in &event.windows {
                late.insert((cell(&keys[0], i), *start));
            }
        }
        windows.add(&effects);
        at += len;
    }
    windows.add(&engine.finish(events.num_rows() as u64).unwrap());
    (rows_of(&windows.finish().unwrap()), late, session_late)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn stream_equals_batch_except_the_windows_of_too_late_events(
        events in events(),
        window in window(),
        watermark in prop_oneof![Just(0i64), 0i64..40],
        lateness in prop_oneof![Just(0i64), 0i64..60, Just(1_000_000i64)],
        chunks in prop::collection::vec(1usize..20, 1..5),
    ) {
        let feature = compiled(&window, watermark, lateness);
        let source = batch_of(&feature, &events);
        let expected = batch_rows(&feature, &source);
        let (got, late, session_late) = stream_rows(&feature, &source, &chunks);
        if lateness == 1_000_000 {
            prop_assert!(late.is_empty() && !session_late);
        }
        if session_late {
            // A too-late session event may split or shorten any session of its key; only the
            // lateness-free case is compared exactly for sessions.
            return Ok(());
        }
        let differing: BTreeSet<(String, i64)> = expected
            .iter()
            .filter(|(window, values)| got.get(*window) != Some(*values))
            .map(|(window, _)| window.clone())
            .collect();
        for window in got.keys() {
            prop_assert!(expected.contains_key(window), "the stream invented {window:?}");
        }
        prop_assert_eq!(differing, late);
    }
}
