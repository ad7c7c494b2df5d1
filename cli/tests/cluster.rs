//! Batch, backfill and training-set jobs on a Ballista cluster started from the `lockstep`
//! binary (a scheduler and two executors on 127.0.0.1): bit-identical to in-process runs, and a
//! job survives losing an executor mid-run.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep")).args(args).arg("--quiet").output().expect("run lockstep")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn examples() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/transactions.yaml").display().to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the {what} exited with {status} before listening on {port}");
        }
        assert!(Instant::now() < deadline, "the {what} did not listen on {port} within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A scheduler and two executors, stopped on drop.
struct Cluster {
    url: String,
    scheduler: Child,
    executors: Vec<Child>,
    work_dirs: Vec<PathBuf>,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let port = free_port();
        let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let mut scheduler = Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(["scheduler", "--listen", &format!("127.0.0.1:{port}"), "--executor-timeout", "4"])
            .env("LOCKSTEP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log("scheduler"))
            .spawn()
            .unwrap();
        wait_for_port(port, "scheduler", &mut scheduler);
        let mut executors = Vec::new();
        let mut work_dirs = Vec::new();
        for i in 0..2 {
            let (flight, grpc) = (free_port(), free_port());
            let work = dir.join(format!("executor-{i}"));
            std::fs::create_dir_all(&work).unwrap();
            let mut executor = Command::new(env!("CARGO_BIN_EXE_lockstep"))
                .args(["executor", "--scheduler", &format!("127.0.0.1:{port}")])
                .args(["--port", &flight.to_string(), "--grpc-port", &grpc.to_string()])
                .args(["--slots", "2", "--heartbeat", "1", "--memory-limit", "512MiB"])
                .args(["--work-dir", work.to_str().unwrap()])
                .env("LOCKSTEP_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log(&format!("executor-{i}")))
                .spawn()
                .unwrap();
            wait_for_port(flight, "executor", &mut executor);
            executors.push(executor);
            work_dirs.push(work);
        }
        // Both executors have registered once their first heartbeats are in.
        std::thread::sleep(Duration::from_secs(2));
        Cluster { url: format!("df://127.0.0.1:{port}"), scheduler, executors, work_dirs }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.executors.iter_mut().chain([&mut self.scheduler]) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `lockstep compare` finds no difference at all (bitwise) between two outputs with rows.
fn assert_identical(left: &str, right: &str) {
    let compared = lockstep(&["compare", left, right]);
    let out = text(&compared);
    assert!(compared.status.success() && out.contains("differences: 0"), "{left} vs {right}:\n{out}");
    let rows = out.lines().find(|l| l.contains("rows")).unwrap_or_default().to_string();
    assert!(!rows.contains(" 0 rows"), "both sides are empty:\n{out}");
}

fn run_ok(args: &[&str]) -> String {
    let output = lockstep(args);
    let out = text(&output);
    assert!(output.status.success(), "lockstep {args:?} failed:\n{out}");
    out
}

#[test]
fn jobs_on_a_cluster_give_the_in_process_bits_and_survive_a_lost_executor() {
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &str| dir.path().join(p).display().to_string();
    let examples = examples();
    // The same events as a Parquet file and as a Delta table.
    let generate = |out: &str, format: &str| {
        let args = ["generate", "--events", "30000", "--users", "300", "--days", "2", "--seed", "11"];
        run_ok(&[&args[..], &["--format", format, "--out", out]].concat());
    };
    generate(&path("events.parquet"), "parquet");
    generate(&path("history"), "delta");
    let cluster = Cluster::start(dir.path());

    // The SPEC example, a FILTER/stddev feature set and a session feature set, from Parquet and
    // from Delta: the cluster's rows are the in-process rows, bit for bit.
    for feature in ["user_velocity", "merchant_daily", "user_sessions"] {
        for (history, kind) in [(path("events.parquet"), "parquet"), (path("history"), "delta")] {
            let local = path(&format!("{feature}-{kind}-local.parquet"));
            let remote = path(&format!("{feature}-{kind}-cluster.parquet"));
            let common = ["batch", examples.as_str(), "--feature", feature, "--history", history.as_str()];
            run_ok(&[&common[..], &["--out", &local]].concat());
            let out =
                run_ok(&[&common[..], &["--out", &remote, "--cluster", &cluster.url, "--partitions", "4"]].concat());
            assert!(out.contains("on the cluster"), "{out}");
            assert_identical(&local, &remote);
        }
    }

    // Delta output and a backfill after late rows land, on the cluster, equal the same steps in
    // process.
    let late = path("late.parquet");
    run_ok(&["generate", "--events", "500", "--users", "300", "--days", "1", "--seed", "12", "--out", &late]);
    for (name, cluster_args) in [("local", vec![]), ("cluster", vec!["--cluster", cluster.url.as_str()])] {
        let history = path(&format!("history-{name}"));
        copy_dir(&dir.path().join("history"), Path::new(&history));
        let out = path(&format!("velocity-{name}"));
        let batch = ["batch", examples.as_str(), "--feature", "user_velocity", "--history", &history, "--out", &out];
        run_ok(&[&batch[..], &cluster_args[..]].concat());
        append_to_delta(&late, &history);
        let backfill =
            ["backfill", examples.as_str(), "--feature", "user_velocity", "--history", &history, "--out", &out];
        let repaired = run_ok(&[&backfill[..], &cluster_args[..]].concat());
        assert!(repaired.contains("in one commit"), "{repaired}");
    }
    assert_identical(&path("velocity-local"), &path("velocity-cluster"));

    // A training set on the cluster equals the in-process one.
    let labels = dir.path().join("labels.csv");
    let mut csv = String::from("user_id,label_time\n");
    for i in 0..400 {
        csv.push_str(&format!("u{:06},2026-01-05T{:02}:{:02}:17Z\n", i % 310 + 1, i % 24, (i * 7) % 60));
    }
    std::fs::write(&labels, csv).unwrap();
    let events = path("events.parquet");
    for (name, cluster_args) in [("local", vec![]), ("cluster", vec!["--cluster", cluster.url.as_str()])] {
        let out = path(&format!("training-{name}.parquet"));
        let args = ["training-set", examples.as_str(), "--labels", labels.to_str().unwrap()];
        let args = [&args[..], &["--features", "user_velocity,user_sessions", "--history", &events]].concat();
        run_ok(&[&args[..], &["--out", &out], &cluster_args[..]].concat());
    }
    // One row per label, in label order: the two files hold the same rows (Arrow equality
    // compares value bytes, so NaN, -0.0 and nulls count exactly).
    let (local, remote) =
        (read_parquet(&path("training-local.parquet")), read_parquet(&path("training-cluster.parquet")));
    assert_eq!(local.num_rows(), 400);
    assert_eq!(local, remote);

    // The scheduler planned every job itself, with lockstep's window stage.
    let log = std::fs::read_to_string(dir.path().join("scheduler.log")).unwrap();
    for feature in ["user_velocity", "merchant_daily", "user_sessions"] {
        assert!(log.contains(&format!("FeatureWindowExec: feature={feature}")), "no {feature} job in:\n{log}");
    }
    assert!(log.matches("Job finished successfully").count() >= 9, "{log}");

    lose_an_executor_mid_job(cluster, dir.path(), &examples);
}

/// One executor is killed once it holds shuffle output of the running job: the scheduler sees
/// it gone, runs its tasks again on the other, and the job's output is still the in-process
/// output.
fn lose_an_executor_mid_job(mut cluster: Cluster, dir: &Path, examples: &str) {
    let path = |p: &str| dir.join(p).display().to_string();
    let events = path("big.parquet");
    run_ok(&["generate", "--events", "120000", "--users", "2000", "--days", "2", "--seed", "5", "--out", &events]);
    let local = path("big-local.parquet");
    run_ok(&["batch", examples, "--feature", "user_velocity", "--history", &events, "--out", &local]);
    let remote = path("big-cluster.parquet");
    let mut job = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["batch", examples, "--feature", "user_velocity", "--history", &events, "--out", &remote])
        .args(["--cluster", &cluster.url, "--partitions", "4", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let victim = &cluster.work_dirs[1];
    let deadline = Instant::now() + Duration::from_secs(120);
    while !holds_shuffle_output(victim) {
        assert!(job.try_wait().unwrap().is_none(), "the job ended before the executor held any shuffle output");
        assert!(Instant::now() < deadline, "executor 1 never received work");
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.executors[1].kill().unwrap();
    cluster.executors[1].wait().unwrap();
    let output = job.wait_with_output().unwrap();
    let out = text(&output);
    assert!(output.status.success(), "the job did not survive losing an executor:\n{out}");
    // Either the recovered stages were consistent, or the client caught rows returned twice and
    // ran the job again; never a written file with repeated rows (compare counts them).
    if out.contains("running the job again") {
        assert!(out.contains("the cluster returned inconsistent rows"), "{out}");
    }
    assert_identical(&local, &remote);
}

/// Whether an executor's work folder holds any shuffle file.
fn holds_shuffle_output(dir: &Path) -> bool {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if entry.metadata().is_ok_and(|m| m.len() > 0) {
                return true;
            }
        }
    }
    false
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Appends the rows of a Parquet file to a Delta table in one commit (late data landing).
fn append_to_delta(parquet_file: &str, table: &str) {
    let file = std::fs::File::open(parquet_file).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 8192).unwrap();
    let batches: Vec<arrow::array::RecordBatch> = reader.map(Result::unwrap).collect();
    let url = lockstep_batch::source::to_url(table).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async move {
        let table = deltalake::open_table(url).await.unwrap();
        table.write(batches).with_save_mode(deltalake::protocol::SaveMode::Append).await.unwrap();
    });
}

fn read_parquet(file: &str) -> arrow::array::RecordBatch {
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(std::fs::File::open(file).unwrap(), 8192)
            .unwrap();
    let batches: Vec<arrow::array::RecordBatch> = reader.map(Result::unwrap).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

#[test]
fn an_unreachable_or_malformed_cluster_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.parquet").display().to_string();
    run_ok(&["generate", "--events", "2000", "--users", "20", "--days", "1", "--out", &events]);
    let out = dir.path().join("out.parquet");
    let examples = examples();
    let batch = ["batch", examples.as_str(), "--feature", "user_velocity", "--history", &events];
    let closed = format!("df://127.0.0.1:{}", free_port());
    for (cluster, message) in [
        (closed.as_str(), "cannot reach the scheduler at df://127.0.0.1:"),
        ("http://127.0.0.1:50050", "--cluster takes a Ballista scheduler as df://HOST:PORT"),
    ] {
        let ran = lockstep(&[&batch[..], &["--out", out.to_str().unwrap(), "--cluster", cluster]].concat());
        assert_eq!(ran.status.code(), Some(1), "{}", text(&ran));
        assert!(text(&ran).contains(message), "{}", text(&ran));
        assert!(!out.exists(), "no output from a job that never ran");
    }
}
