//! Backfill against a brute-force expectation: late rows landing at several times are repaired by
//! replacing exactly the windows that hold them, in one Delta commit; a second run changes
//! nothing; a writer racing the backfill never loses or doubles a row.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::TimestampMicrosecondType;
use datafusion::prelude::{SessionContext, col};
use deltalake::protocol::SaveMode;
use futures::TryStreamExt;
use lockstep_backfill::{BackfillOptions, BeforeCommit, backfill};
use lockstep_batch::{BatchJob, HISTORY_VERSION, OutputTarget};
use lockstep_features::{CompiledFeature, Definitions, compile_feature};
use lockstep_fixtures::{EventGenerator, GenerateOptions, transactions_schema};

const DEFINITIONS: &str = r#"
sources:
  transactions:
    schema: { user_id: string, merchant_id: string, amount: float64, event_type: string, event_time: timestamp, ingest_time: timestamp }
    event_time: event_time
    history: { delta: history }
features:
  velocity:
    source: transactions
    key: [user_id]
    filter: "amount > 0"
    window: { sliding: 1h, every: 10m, offset: 3m }
    aggregations:
      n: count(*)
      total: sum(amount)
      top: max(amount)
      sd: stddev(amount)
    output: { delta: out }
  sessions:
    source: transactions
    key: [user_id]
    filter: "amount > 0"
    window: { session: 20m }
    aggregations:
      n: count(*)
      total: sum(amount)
      last_seen: max(event_time)
    output: { delta: out-sessions }
"#;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;

struct Setup {
    _dir: tempfile::TempDir,
    feature: CompiledFeature,
    history: String,
    output: String,
    /// The events held back: they land in the history after the output was written.
    late: RecordBatch,
}

fn events() -> RecordBatch {
    let options =
        GenerateOptions { events: 12_000, users: 60, days: 1, seed: 11, late_rate: 0.0, ..GenerateOptions::default() };
    let batches: Vec<RecordBatch> = EventGenerator::new(options).collect();
    concat_batches(&transactions_schema(), &batches).unwrap()
}

/// Event times of `batch` in milliseconds (the generator writes milliseconds).
fn times(batch: &RecordBatch) -> Vec<Option<i64>> {
    let column = batch.column_by_name("event_time").unwrap();
    let column = arrow::compute::cast(column, &lockstep_features::value::timestamp_type()).unwrap();
    let column = column.as_primitive::<arrow::datatypes::TimestampMillisecondType>();
    (0..column.len()).map(|i| column.is_valid(i).then(|| column.value(i))).collect()
}

async fn write_delta(url: &str, batch: RecordBatch, mode: SaveMode) -> i64 {
    let url = lockstep_batch::source::to_url(url).unwrap();
    std::fs::create_dir_all(url.path()).unwrap();
    let table = deltalake::DeltaTable::try_from_url(url).await.unwrap();
    let table = table.write(vec![batch]).with_save_mode(mode).await.unwrap();
    table.version().unwrap() as i64
}

/// History version 0 without the late events; the output written by `lockstep batch` from it.
async fn setup() -> Setup {
    setup_feature("velocity").await
}

async fn setup_feature(name: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let definitions = Definitions::parse("d.yaml", DEFINITIONS, dir.path()).unwrap();
    let feature = compile_feature(&definitions, definitions.feature(name).unwrap()).unwrap();
    let history = dir.path().join("history").display().to_string();
    let output = feature.feature.output.table.as_ref().unwrap().url().to_string();
    let all = events();
    let start = all.column_by_name("event_time").map(|_| times(&all).into_iter().flatten().min().unwrap()).unwrap();
    // Late data at three separate times of the day, one of them on a window boundary.
    let spots =
        [(start + 2 * HOUR + 3 * MINUTE, 7 * MINUTE), (start + 9 * HOUR, 20 * MINUTE), (start + 17 * HOUR, 4 * MINUTE)];
    let late_mask: BooleanArray = times(&all)
        .into_iter()
        .map(|t| Some(t.is_some_and(|t| spots.iter().any(|&(from, len)| t >= from && t < from + len))))
        .collect();
    let on_time_mask = arrow::compute::not(&late_mask).unwrap();
    let late = filter_record_batch(&all, &late_mask).unwrap();
    let on_time = filter_record_batch(&all, &on_time_mask).unwrap();
    assert!(late.num_rows() > 20, "the late spots hold events");
    write_delta(&history, on_time, SaveMode::Overwrite).await;
    BatchJob::new(feature.clone(), None).unwrap().run(&OutputTarget::Delta(output.clone())).await.unwrap();
    Setup { _dir: dir, feature, history, output, late }
}

/// Every row of a Delta table, sorted by key and window.
async fn rows(url: &str) -> RecordBatch {
    let ctx = SessionContext::new();
    let table = deltalake::open_table(lockstep_batch::source::to_url(url).unwrap()).await.unwrap();
    let frame = ctx.read_table(table.table_provider().await.unwrap()).unwrap();
    let frame = frame.sort(vec![col("user_id").sort(true, true), col("window_start").sort(true, true)]).unwrap();
    let schema = Arc::new(frame.schema().as_arrow().clone());
    concat_batches(&schema, &frame.collect().await.unwrap()).unwrap()
}

/// A full recompute of the feature over the latest history.
async fn recompute(setup: &Setup) -> RecordBatch {
    let url = setup.output.clone() + "-full";
    BatchJob::new(setup.feature.clone(), None).unwrap().run(&OutputTarget::Delta(url.clone())).await.unwrap();
    rows(&url).await
}

/// Rows whose `window_start` is (or is not) in `starts`.
fn select(batch: &RecordBatch, starts: &BTreeSet<i64>, inside: bool) -> RecordBatch {
    let column = batch.column_by_name("window_start").unwrap().as_primitive::<TimestampMicrosecondType>();
    let mask: BooleanArray =
        (0..column.len()).map(|i| Some(starts.contains(&(column.value(i) / 1000)) == inside)).collect();
    filter_record_batch(batch, &mask).unwrap()
}

/// Brute force: the start of every window holding each late event that passes the filter.
fn touched_starts(late: &RecordBatch) -> BTreeSet<i64> {
    let amounts = late.column_by_name("amount").unwrap().as_primitive::<arrow::datatypes::Float64Type>();
    let (size, every, offset) = (HOUR, 10 * MINUTE, 3 * MINUTE);
    let mut starts = BTreeSet::new();
    for (i, t) in times(late).into_iter().enumerate() {
        let Some(t) = t else { continue };
        // The filter `amount > 0` keeps neither nulls nor NaN.
        if amounts.is_null(i) || amounts.value(i).is_nan() || amounts.value(i) <= 0.0 {
            continue;
        }
        let mut start = (t - offset).div_euclid(every) * every + offset;
        while start > t - size {
            starts.insert(start);
            start -= every;
        }
    }
    starts
}

async fn commits(url: &str) -> Vec<deltalake::kernel::CommitInfo> {
    let table = deltalake::open_table(lockstep_batch::source::to_url(url).unwrap()).await.unwrap();
    table.history(None).try_collect().await.unwrap()
}

/// `window_start` of every row of every data file of a Delta table, in file order.
fn file_order(url: &str) -> Vec<Vec<i64>> {
    let mut files: Vec<_> = std::fs::read_dir(url)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let file = std::fs::File::open(path).unwrap();
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 8192).unwrap();
            let mut starts = Vec::new();
            for batch in reader {
                let batch = batch.unwrap();
                let column = batch.column_by_name("window_start").unwrap().as_primitive::<TimestampMicrosecondType>();
                starts.extend(column.values().iter().copied());
            }
            starts
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_output_files_hold_rows_in_window_start_order() {
    let setup = setup().await;
    for starts in file_order(&setup.output) {
        assert!(starts.windows(2).all(|w| w[0] <= w[1]), "a data file is not ordered by window_start");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_rows_are_repaired_by_replacing_exactly_their_windows() {
    let setup = setup().await;
    let before = rows(&setup.output).await;
    let version = write_delta(&setup.history, setup.late.clone(), SaveMode::Append).await;
    assert_eq!(version, 1);

    let summary = backfill(&setup.feature, BackfillOptions::default()).await.unwrap();
    let after = rows(&setup.output).await;

    // The ranges hold exactly the brute-force window starts.
    let expected = touched_starts(&setup.late);
    let planned: BTreeSet<i64> =
        summary.plan.ranges.iter().flat_map(|&(from, to)| (from..to).step_by(10 * MINUTE as usize)).collect();
    assert_eq!(planned, expected, "ranges cover exactly the windows the late rows touch");
    assert_eq!(summary.plan.ranges.len(), 3, "three separate late spots give three ranges");
    assert_eq!((summary.plan.from_version, summary.plan.to_version), (Some(0), Some(1)));
    assert_eq!(summary.plan.added_files, 1);
    assert_eq!(summary.attempts, 1);

    // The table equals a full recompute; rows outside the ranges are the very rows from before.
    assert_eq!(after, recompute(&setup).await, "backfilled table == full recompute");
    assert_eq!(
        select(&after, &expected, false),
        select(&before, &expected, false),
        "untouched rows stay bit-identical"
    );
    assert_ne!(select(&after, &expected, true), select(&before, &expected, true), "touched windows changed");
    assert_eq!(summary.rows_written, select(&after, &expected, true).num_rows() as u64);
    assert_eq!(summary.plan.rows_replaced, select(&before, &expected, true).num_rows() as u64);

    // One new commit, carrying the predicate and the history version.
    let log = commits(&setup.output).await;
    assert_eq!(log.len(), 2, "the batch write and one backfill commit");
    let newest = &log[0];
    assert_eq!(newest.info.get(HISTORY_VERSION).and_then(|v| v.as_i64()), Some(1));
    let predicate = newest.operation_parameters.as_ref().and_then(|p| p.get("predicate")).map(|p| p.to_string());
    assert!(predicate.as_deref().is_some_and(|p| p.contains("window_start")), "replaceWhere predicate: {predicate:?}");

    // A second run finds nothing to do and commits nothing.
    let again = backfill(&setup.feature, BackfillOptions::default()).await.unwrap();
    assert!(again.up_to_date());
    assert_eq!(again.committed, None);
    assert_eq!(commits(&setup.output).await.len(), 2);
    assert_eq!(rows(&setup.output).await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_the_ranges_and_writes_nothing() {
    let setup = setup().await;
    write_delta(&setup.history, setup.late.clone(), SaveMode::Append).await;
    let options = BackfillOptions { dry_run: true, ..BackfillOptions::default() };
    let plan = backfill(&setup.feature, options).await.unwrap().plan;
    assert_eq!(plan.ranges.len(), 3);
    assert!(plan.rows_replaced > 0);
    assert_eq!(commits(&setup.output).await.len(), 1, "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_range_recomputes_those_windows_only() {
    let setup = setup().await;
    write_delta(&setup.history, setup.late.clone(), SaveMode::Append).await;
    let starts = touched_starts(&setup.late);
    let first = *starts.first().unwrap();
    // The first spot's windows only: up to the last start before the second spot.
    let end = starts.iter().copied().take_while(|s| s - first < 3 * HOUR).max().unwrap() + 1;
    let before = rows(&setup.output).await;
    let options = BackfillOptions { force: Some((first, end)), ..BackfillOptions::default() };
    let summary = backfill(&setup.feature, options).await.unwrap();
    assert_eq!(summary.plan.ranges.len(), 1);
    let forced: BTreeSet<i64> = starts.iter().copied().filter(|s| *s < end).collect();
    let after = rows(&setup.output).await;
    let full = recompute(&setup).await;
    assert_eq!(select(&after, &forced, true), select(&full, &forced, true), "forced windows recomputed");
    assert_eq!(select(&after, &forced, false), select(&before, &forced, false), "others untouched");
    // The recorded history version stays: the other late rows are still to be repaired.
    let rest = backfill(&setup.feature, BackfillOptions::default()).await.unwrap();
    assert_eq!(rest.plan.ranges.len(), 3);
    assert_eq!(rows(&setup.output).await, full);
}

/// Appends `rows` to the output table when the backfill is about to commit (first attempt).
fn racing_append(output: String, rows: RecordBatch) -> BeforeCommit {
    Arc::new(move |attempt| {
        let (output, rows) = (output.clone(), rows.clone());
        Box::pin(async move {
            if attempt == 1 {
                write_delta(&output, rows, SaveMode::Append).await;
            }
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_racing_the_backfill_is_retried_never_lost_or_doubled() {
    let setup = setup().await;
    write_delta(&setup.history, setup.late.clone(), SaveMode::Append).await;
    let starts = touched_starts(&setup.late);
    let before = rows(&setup.output).await;
    // A writer re-appends some rows inside the ranges (as a stray second writer of the same
    // windows would): the backfill's commit conflicts, it retries, and its result wins.
    let inside = select(&before, &starts, true).slice(0, 5);
    let options = BackfillOptions {
        before_commit: Some(racing_append(setup.output.clone(), inside)),
        ..BackfillOptions::default()
    };
    let summary = backfill(&setup.feature, options).await.unwrap();
    assert_eq!(summary.attempts, 2, "the conflicting append forced one retry");
    assert_eq!(rows(&setup.output).await, recompute(&setup).await, "no row lost or doubled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_outside_the_ranges_is_kept() {
    let setup = setup().await;
    write_delta(&setup.history, setup.late.clone(), SaveMode::Append).await;
    let starts = touched_starts(&setup.late);
    let before = rows(&setup.output).await;
    // Rows of windows the backfill does not touch, appended concurrently: they stay.
    let outside = select(&before, &starts, false).slice(0, 3);
    let options = BackfillOptions {
        before_commit: Some(racing_append(setup.output.clone(), outside.clone())),
        ..BackfillOptions::default()
    };
    backfill(&setup.feature, options).await.unwrap();
    let after = rows(&setup.output).await;
    let full = recompute(&setup).await;
    assert_eq!(after.num_rows(), full.num_rows() + 3, "the concurrent rows were kept, nothing else added");
    assert_eq!(select(&after, &starts, true), select(&full, &starts, true));
}

/// Sessions of a key, as (start, end), from a sorted output.
fn sessions_of(batch: &RecordBatch, user: &str) -> Vec<(i64, i64)> {
    let users = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
    let users = users.as_string::<i32>();
    let starts = batch.column(1).as_primitive::<TimestampMicrosecondType>();
    let ends = batch.column(2).as_primitive::<TimestampMicrosecondType>();
    (0..batch.num_rows()).filter(|&i| users.value(i) == user).map(|i| (starts.value(i), ends.value(i))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_rows_merging_sessions_are_repaired_whole() {
    let setup = setup_feature("sessions").await;
    let before = rows(&setup.output).await;
    write_delta(&setup.history, setup.late.clone(), SaveMode::Append).await;
    let summary = backfill(&setup.feature, BackfillOptions::default()).await.unwrap();
    assert_eq!(summary.attempts, 1);
    assert!(!summary.plan.ranges.is_empty());
    let after = rows(&setup.output).await;
    let full = recompute(&setup).await;
    assert_eq!(after, full, "backfilled sessions == full recompute");
    // The late spots merged sessions: some key has fewer, longer sessions now.
    let users = setup.late.column_by_name("user_id").unwrap().as_string::<i32>();
    let merged = (0..users.len()).any(|i| {
        let user = users.value(i);
        sessions_of(&after, user).len() < sessions_of(&before, user).len()
    });
    assert!(merged, "the fixture's late events merge sessions");
    // Sessions starting outside the replaced ranges are the very rows from before.
    let outside = |batch: &RecordBatch| -> RecordBatch {
        let starts = batch.column(1).as_primitive::<TimestampMicrosecondType>();
        let mask: BooleanArray = (0..batch.num_rows())
            .map(|i| {
                Some(
                    !summary
                        .plan
                        .ranges
                        .iter()
                        .any(|&(a, b)| a <= starts.value(i) / 1000 && starts.value(i) / 1000 < b),
                )
            })
            .collect();
        filter_record_batch(batch, &mask).unwrap()
    };
    assert_eq!(outside(&after), outside(&before));
    let again = backfill(&setup.feature, BackfillOptions::default()).await.unwrap();
    assert!(again.up_to_date());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_histories_and_missing_outputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let definitions = Definitions::parse("d.yaml", DEFINITIONS, dir.path()).unwrap();
    let feature = compile_feature(&definitions, definitions.feature("velocity").unwrap()).unwrap();
    let options = BackfillOptions {
        history: Some(lockstep_features::Location::Parquet(dir.path().join("h.parquet").display().to_string())),
        ..BackfillOptions::default()
    };
    let error = backfill(&feature, options).await.unwrap_err().to_string();
    assert!(error.contains("needs a Delta history"), "{error}");
    let error = backfill(&feature, BackfillOptions::default()).await.unwrap_err().to_string();
    assert!(error.contains("not a Delta table") || error.contains("lockstep batch"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_rows_landing_during_a_backfill_are_left_for_the_next_run() {
    let setup = setup().await;
    // Two late batches: the first lands before the backfill, the second while it runs.
    let half = setup.late.num_rows() / 2;
    let (first, second) = (setup.late.slice(0, half), setup.late.slice(half, setup.late.num_rows() - half));
    write_delta(&setup.history, first, SaveMode::Append).await;
    let history = setup.history.clone();
    let hook: BeforeCommit = Arc::new(move |attempt| {
        let (history, second) = (history.clone(), second.clone());
        Box::pin(async move {
            if attempt == 1 {
                write_delta(&history, second, SaveMode::Append).await;
            }
        })
    });
    let summary = backfill(&setup.feature, BackfillOptions { before_commit: Some(hook), ..BackfillOptions::default() })
        .await
        .unwrap();
    assert_eq!(summary.attempts, 1, "a history append does not conflict with the output commit");
    assert_eq!(summary.plan.to_version, Some(1), "the run records the version it read");
    // The next run picks up version 2; then the table equals a full recompute.
    let next = backfill(&setup.feature, BackfillOptions::default()).await.unwrap();
    assert_eq!((next.plan.from_version, next.plan.to_version), (Some(1), Some(2)));
    assert!(!next.up_to_date());
    assert_eq!(rows(&setup.output).await, recompute(&setup).await, "no late row lost");
}
