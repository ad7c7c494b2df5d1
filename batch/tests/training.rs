//! Point-in-time training sets against a brute-force reference: for every label, the window
//! SPEC §6 picks is found by plain search among every window of the reference, on random events
//! and labels — labels exactly on window boundaries, before any event, long after the last, keys
//! never seen, null keys and times.

mod common;

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema};
use common::{
    Cell, Event, RefWindow, Row, assert_rows_match, definitions_delayed, reference, rows_of, windows, write_parquet,
};
use lockstep_batch::training::{TrainingOptions, training_set};
use lockstep_batch::{OutputTarget, SessionLimits};
use lockstep_features::{Location, compile_feature};
use proptest::prelude::*;

const MINUTE: i64 = 60_000;
const DELAY: i64 = 90_000;

fn event() -> impl Strategy<Value = Event> {
    (
        prop::sample::select(vec![Some("a"), Some("b"), Some("c"), None]),
        prop::sample::select(vec![Some("m1"), Some("m2"), None]),
        prop_oneof![6 => (-500i64..5000).prop_map(|c| Some(c as f64 / 100.0)), 1 => Just(None), 1 => Just(Some(f64::NAN))],
        prop::option::of(-1000i64..1000),
        prop::sample::select(vec!["purchase", "refund"]),
        prop_oneof![
            6 => (-2 * 60 * MINUTE..2 * 60 * MINUTE).prop_map(Some),
            3 => (-120i64..120).prop_map(|m| Some(m * MINUTE)),
            1 => Just(None),
        ],
    )
        .prop_map(|(user, merchant, amount, qty, kind, time)| Event {
            user: user.map(str::to_string),
            merchant: merchant.map(str::to_string),
            amount,
            qty,
            kind: kind.to_string(),
            time,
        })
}

/// A label: key and time. Times land on window boundaries plus the serving delay (the edge of
/// what may be used), a millisecond either side, before every event and long after the last.
fn label() -> impl Strategy<Value = (Option<&'static str>, Option<i64>)> {
    (
        prop::sample::select(vec![Some("a"), Some("b"), Some("c"), Some("never-seen"), None]),
        prop_oneof![
            4 => (-3 * 60 * MINUTE..3 * 60 * MINUTE).prop_map(Some),
            3 => ((-150i64..150), (-1i64..=1)).prop_map(|(m, d)| Some(m * MINUTE + DELAY + d)),
            1 => Just(Some(-100 * 60 * MINUTE)),
            1 => Just(Some(100 * 60 * MINUTE)),
            1 => Just(None),
        ],
    )
}

/// The brute-force answer for one label: the reference window SPEC §6 picks, found by search.
fn pick(rows: &[Row], window: RefWindow, key: Option<&str>, t: Option<i64>) -> Option<Row> {
    let t = t?;
    let of_key = rows.iter().filter(|r| r.key.as_deref() == key);
    match window {
        RefWindow::Sliding { size, every, offset } => {
            // The latest window end E = k·every + offset with E <= t − delay.
            let mut end = offset + (t - DELAY - offset).div_euclid(every) * every;
            while end > t - DELAY {
                end -= every;
            }
            assert!(end + every > t - DELAY);
            of_key.into_iter().find(|r| r.start == end - size).cloned()
        }
        RefWindow::Session { .. } => of_key.filter(|r| r.end + DELAY <= t).max_by_key(|r| r.end).cloned(),
    }
}

fn check(events: &[Event], labels: &[(Option<&'static str>, Option<i64>)], window: usize) {
    let (yaml, ref_window) = windows()[window];
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("events.parquet");
    write_parquet(&history, events);
    let labels_path = dir.path().join("labels.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("label_id", DataType::Int64, false),
        Field::new("user_id", DataType::Utf8, true),
        Field::new("label_time", lockstep_features::value::timestamp_type(), true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from((0..labels.len() as i64).collect::<Vec<_>>())),
        Arc::new(labels.iter().map(|l| l.0).collect::<StringArray>()),
        Arc::new(TimestampMillisecondArray::from(labels.iter().map(|l| l.1).collect::<Vec<_>>()).with_timezone("UTC")),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let file = std::fs::File::create(&labels_path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();

    let definitions = definitions_delayed(yaml, None, "90s");
    let feature = compile_feature(&definitions, definitions.feature("f").unwrap()).unwrap();
    let out = dir.path().join("training.parquet").display().to_string();
    let options = TrainingOptions {
        labels: labels_path.display().to_string(),
        label_time: None,
        history: Some(Location::Parquet(history.display().to_string())),
        limits: SessionLimits { memory_limit: 256 << 20, partitions: 2, cluster: None, ..SessionLimits::default() },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let summary =
        runtime.block_on(training_set(&[feature], &options, &OutputTarget::ParquetFile(out.clone()))).unwrap();
    assert_eq!(summary.labels, labels.len());

    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(std::fs::File::open(&out).unwrap(), 1024)
            .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    let output = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(output.num_rows(), labels.len(), "one row per label");
    let ids = output.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
    assert!(ids.values().iter().enumerate().all(|(i, id)| *id == i as i64), "labels keep their order");
    assert!(output.schema().field(3).name().starts_with("f__"), "columns are <feature set>__<aggregate>");

    // Compare as rows: the key, the label's index as the window start, then the values.
    let index = TimestampMillisecondArray::from((0..labels.len() as i64).collect::<Vec<_>>()).with_timezone("UTC");
    let key = arrow::compute::cast(output.column(1), &DataType::Utf8).unwrap();
    let mut columns: Vec<ArrayRef> = vec![key, Arc::new(index.clone()), Arc::new(index)];
    columns.extend(output.columns()[3..].iter().cloned());
    let mut fields = vec![
        Field::new("k", DataType::Utf8, true),
        Field::new("s", lockstep_features::value::timestamp_type(), false),
        Field::new("e", lockstep_features::value::timestamp_type(), false),
    ];
    fields.extend(output.schema().fields()[3..].iter().map(|f| f.as_ref().clone()));
    let actual = rows_of(&[RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()]);

    let all = reference(events, ref_window, |_| true).expect("no overflow here");
    let counts = [0usize, 1, 6, 12];
    let expected: Vec<Row> = labels
        .iter()
        .enumerate()
        .map(|(i, (key, t))| {
            let values = match pick(&all, ref_window, *key, *t) {
                Some(row) => row.values,
                None => (0..14).map(|c| if counts.contains(&c) { Cell::Int(0) } else { Cell::Null }).collect(),
            };
            Row { key: key.map(str::to_string), start: i as i64, end: i as i64, values }
        })
        .collect();
    assert_rows_match(&actual, &expected, &[(9, 1e-150), (10, 1e-300)]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn training_rows_equal_the_brute_force_pick(
        events in prop::collection::vec(event(), 0..60),
        labels in prop::collection::vec(label(), 1..40),
        window in 0usize..5,
    ) {
        check(&events, &labels, window);
    }
}

#[test]
fn a_label_right_at_an_event_never_sees_it() {
    // One event at 10:00; a label at 10:00 + delay sees the window ending at or before 10:00,
    // which cannot hold it; a label one window later does.
    let event = Event {
        user: Some("a".into()),
        merchant: Some("m1".into()),
        amount: Some(5.0),
        qty: Some(1),
        kind: "purchase".into(),
        time: Some(600 * MINUTE),
    };
    check(&[event], &[(Some("a"), Some(600 * MINUTE + DELAY)), (Some("a"), Some(601 * MINUTE + DELAY))], 0);
}
