//! `lockstep training-set` as a user runs it: CSV labels in, one row per label out, in order,
//! with `<feature set>__<aggregate>` columns; bad labels fail clearly.

use std::path::Path;
use std::process::{Command, Output};

use arrow::array::{Array, AsArray};

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep")).args(args).arg("--quiet").output().expect("run lockstep")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// `lockstep training-set` of the example definitions over `events`, writing `out`.
fn training(labels: &Path, features: &str, events: &str, out: &Path, extra: &[&str]) -> Output {
    let examples = examples();
    let mut args =
        vec!["training-set", examples.as_str(), "--labels", labels.to_str().unwrap(), "--features", features];
    args.extend(["--history", events, "--out", out.to_str().unwrap()]);
    args.extend(extra);
    lockstep(&args)
}

fn examples() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/transactions.yaml").display().to_string()
}

#[test]
fn csv_labels_get_one_row_each_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.parquet").display().to_string();
    let generated = lockstep(&["generate", "--events", "5000", "--users", "20", "--days", "1", "--out", &events]);
    assert!(generated.status.success(), "{}", text(&generated));
    let labels = dir.path().join("labels.csv");
    let mut csv = String::from("user_id,label_time,is_fraud\n");
    for (i, hour) in (0..24).rev().enumerate() {
        csv.push_str(&format!("u{:06},2026-01-05T{hour:02}:30:00Z,{}\n", i % 25 + 1, i % 2));
    }
    std::fs::write(&labels, csv).unwrap();
    let out = dir.path().join("training.parquet");
    let features = "user_velocity,merchant_daily,user_sessions";
    let ran = training(&labels, features, &events, &out, &["--label-time", "label_time"]);
    // merchant_daily is keyed by merchant_id, which these labels lack.
    assert!(!ran.status.success());
    assert!(text(&ran).contains("keyed by `merchant_id`, but the labels have no such column"), "{}", text(&ran));
    assert!(!out.exists(), "no partial output");

    let ran = training(&labels, "user_velocity,user_sessions", &events, &out, &["--label-time", "label_time"]);
    assert!(ran.status.success(), "{}", text(&ran));
    assert!(text(&ran).contains("training set: 24 labels"), "{}", text(&ran));
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(std::fs::File::open(&out).unwrap(), 1024)
            .unwrap();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(batch.num_rows(), 24);
    let names: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(&names[..4], &["user_id", "label_time", "is_fraud", "user_velocity__tx_count"]);
    assert!(names.contains(&"user_sessions__total_amount".to_string()));
    // Labels keep their order (hours descending) and counts are never null.
    let times = arrow::compute::cast(batch.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
    assert!(times.as_string::<i32>().value(0).contains("23:30"), "{:?}", times);
    let counts = batch.column(3).as_primitive::<arrow::datatypes::Int64Type>();
    assert_eq!(counts.null_count(), 0);
    assert!(counts.values().iter().any(|&c| c > 0), "some label sees transactions in its last hour");

    // Two time columns and no --label-time: a clear error naming both.
    let two = dir.path().join("two.csv");
    std::fs::write(&two, "user_id,label_time,created_at\nu000001,2026-01-05T10:00:00Z,2026-01-05T09:00:00Z\n").unwrap();
    let ran = training(&two, "user_velocity", &events, &out, &[]);
    assert!(!ran.status.success());
    assert!(text(&ran).contains("several timestamp columns (label_time, created_at)"), "{}", text(&ran));
}
