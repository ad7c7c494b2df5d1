//! compare on two outputs that differ in every way the report distinguishes, with exact counts.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use lockstep_compare::{CompareOptions, Input, compare};
use lockstep_features::Location;

fn ts() -> DataType {
    lockstep_features::value::timestamp_type()
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, true),
        Field::new("window_start", ts(), false),
        Field::new("window_end", ts(), false),
        Field::new("n", DataType::Int64, false),
        Field::new("total", DataType::Float64, true),
    ]))
}

type Row = (Option<&'static str>, i64, i64, Option<f64>);

fn batch(rows: &[Row]) -> RecordBatch {
    let keys: ArrayRef = Arc::new(rows.iter().map(|r| r.0).collect::<StringArray>());
    let starts = TimestampMillisecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()).with_timezone("UTC");
    let ends =
        TimestampMillisecondArray::from(rows.iter().map(|r| r.1 + 60_000).collect::<Vec<_>>()).with_timezone("UTC");
    let counts = Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>());
    let totals = rows.iter().map(|r| r.3).collect::<Float64Array>();
    RecordBatch::try_new(schema(), vec![keys, Arc::new(starts), Arc::new(ends), Arc::new(counts), Arc::new(totals)])
        .unwrap()
}

fn write(path: &std::path::Path, batch: &RecordBatch) -> Input {
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
    Input::Table(Location::Parquet(path.display().to_string()))
}

const M: i64 = 60_000;

/// Left and right differ: identical, only left, NaN vs NaN, value vs null, null keys, 0.0 vs
/// -0.0, a last-bit difference, only right.
fn sides(dir: &std::path::Path) -> (Input, Input) {
    let left = batch(&[
        (Some("a"), 0, 1, Some(1.0)),
        (Some("a"), M, 1, Some(2.0)),
        (Some("b"), 0, 1, Some(f64::NAN)),
        (Some("b"), M, 1, Some(1.0)),
        (None, 0, 2, Some(5.0)),
        (Some("c"), 0, 1, Some(0.0)),
        (Some("c"), M, 1, Some(1.0)),
    ]);
    let right = batch(&[
        (Some("c"), M, 1, Some(1.0 + 2.0 * f64::EPSILON)),
        (Some("a"), 0, 1, Some(1.0)),
        (Some("b"), 0, 1, Some(f64::NAN)),
        (Some("b"), M, 1, None),
        (None, 0, 3, Some(5.0)),
        (Some("c"), 0, 1, Some(-0.0)),
        (Some("d"), 0, 1, Some(1.0)),
    ]);
    (write(&dir.join("left.parquet"), &left), write(&dir.join("right.parquet"), &right))
}

/// Too-late rows for the windows (a, M), (b, M) and (z, 0), and a session event of `c` at 30s.
fn late(dir: &std::path::Path) -> String {
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, true),
        Field::new("amount", DataType::Float64, true),
        Field::new("late_event_time", ts(), false),
        Field::new("late_window_start", ts(), true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec![Some("a"), Some("b"), Some("z"), Some("c")])),
            Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0, 4.0])),
            Arc::new(TimestampMillisecondArray::from(vec![M + 5, M + 7, 9, 30_000]).with_timezone("UTC")),
            Arc::new(TimestampMillisecondArray::from(vec![Some(M), Some(M), Some(0), None]).with_timezone("UTC")),
        ],
    )
    .unwrap();
    let path = dir.join("late.parquet");
    write(&path, &batch);
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_difference_is_counted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (left, right) = sides(dir.path());
    let report = compare(&left, &right, &CompareOptions::default()).await.unwrap();
    assert_eq!(report.keys, vec!["user_id"]);
    assert_eq!((report.rows_left, report.rows_right, report.matched), (7, 7, 6));
    assert_eq!(report.only_left.rows, 1);
    assert_eq!(report.only_left.examples[0].key, vec!["a"]);
    assert_eq!(report.only_right.rows, 1);
    assert_eq!(report.only_right.examples[0].key, vec!["d"]);
    // (b, M) value vs null, (null, 0) 2 vs 3, (c, 0) 0.0 vs -0.0, (c, M) last bits; NaN == NaN.
    assert_eq!(report.changed_rows, 4);
    let column = |name: &str| report.columns.iter().find(|c| c.column == name).unwrap();
    assert_eq!(column("window_end").rows, 0);
    assert_eq!(column("n").rows, 1);
    assert_eq!(column("n").max_abs, Some(1.0));
    assert_eq!(column("total").rows, 3);
    assert_eq!(column("total").max_abs, Some(2.0 * f64::EPSILON));
    assert_eq!(column("n").examples[0].key, vec!["null"]);
    assert_eq!((report.explained, report.unexplained), (0, 6));
    assert!(!report.identical());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tolerance_forgives_small_float_differences_only() {
    let dir = tempfile::tempdir().unwrap();
    let (left, right) = sides(dir.path());
    let options = CompareOptions { tolerance: Some(1e-9), ..CompareOptions::default() };
    let report = compare(&left, &right, &options).await.unwrap();
    // 0.0 vs -0.0 and the last-bit difference are within tolerance; value vs null is not.
    assert_eq!(report.changed_rows, 2);
    assert_eq!(report.columns.iter().find(|c| c.column == "total").unwrap().rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_late_events_explain_exactly_their_windows() {
    let dir = tempfile::tempdir().unwrap();
    let (left, right) = sides(dir.path());
    let options = CompareOptions { late: Some(late(dir.path())), ..CompareOptions::default() };
    let report = compare(&left, &right, &options).await.unwrap();
    assert_eq!(report.late_events, Some(4));
    // (a, M) only left and (b, M) changed by their windows, (c, 0) by the session event inside
    // it; (c, M), (null, 0) and (d, 0) are not explained.
    assert_eq!((report.explained, report.unexplained), (3, 3));
    assert_eq!(report.only_left.explained, 1);
    assert_eq!(report.changed_explained, 2);
    assert_eq!(report.only_right.explained, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_equals_itself_in_another_order_and_format() {
    let dir = tempfile::tempdir().unwrap();
    let (left, _) = sides(dir.path());
    let rows = batch(&[
        (Some("c"), M, 1, Some(1.0)),
        (Some("c"), 0, 1, Some(0.0)),
        (None, 0, 2, Some(5.0)),
        (Some("b"), M, 1, Some(1.0)),
        (Some("b"), 0, 1, Some(f64::NAN)),
        (Some("a"), M, 1, Some(2.0)),
        (Some("a"), 0, 1, Some(1.0)),
    ]);
    let delta = dir.path().join("delta").display().to_string();
    std::fs::create_dir_all(&delta).unwrap();
    let table = deltalake::DeltaTable::try_from_url(lockstep_batch::source::to_url(&delta).unwrap()).await.unwrap();
    table.write(vec![rows]).await.unwrap();
    let report = compare(&left, &Input::parse(&delta).unwrap(), &CompareOptions::default()).await.unwrap();
    assert!(report.identical(), "{}", report.render());
    assert_eq!(report.matched, 7);
}

/// A side that holds a (key, window_start) twice is not identical to one holding it once, even
/// when every matched pair agrees; the report names the side that repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_row_is_a_difference() {
    let dir = tempfile::tempdir().unwrap();
    let once = [(Some("a"), 0, 1, Some(1.0)), (Some("a"), M, 1, Some(2.0)), (None, 0, 2, Some(f64::NAN))];
    let single = write(&dir.path().join("once.parquet"), &batch(&once));
    let mut rows = once.to_vec();
    rows.insert(1, (Some("a"), M, 1, Some(2.0)));
    rows.push((None, 0, 2, Some(f64::NAN)));
    rows.push((None, 0, 2, Some(f64::NAN)));
    let repeated = write(&dir.path().join("repeated.parquet"), &batch(&rows));
    let report = compare(&single, &repeated, &CompareOptions::default()).await.unwrap();
    assert!(!report.identical(), "{}", report.render());
    assert_eq!((report.rows_left, report.rows_right), (3, 6));
    assert_eq!((report.repeated_left, report.repeated_right), (0, 3), "{}", report.render());
    assert_eq!(report.unexplained, 3);
    assert!(report.render().contains("the right holds some (key, window_start) more than once"));
    let report = compare(&repeated, &single, &CompareOptions::default()).await.unwrap();
    assert_eq!((report.repeated_left, report.repeated_right), (3, 0), "{}", report.render());
    let report = compare(&repeated, &repeated, &CompareOptions::default()).await.unwrap();
    assert!(!report.identical(), "a side repeating rows is not identical even to itself");
    assert_eq!(report.changed_rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_schemas_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (left, _) = sides(dir.path());
    let other = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, true),
        Field::new("window_start", ts(), false),
        Field::new("window_end", ts(), false),
        Field::new("n", DataType::Float64, false),
        Field::new("extra", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        other,
        vec![
            Arc::new(StringArray::from(vec!["a"])),
            Arc::new(TimestampMillisecondArray::from(vec![0]).with_timezone("UTC")),
            Arc::new(TimestampMillisecondArray::from(vec![M]).with_timezone("UTC")),
            Arc::new(Float64Array::from(vec![1.0])),
            Arc::new(Int64Array::from(vec![1])),
        ],
    )
    .unwrap();
    let right = write(&dir.path().join("other.parquet"), &batch);
    let error = compare(&left, &right, &CompareOptions::default()).await.unwrap_err().to_string();
    assert!(error.contains("different schemas"), "{error}");
    assert!(error.contains("`n` is Int64 on the left but Float64 on the right"), "{error}");
    assert!(error.contains("`total` is only on the left"), "{error}");
    assert!(error.contains("`extra` is only on the right"), "{error}");
    let error = compare(&left, &Input::parse("/no/such/table").unwrap(), &CompareOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("/no/such/table"), "{error}");
}
