//! The command line as a user meets it: every kind of definitions error names file, line and
//! column and how to mend it; missing or corrupt input fails clearly and leaves no output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep")).args(args).output().expect("run lockstep")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

const GOOD: &str = r#"sources:
  transactions:
    schema:
      user_id: string
      merchant_id: string
      amount: float64
      event_type: string
      event_time: timestamp
    event_time: event_time
features:
  user_velocity:
    source: transactions
    key: [user_id]
    filter: "amount > 0"
    window: { sliding: 1h, every: 1m }
    aggregations:
      tx_count: count(*)
      total_amount: sum(amount)
      purchases: count(*) FILTER (WHERE event_type = 'purchase')
"#;

fn write_definitions(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("defs.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Replaces `from` with `to` in the good file, validates it, and checks the error's position
/// (the line of `to`) and message.
fn assert_error(from: &str, to: &str, message: &str, help: &str) {
    assert_error_at(from, to, to, message, help);
}

/// Like [`assert_error`], with the error expected on the line of the last occurrence of `at`.
fn assert_error_at(from: &str, to: &str, at: &str, message: &str, help: &str) {
    assert!(GOOD.contains(from), "test setup: `{from}` not in the good file");
    let text = GOOD.replacen(from, to, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = write_definitions(dir.path(), &text);
    let output = lockstep(&["validate", path.to_str().unwrap()]);
    assert!(!output.status.success(), "validate accepted a bad file:\n{text}");
    let err = stderr(&output);
    let offset = text.rfind(at).unwrap();
    let line = text[..offset].matches('\n').count() + 1;
    let location = format!("{}:{line}:", path.display());
    assert!(err.contains(&location), "expected an error at {location}, got:\n{err}");
    assert!(err.contains(message), "expected `{message}` in:\n{err}");
    assert!(err.contains(help), "expected the hint `{help}` in:\n{err}");
    // A bad file never starts a job.
    let batch = lockstep(&[
        "batch",
        path.to_str().unwrap(),
        "--feature",
        "user_velocity",
        "--history",
        "x.parquet",
        "--out",
        dir.path().join("out.parquet").to_str().unwrap(),
    ]);
    assert!(!batch.status.success());
    assert!(!dir.path().join("out.parquet").exists());
}

#[test]
fn a_good_file_validates() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_definitions(dir.path(), GOOD);
    let output = lockstep(&["validate", path.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        out.contains(
            "user_velocity ← transactions by [user_id], sliding 1h every 1m: tx_count, total_amount, purchases"
        ),
        "{out}"
    );
}

#[test]
fn unknown_column_in_an_aggregation() {
    assert_error("sum(amount)", "sum(amout)", "unknown column `amout`", "did you mean `amount`?");
}

#[test]
fn unknown_column_in_the_filter() {
    assert_error("\"amount > 0\"", "\"amont > 0\"", "unknown column `amont` in the filter", "did you mean `amount`?");
}

#[test]
fn type_mismatch_in_an_aggregation() {
    assert_error("sum(amount)", "sum(user_id)", "type mismatch", "sum needs a numeric argument");
}

#[test]
fn filter_that_is_not_a_condition() {
    assert_error("\"amount > 0\"", "\"amount + 1\"", "not a true/false condition", "write a comparison");
}

#[test]
fn unknown_function() {
    assert_error("sum(amount)", "summ(amount)", "unknown aggregate function `summ`", "did you mean `sum`?");
}

#[test]
fn sliding_size_not_a_multiple_of_every() {
    assert_error(
        "{ sliding: 1h, every: 1m }",
        "{ sliding: 1h, every: 7m }",
        "sliding size 1h is not a multiple of every 7m",
        "e.g. 56m or 1h3m",
    );
}

#[test]
fn duplicate_aggregation_names() {
    assert_error_at(
        "      total_amount: sum(amount)\n",
        "      total_amount: sum(amount)\n      total_amount: avg(amount)\n",
        "total_amount: avg",
        "duplicate name `total_amount`",
        "unique name",
    );
}

#[test]
fn key_column_not_in_the_schema() {
    assert_error(
        "key: [user_id]",
        "key: [customer_id]",
        "unknown column `customer_id`",
        "has columns: user_id, merchant_id",
    );
}

#[test]
fn unknown_field_with_a_suggestion() {
    assert_error("    window:", "    windw:", "unknown field `windw`", "did you mean `window`?");
}

#[test]
fn bad_duration() {
    assert_error("every: 1m", "every: 1 minute", "not a duration", "");
}

#[test]
fn unknown_source() {
    assert_error(
        "source: transactions",
        "source: transaction",
        "unknown source `transaction`",
        "did you mean `transactions`?",
    );
}

#[test]
fn unknown_type() {
    assert_error("amount: float64", "amount: double", "unknown type `double`", "did you mean");
}

#[test]
fn offset_not_shorter_than_the_step() {
    assert_error(
        "{ sliding: 1h, every: 1m }",
        "{ sliding: 1h, every: 1m, offset: 2m }",
        "offset 2m is not shorter than the step 1m",
        "use 0s",
    );
}

#[test]
fn invalid_yaml() {
    // The scanner notices the unclosed list on the next line.
    assert_error_at("    key: [user_id]", "    key: [user_id", "    filter:", "not valid YAML", "indentation");
}

#[test]
fn every_error_is_reported_at_once() {
    let text = GOOD.replacen("sum(amount)", "sum(amout)", 1).replacen("key: [user_id]", "key: [customer]", 1);
    let dir = tempfile::tempdir().unwrap();
    let path = write_definitions(dir.path(), &text);
    let err = stderr(&lockstep(&["validate", path.to_str().unwrap()]));
    assert!(err.contains("unknown column `customer`") && err.contains("unknown column `amout`"), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");
}

fn generate(dir: &Path) -> PathBuf {
    let path = dir.join("tx.parquet");
    let output = lockstep(&[
        "generate",
        "--events",
        "3000",
        "--users",
        "50",
        "--days",
        "1",
        "--seed",
        "3",
        "--out",
        path.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    path
}

#[test]
fn batch_writes_parquet_and_reports_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let history = generate(dir.path());
    let defs = write_definitions(dir.path(), GOOD);
    let out = dir.path().join("out.parquet");
    let output = lockstep(&[
        "batch",
        defs.to_str().unwrap(),
        "--feature",
        "user_velocity",
        "--history",
        history.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("events →") && stdout.contains("windows in"), "{stdout}");
    let file = std::fs::File::open(&out).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let names: Vec<String> = reader.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["user_id", "window_start", "window_end", "tx_count", "total_amount", "purchases"]);
    let rows: usize = reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
    let reported: usize = stdout.split(" windows").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(rows, reported);
    // Nothing else is left beside the output.
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("lockstep"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn missing_history_fails_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let defs = write_definitions(dir.path(), GOOD);
    let out = dir.path().join("out.parquet");
    let missing = dir.path().join("nope.parquet");
    let output = lockstep(&[
        "batch",
        defs.to_str().unwrap(),
        "--feature",
        "user_velocity",
        "--history",
        missing.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("nope.parquet") && err.contains("no such file or folder"), "{err}");
    assert!(std::fs::read_dir(dir.path()).unwrap().count() == 1, "only the definitions file remains");
}

#[test]
fn corrupt_history_fails_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let defs = write_definitions(dir.path(), GOOD);
    let corrupt = dir.path().join("corrupt.parquet");
    std::fs::write(&corrupt, b"PAR1 this is not really parquet PAR1").unwrap();
    let out = dir.path().join("out");
    let output = lockstep(&[
        "batch",
        defs.to_str().unwrap(),
        "--feature",
        "user_velocity",
        "--history",
        corrupt.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        "parquet",
    ]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("corrupt.parquet") && err.contains("Parquet"), "{err}");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names.len(), 2, "only the inputs remain: {names:?}");
}

#[test]
fn history_missing_a_declared_column_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let history = generate(dir.path());
    let defs = write_definitions(
        dir.path(),
        &GOOD.replacen("      amount: float64\n", "      amount: float64\n      channel: string\n", 1),
    );
    let output = lockstep(&[
        "batch",
        defs.to_str().unwrap(),
        "--feature",
        "user_velocity",
        "--history",
        history.to_str().unwrap(),
        "--out",
        dir.path().join("o.parquet").to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("column `channel` of source `transactions` is missing"), "{}", stderr(&output));
    assert!(!dir.path().join("o.parquet").exists());
}

#[test]
fn overflow_mid_job_leaves_no_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"sources:
  s:
    schema: { k: string, q: int64, t: timestamp }
    event_time: t
features:
  f:
    source: s
    key: [k]
    window: { tumbling: 1h }
    aggregations:
      total: sum(q)
"#;
    let defs = write_definitions(dir.path(), text);
    let history = dir.path().join("h.parquet");
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("k", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new("q", arrow::datatypes::DataType::Int64, false),
        arrow::datatypes::Field::new(
            "t",
            arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
            false,
        ),
    ]));
    // Many fine windows, then one that overflows.
    let n = 20_000;
    let keys: Vec<String> = (0..n).map(|i| format!("k{:05}", i % 97)).chain(["zz".into(), "zz".into()]).collect();
    let qty: Vec<i64> = (0..n).map(|i| i as i64).chain([i64::MAX, 1]).collect();
    let times: Vec<i64> = (0..n).map(|i| i as i64 * 60_000).chain([0, 1]).collect();
    let batch = arrow::array::RecordBatch::try_new(
        schema.clone(),
        vec![
            std::sync::Arc::new(arrow::array::StringArray::from(keys)),
            std::sync::Arc::new(arrow::array::Int64Array::from(qty)),
            std::sync::Arc::new(arrow::array::TimestampMillisecondArray::from(times)),
        ],
    )
    .unwrap();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&history).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    for (out, format) in [("o.parquet", "parquet"), ("folder", "parquet"), ("table", "delta")] {
        let path = dir.path().join(out);
        let output = lockstep(&[
            "batch",
            defs.to_str().unwrap(),
            "--feature",
            "f",
            "--history",
            history.to_str().unwrap(),
            "--out",
            path.to_str().unwrap(),
            "--format",
            format,
            "--quiet",
        ]);
        assert!(!output.status.success(), "{out}");
        assert!(stderr(&output).contains("overflows int64"), "{}", stderr(&output));
        let visible = match format {
            "delta" => path.join("_delta_log").read_dir().map(|d| d.count()).unwrap_or(0),
            _ => usize::from(path.exists()),
        };
        assert_eq!(visible, 0, "{out}: partial output is visible");
    }
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("lockstep"))
        .collect();
    assert!(names.is_empty(), "temporary files left: {names:?}");
}

/// Kafka client settings: a reserved one is refused before anything connects, a malformed one
/// says how to write it, and an unknown one is librdkafka's error, naming it.
#[test]
fn kafka_settings_are_checked() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/transactions.yaml");
    let run = |flag: &str, setting: &str| {
        // Nothing listens on port 9: a setting that passes would end in a broker timeout.
        let output = lockstep(&[
            "stream",
            examples,
            "--feature",
            "user_velocity",
            "--brokers",
            "127.0.0.1:9",
            flag,
            setting,
            "--no-online",
        ]);
        assert!(!output.status.success());
        stderr(&output)
    };
    let message = run("--kafka-config", "isolation.level=read_uncommitted");
    assert!(message.contains("--kafka-config") && message.contains("`isolation.level`"), "{message}");
    assert!(message.contains("lockstep sets it itself"), "{message}");
    let message = run("--producer-config", "transactional.id=mine");
    assert!(message.contains("--producer-config") && message.contains("`transactional.id`"), "{message}");
    let message = run("--kafka-config", "linger.ms");
    assert!(message.contains("write it as KEY=VALUE"), "{message}");
    let message = run("--kafka-config", "no.such.setting=1");
    assert!(message.contains("no.such.setting"), "{message}");
}
