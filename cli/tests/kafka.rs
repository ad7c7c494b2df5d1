//! The streaming job against a real Kafka broker and Redis (started by `scripts/services.sh`;
//! `scripts/test.sh` exports `KAFKA_BROKERS` and `REDIS_URL`). Under `CI=true` a missing service
//! fails these tests; locally they are skipped with a loud message.
//!
//! The batch job is the oracle: the committed output topic (read_committed, last value per
//! key and window) must equal `lockstep batch` over the same events bit for bit, except windows
//! with too-late events — exactly those named on the late topic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use lockstep_batch::{BatchJob, SessionLimits};
use lockstep_features::{Definitions, Location, compile_feature};
use lockstep_fixtures::{GenerateOptions, OutputFormat, write_events};
use lockstep_stream::records::{WindowRecords, window_key, window_value};
use lockstep_stream::topic::log_ends;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

/// The broker, or `None` (loudly) when it is not running outside CI.
fn brokers() -> Option<String> {
    service("KAFKA_BROKERS")
}

fn service(variable: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{variable} is not set under CI=true: run the tests with scripts/test.sh, which starts the services")
        }
        _ => {
            eprintln!(
                "\n*** SKIPPED: {variable} is not set, so this test did not run. Start the services with \
                 `scripts/services.sh start` and `eval $(scripts/services.sh env)`, or run scripts/test.sh. ***\n"
            );
            None
        }
    }
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{name}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

struct Fixture {
    _dir: tempfile::TempDir,
    brokers: String,
    definitions: PathBuf,
    topic: String,
    output: String,
    history: Location,
    jsonl: PathBuf,
}

const FEATURES: &str = r#"
features:
  velocity:
    source: transactions
    key: [user_id]
    filter: "amount > 0"
    window: { sliding: 1h, every: 5m, offset: 1m }
    aggregations:
      tx_count: count(*)
      total_amount: sum(amount)
      avg_amount: avg(amount)
      max_amount: max(amount)
      unique_merchants: count(distinct merchant_id)
      purchases: count(*) FILTER (WHERE event_type = 'purchase')
      sd: stddev(amount)
      last_merchant: last(merchant_id)
    output: { topic: OUTPUT }
  sessions:
    source: transactions
    key: [user_id]
    window: { session: 20m }
    aggregations:
      n: count(*)
      total: sum(amount)
      low: min(amount)
      last_seen: max(event_time)
    output: { topic: OUTPUT }
"#;

impl Fixture {
    /// Generated events written as history (Parquet) and as JSON lines, and a source topic with
    /// `partitions` partitions holding them in arrival order, keyed by user.
    async fn new(brokers: &str, name: &str, partitions: i32, options: GenerateOptions, lateness: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let topic = unique(name);
        let output = format!("{topic}.windows");
        let parquet = dir.path().join("events.parquet");
        let jsonl = dir.path().join("events.jsonl");
        write_events(&options, parquet.to_str().unwrap(), OutputFormat::Parquet, |_| {}).await.unwrap();
        write_events(&options, jsonl.to_str().unwrap(), OutputFormat::Jsonl, |_| {}).await.unwrap();
        let text = format!(
            r#"sources:
  transactions:
    schema: {{ user_id: string, merchant_id: string, amount: float64, event_type: string, event_time: timestamp, ingest_time: timestamp }}
    event_time: event_time
    arrival_time: ingest_time
    kafka: {{ topic: {topic}, format: json }}
    watermark: 30s
    allowed_lateness: {lateness}
{}"#,
            FEATURES.replace("OUTPUT", &output)
        );
        let definitions = dir.path().join("defs.yaml");
        std::fs::write(&definitions, text).unwrap();
        create_topic(brokers, &topic, partitions).await;
        let fixture = Fixture {
            brokers: brokers.into(),
            definitions,
            topic,
            output,
            history: Location::Parquet(parquet.display().to_string()),
            jsonl,
            _dir: dir,
        };
        fixture.produce_lines(&std::fs::read_to_string(&fixture.jsonl).unwrap());
        fixture
    }

    /// Produces JSON lines keyed by their `user_id` (a line that is not JSON gets key `poison`).
    fn produce_lines(&self, text: &str) {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .create()
            .unwrap();
        for line in text.lines() {
            let key = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("user_id").and_then(|u| u.as_str()).map(str::to_string))
                .unwrap_or_else(|| "poison".into());
            let mut record = BaseRecord::to(&self.topic).key(key.as_str()).payload(line);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, returned)) => {
                        record = returned;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(60)).unwrap();
    }

    fn job(&self, feature: &str, group: &str, instance: &str, extra: &[&str]) -> Child {
        self.job_idle(feature, group, instance, "4s", extra)
    }

    /// A bounded run that ends once its input has been idle for `idle`.
    fn job_idle(&self, feature: &str, group: &str, instance: &str, idle: &str, extra: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(["stream", self.definitions.to_str().unwrap(), "--feature", feature, "--brokers", &self.brokers])
            .args(["--group", group, "--instance", instance, "--until-idle", idle, "--quiet"])
            .args(extra)
            .env("LOCKSTEP_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs the job to completion and checks it exited 0.
    fn run(&self, feature: &str, group: &str, extra: &[&str]) -> String {
        let output = self.job(feature, group, "w1", extra).wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(output.status.success(), "stream failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
        stdout
    }

    /// The batch job's rows over the same events, as output-topic (key, value) records.
    async fn expected(&self, feature: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let definitions = Definitions::load(&self.definitions).unwrap();
        let compiled = compile_feature(&definitions, definitions.feature(feature).unwrap()).unwrap();
        let keys = compiled.key_types.len();
        let job = BatchJob::new(compiled, Some(self.history.clone())).unwrap().with_limits(SessionLimits {
            memory_limit: 256 << 20,
            partitions: 2,
            cluster: None,
            ..SessionLimits::default()
        });
        let batches: Vec<RecordBatch> = job.collect().await.unwrap();
        let mut out = BTreeMap::new();
        for batch in &batches {
            for row in 0..batch.num_rows() {
                out.insert(window_key(batch, keys, row), window_value(batch, row));
            }
        }
        out
    }
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let results = admin
        .create_topics(&[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await;
    results.unwrap().into_iter().for_each(|r| {
        r.unwrap();
    });
}

/// Every committed record of `topic`, oldest first: (key, value, headers). The headers also
/// hold the record's partition, as `kafka.partition`.
type Record = (Vec<u8>, Option<Vec<u8>>, BTreeMap<String, String>);

fn read_topic(brokers: &str, topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    // The log ends, past any transaction still open (a killed worker's, until the broker aborts
    // it): those are waited for, not cut off.
    let ends: BTreeMap<i32, i64> =
        log_ends(ClientConfig::new().set("bootstrap.servers", brokers).clone(), topic, Duration::from_secs(10))
            .unwrap()
            .into_iter()
            .map(|(p, (_, high))| (p, high))
            .collect();
    let mut list = TopicPartitionList::new();
    for p in ends.keys() {
        list.add_partition_offset(topic, *p, Offset::Beginning).unwrap();
    }
    consumer.assign(&list).unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let position = consumer.position().unwrap();
        let done = ends.iter().all(|(p, high)| {
            *high == 0
                || position.find_partition(topic, *p).and_then(|e| e.offset().to_raw()).is_some_and(|o| o >= *high)
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "reading {topic} timed out");
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.unwrap();
            let mut headers = BTreeMap::from([("kafka.partition".to_string(), message.partition().to_string())]);
            if let Some(h) = message.headers() {
                for header in h.iter() {
                    headers.insert(
                        header.key.to_string(),
                        header.value.map(|v| String::from_utf8_lossy(v).to_string()).unwrap_or_default(),
                    );
                }
            }
            records.push((message.key().unwrap_or_default().to_vec(), message.payload().map(|p| p.to_vec()), headers));
        }
    }
    records
}

/// The last value per key; tombstones delete.
fn last_values(records: &[Record]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (key, value, _) in records {
        match value {
            Some(value) => out.insert(key.clone(), value.clone()),
            None => out.remove(key),
        };
    }
    out
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_string()
}

fn assert_same(got: &BTreeMap<Vec<u8>, Vec<u8>>, expected: &BTreeMap<Vec<u8>, Vec<u8>>, what: &str) {
    let missing: Vec<String> = expected.keys().filter(|k| !got.contains_key(*k)).take(3).map(|k| show(k)).collect();
    let extra: Vec<String> = got.keys().filter(|k| !expected.contains_key(*k)).take(3).map(|k| show(k)).collect();
    let differing: Vec<String> = expected
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .take(3)
        .map(|(k, v)| format!("{}: expected {} got {}", show(k), show(v), show(&got[k])))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differing.is_empty(),
        "{what}: {} windows expected, {} got; missing {missing:?}; extra {extra:?}; differing {differing:?}",
        expected.len(),
        got.len()
    );
}

fn options(events: u64, seed: u64) -> GenerateOptions {
    GenerateOptions { events, users: 150, days: 2, seed, late_rate: 0.03, ..GenerateOptions::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_with_batch_over_three_partitions() {
    let Some(brokers) = brokers() else { return };
    let fixture = Fixture::new(&brokers, "parity", 3, options(15_000, 5), "7h").await;
    for feature in ["velocity", "sessions"] {
        // Settings of the user's reach the clients (an unknown one is an error).
        let stdout = fixture.run(feature, &unique("g"), &["--no-online", "--producer-config", "linger.ms=20"]);
        assert!(stdout.contains("0 too late"), "{stdout}");
        let records = read_topic(&brokers, &fixture.output);
        // A key's windows are all in one output partition: that of its input partition.
        let mut partitions: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for (key, _, headers) in &records {
            let key: serde_json::Value = serde_json::from_slice(key).unwrap();
            let user = key["user_id"].as_str().unwrap_or("null").to_string();
            partitions.entry(user).or_default().insert(headers["kafka.partition"].clone());
        }
        assert!(partitions.len() > 10, "{} keys", partitions.len());
        for (user, held) in &partitions {
            assert_eq!(held.len(), 1, "the windows of {user} are spread over partitions {held:?}");
        }
        let used: std::collections::BTreeSet<&String> = partitions.values().flatten().collect();
        assert_eq!(used.len(), 3, "keys of three input partitions use three output partitions");
        let got = last_values(&records)
            .into_iter()
            .filter(|(_, v)| {
                serde_json::from_slice::<serde_json::Value>(v).unwrap().get(feature_marker(feature)).is_some()
            })
            .collect();
        assert_same(&got, &fixture.expected(feature).await, feature);
    }
}

/// A column only `feature`'s rows have (both features write to one topic).
fn feature_marker(feature: &str) -> &'static str {
    if feature == "velocity" { "tx_count" } else { "n" }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differences_from_batch_are_exactly_the_late_topic_windows() {
    let Some(brokers) = brokers() else { return };
    let fixture = Fixture::new(&brokers, "late", 2, options(15_000, 6), "2m").await;
    fixture.run("velocity", &unique("g"), &["--no-online"]);
    let got = last_values(&read_topic(&brokers, &fixture.output));
    let expected = fixture.expected("velocity").await;
    let late = read_topic(&brokers, &format!("{}.late", fixture.topic));
    assert!(!late.is_empty(), "the fixture has too-late events");
    let mut explained = BTreeSet::new();
    for (_, value, headers) in &late {
        let event: serde_json::Value = serde_json::from_slice(value.as_ref().unwrap()).unwrap();
        let windows: Vec<(i64, i64)> = serde_json::from_str(&headers["lockstep.windows"]).unwrap();
        assert!(!headers["lockstep.reason"].is_empty());
        for (start, _) in windows {
            let key = serde_json::json!({ "user_id": event["user_id"], "window_start": start });
            explained.insert(serde_json::to_vec(&key).unwrap());
        }
    }
    let differing: BTreeSet<Vec<u8>> =
        expected.iter().filter(|(k, v)| got.get(*k) != Some(*v)).map(|(k, _)| k.clone()).collect();
    assert!(got.keys().all(|k| expected.contains_key(k)), "the stream invented a window");
    assert_eq!(differing.len(), explained.len(), "differing windows vs late-topic windows");
    assert!(differing == explained, "the differing windows are not exactly the late-topic windows");

    // `lockstep compare` reads both topics and agrees: every difference explained.
    let batch = fixture._dir.path().join("batch.parquet").display().to_string();
    let lockstep = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lockstep")).args(args).arg("--quiet").output().expect("run lockstep")
    };
    let definitions = fixture.definitions.to_str().unwrap();
    let ran =
        lockstep(&["batch", definitions, "--feature", "velocity", "--history", fixture.history.url(), "--out", &batch]);
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let topic = format!("kafka://{brokers}/{}", fixture.output);
    let late_topic = format!("kafka://{brokers}/{}.late", fixture.topic);
    let json = fixture._dir.path().join("report.json");
    let compared = lockstep(&["compare", &topic, &batch, "--late", &late_topic, "--json", json.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&compared.stdout).to_string() + &String::from_utf8_lossy(&compared.stderr);
    assert!(compared.status.success(), "{out}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["explained"].as_u64(), Some(differing.len() as u64), "{out}");
    assert_eq!(report["unexplained"].as_u64(), Some(0), "{out}");
    assert_eq!(report["rows_right"].as_u64(), Some(expected.len() as u64), "{out}");
    let bare = lockstep(&["compare", &topic, &batch]);
    assert_eq!(bare.status.code(), Some(1), "without the late topic the differences are unexplained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_topic_and_the_job_goes_on() {
    let Some(brokers) = brokers() else { return };
    let fixture = Fixture::new(&brokers, "poison", 2, options(3_000, 7), "7h").await;
    let poison = [
        "{not json",
        r#"{"user_id":"u000001","merchant_id":"m1","amount":"lots","event_type":"purchase","event_time":1,"ingest_time":1}"#,
        r#"{"user_id":"u000001","merchant_id":"m1","amount":1.0,"event_type":"purchase","ingest_time":1}"#,
    ];
    fixture.produce_lines(&poison.join("\n"));
    let stdout = fixture.run("velocity", &unique("g"), &["--no-online"]);
    assert!(stdout.contains("3 dead-lettered"), "{stdout}");
    let dlq = read_topic(&brokers, &format!("{}.dlq", fixture.topic));
    assert_eq!(dlq.len(), 3);
    let errors: Vec<&str> = dlq.iter().map(|(_, _, h)| h["lockstep.error"].as_str()).collect();
    assert!(errors[0].starts_with("not valid JSON"), "{errors:?}");
    assert_eq!(errors[1], "field `amount`: expected a number, got the string \"lots\"");
    assert_eq!(errors[2], "field `event_time` is missing");
    assert_eq!(dlq[0].1.as_deref(), Some(poison[0].as_bytes()), "the original message is kept");
    let got = last_values(&read_topic(&brokers, &fixture.output));
    assert_same(&got, &fixture.expected("velocity").await, "velocity with poison messages");
}

/// The group's committed offsets over all partitions of `topic`, and the partitions' ends.
fn group_progress(brokers: &str, group: &str, topic: &str) -> (i64, i64) {
    // read_uncommitted: the offset fetch must not wait for the killed worker's open transaction.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut list = TopicPartitionList::new();
    let mut end = 0;
    for p in metadata.topics()[0].partitions() {
        list.add_partition(topic, p.id());
        end += consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap().1;
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(30)).unwrap();
    (committed.elements().iter().filter_map(|e| e.offset().to_raw()).filter(|o| *o > 0).sum(), end)
}

/// Whether `group` is stable with `members` members, each holding at least one partition.
fn group_shares_partitions(brokers: &str, group: &str, members: usize) -> bool {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let Ok(list) = consumer.fetch_group_list(Some(group), Duration::from_secs(10)) else { return false };
    // A consumer-protocol assignment: version (i16), then topics (i32 count), each a name (i16
    // length and bytes) and partitions (i32 count and i32 each).
    let partitions = |bytes: &[u8]| -> usize {
        let int = |at: usize, n: usize| bytes.get(at..at + n).map(|b| b.iter().fold(0i64, |v, x| v << 8 | *x as i64));
        let topics = int(2, 4).unwrap_or(0);
        let (mut at, mut count) = (6, 0);
        for _ in 0..topics {
            at += 2 + int(at, 2).unwrap_or(0) as usize;
            let held = int(at, 4).unwrap_or(0) as usize;
            count += held;
            at += 4 + 4 * held;
        }
        count
    };
    list.groups().iter().any(|g| {
        g.state() == "Stable"
            && g.members().len() == members
            && g.members().iter().all(|m| m.assignment().is_some_and(|a| partitions(a) > 0))
    })
}

/// Kills the job with SIGKILL `kills_wanted` times, restarting it each time, then lets a run end
/// on its own. Returns how many kills landed while input was still unread.
///
/// The second kill comes 100 ms to 1 s after its restart, while the job starts up or restores its
/// state. Each of the others comes once the group has committed a random 10–60% of the input left
/// when the job started, and then a random 0–100 ms later, anywhere in a cycle or its commit. Kills
/// tied to progress land mid-run however fast the job is.
fn run_with_crashes(fixture: &Fixture, feature: &str, group: &str, seed: u64, kills_wanted: usize) -> usize {
    let mut state = seed;
    let mut random = |below: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % below
    };
    let job = || fixture.job(feature, group, "w1", &["--no-online", "--max-batch", "300"]);
    let progress = || group_progress(&fixture.brokers, group, &fixture.topic);
    // Committed offsets and the input's end; a killed job commits nothing more.
    let (mut before, end) = progress();
    let mut kills = 0;
    let mut mid_run = 0;
    loop {
        if kills == kills_wanted {
            let output = job().wait_with_output().unwrap();
            assert!(output.status.success(), "the last run failed: {}", String::from_utf8_lossy(&output.stderr));
            return mid_run;
        }
        let mut child = job();
        let started = Instant::now();
        let (at, target) = if kills == 1 {
            (Duration::from_millis(100 + random(900)), before)
        } else {
            let share = 10 + random(51) as i64;
            (Duration::ZERO, before + ((end - before) * share / 100).max(1))
        };
        let extra = Duration::from_millis(random(101));
        let mut reached: Option<Instant> = None;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "the job failed after {kills} kills");
                return mid_run;
            }
            if reached.is_none() && started.elapsed() >= at && progress().0 >= target {
                reached = Some(Instant::now());
            }
            if reached.is_some_and(|r| r.elapsed() >= extra) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "the job made no progress towards kill {kills}");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        before = progress().0;
        if before < end {
            mid_run += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_points_the_output_is_that_of_an_undisturbed_run() {
    let Some(brokers) = brokers() else { return };
    let fixture = Fixture::new(&brokers, "crash", 3, options(40_000, 8), "7h").await;
    let mid_run = run_with_crashes(&fixture, "velocity", &unique("g"), 99, 4);
    assert!(mid_run >= 3, "only {mid_run} of 4 kills landed before the input was read");
    let got = last_values(&read_topic(&brokers, &fixture.output));
    assert_same(&got, &fixture.expected("velocity").await, "velocity after kills");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_one_killed_mid_run_give_the_same_output() {
    let Some(brokers) = brokers() else { return };
    let fixture = Fixture::new(&brokers, "workers", 4, options(40_000, 9), "7h").await;
    let group = unique("g");
    let survivor = fixture.job("sessions", &group, "a", &["--no-online", "--max-batch", "300"]);
    let mut victim = fixture.job("sessions", &group, "b", &["--no-online", "--max-batch", "300"]);
    // Killed once both hold partitions and the group has committed a quarter of the input, so
    // the kill lands mid-run.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let (committed, end) = group_progress(&brokers, &group, &fixture.topic);
        if committed * 4 > end && group_shares_partitions(&brokers, &group, 2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    victim.kill().unwrap();
    victim.wait().unwrap();
    let (committed, end) = group_progress(&brokers, &group, &fixture.topic);
    assert!(committed < end, "the kill landed after the input was read ({committed} of {end} committed)");
    let output = survivor.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let got = last_values(&read_topic(&brokers, &fixture.output));
    assert_same(&got, &fixture.expected("sessions").await, "sessions with a worker killed");
}

/// The partitions a worker held at the end of its log (its assignments less its revocations).
fn held_partitions(log: &str) -> BTreeSet<i32> {
    let mut held = BTreeSet::new();
    for line in log.lines() {
        // Without the terminal's colour codes.
        let mut plain = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| *c == 'm');
            } else {
                plain.push(c);
            }
        }
        let assigned = plain.contains("partitions assigned");
        if !assigned && !plain.contains("partitions revoked") {
            continue;
        }
        let list = plain.split("partitions=[").nth(1).and_then(|rest| rest.split(']').next()).unwrap_or("");
        for p in list.split(',').filter_map(|p| p.trim().parse::<i32>().ok()) {
            if assigned {
                held.insert(p);
            } else {
                held.remove(&p);
            }
        }
    }
    held
}

/// A worker that read and committed all of its input, then died before its bounded run's last
/// firing, holds open windows only in its changelog. A worker of the same group must not end its
/// own run on the committed offsets alone: it waits for those partitions, restores them and
/// fires their windows. (It joins after the death, so that the dead worker surely held them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_before_its_last_firing_loses_no_window() {
    let Some(brokers) = brokers() else { return };
    let fixture = Fixture::new(&brokers, "last-firing", 4, options(20_000, 12), "7h").await;
    let group = unique("g");
    // Never idle long enough to fire on its own.
    let mut victim = fixture.job_idle("sessions", &group, "b", "10m", &["--no-online"]);
    let started = Instant::now();
    loop {
        let (committed, end) = group_progress(&brokers, &group, &fixture.topic);
        if committed == end {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the group committed {committed} of {end}");
        std::thread::sleep(Duration::from_millis(50));
    }
    victim.kill().unwrap();
    let victim_log = String::from_utf8_lossy(&victim.wait_with_output().unwrap().stderr).to_string();
    let output = fixture.job_idle("sessions", &group, "a", "3s", &["--no-online"]).wait_with_output().unwrap();
    let survivor_log = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{survivor_log}");
    // The victim held partitions when it died, and they moved to the survivor.
    let (lost, survived) = (held_partitions(&victim_log), held_partitions(&survivor_log));
    assert!(!lost.is_empty(), "the victim held no partition when it died:\n{victim_log}");
    assert!(
        lost.is_subset(&survived),
        "the victim's partitions {lost:?} did not move to the survivor:\n{survivor_log}"
    );
    let output_records = read_topic(&brokers, &fixture.output);
    assert_same(
        &last_values(&output_records),
        &fixture.expected("sessions").await,
        "sessions with a worker killed before its last firing",
    );

    // The run has ended for good: events that come after it are too late, and a new run in the
    // same group fires nothing again (whichever worker ended a partition, and whether or not it
    // is the one that holds it now).
    let late_topic = format!("{}.late", fixture.topic);
    let late_before = read_topic(&brokers, &late_topic).len();
    let text = std::fs::read_to_string(&fixture.jsonl).unwrap();
    let again: String = text.lines().take(40).map(|line| format!("{line}\n")).collect();
    fixture.produce_lines(&again);
    let output = fixture.job_idle("sessions", &group, "c", "2s", &["--no-online"]).wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(read_topic(&brokers, &fixture.output).len(), output_records.len(), "a window fired again");
    let late = read_topic(&brokers, &late_topic);
    assert_eq!(late.len() - late_before, 40, "every event after the end is too late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_source_gives_the_same_output_as_kafka() {
    let Some(brokers) = brokers() else { return };
    // One partition: the Kafka run sees exactly the replay's arrival order.
    let fixture = Fixture::new(&brokers, "replay", 1, options(15_000, 10), "5m").await;
    fixture.run("velocity", &unique("g"), &["--no-online"]);
    let got = last_values(&read_topic(&brokers, &fixture.output));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("replay.parquet");
    let Location::Parquet(history) = &fixture.history else { unreachable!() };
    let status = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["stream", fixture.definitions.to_str().unwrap(), "--feature", "velocity", "--quiet"])
        .args(["--replay", history, "--out", out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let replayed = read_parquet(&out);
    let mut expected = BTreeMap::new();
    for batch in &replayed {
        for row in 0..batch.num_rows() {
            expected.insert(window_key(batch, 1, row), window_value(batch, row));
        }
    }
    assert_same(&got, &expected, "Kafka vs replay");
}

fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_online_store_holds_the_latest_windows_of_each_key() {
    let Some(brokers) = brokers() else { return };
    let Some(redis_url) = service("REDIS_URL") else { return };
    // A database of its own, emptied first: hashes left by an earlier run carry versions that
    // would (rightly) keep this run's windows out.
    let redis_url = format!("{}/3", redis_url.trim_end_matches('/'));
    let _: () = redis::cmd("FLUSHDB")
        .query(&mut redis::Client::open(redis_url.as_str()).unwrap().get_connection().unwrap())
        .unwrap();
    let fixture = Fixture::new(&brokers, "online", 2, options(5_000, 12), "7h").await;
    fixture.run("velocity", &unique("g"), &["--online", &redis_url]);
    let got = last_values(&read_topic(&brokers, &fixture.output));
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut connection = client.get_connection().unwrap();
    // Per key, every window the store holds has the topic's last value (where runs overlap, the
    // highest version), and it holds every window within `retain` steps of the key's latest one
    // (trimming keeps them); at most twice `retain` fields plus the version (trimming waits).
    let mut by_key: BTreeMap<String, BTreeMap<i64, serde_json::Value>> = BTreeMap::new();
    for (key, value) in &got {
        let key: serde_json::Value = serde_json::from_slice(key).unwrap();
        let mut row: serde_json::Value = serde_json::from_slice(value).unwrap();
        row.as_object_mut().unwrap().remove("user_id");
        by_key
            .entry(key["user_id"].as_str().unwrap().to_string())
            .or_default()
            .insert(key["window_start"].as_i64().unwrap(), row);
    }
    assert!(by_key.len() > 50);
    let definitions = Definitions::load(&fixture.definitions).unwrap();
    let compiled = compile_feature(&definitions, definitions.feature("velocity").unwrap()).unwrap();
    let retain = lockstep_stream::online::retained_windows(&compiled) as i64;
    let (mut runs, mut windows_stored) = (0, 0);
    for (user, windows) in &by_key {
        let hash = format!("lockstep:velocity:[\"{user}\"]");
        let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(&hash).query(&mut connection).unwrap();
        assert!(fields.len() as i64 <= 2 * retain + 2, "{hash}: {} fields, retain {retain}", fields.len());
        let stored = lockstep_stream::online::stored_windows(&compiled, &fields);
        let newest = *windows.keys().last().unwrap();
        let horizon = newest - (retain - 1) * 300_000;
        let wanted: BTreeMap<i64, serde_json::Value> =
            windows.iter().filter(|(start, _)| **start >= horizon).map(|(s, v)| (*s, v.clone())).collect();
        let held: BTreeMap<i64, serde_json::Value> =
            stored.iter().filter(|(start, _)| **start >= horizon).map(|(s, v)| (*s, v.clone())).collect();
        assert!(held == wanted, "{hash}: the stored windows since {horizon} are not the topic's");
        for (start, row) in &stored {
            assert_eq!(Some(row), windows.get(start), "{hash}: stored window {start} is not the topic's");
        }
        runs += fields.len() - 1;
        windows_stored += stored.len();
    }
    // Neighbouring windows with equal values share a field.
    assert!(runs * 2 < windows_stored, "{runs} runs for {windows_stored} windows");

    // `lockstep serve` answers from that store with the window SPEC §6 picks for the request
    // time: a request at window_end + serving delay (30 s) gets that window, 1 ms earlier the
    // window before it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // Answers are logged twice: to a file and to a topic.
    let log = fixture._dir.path().join("served.jsonl");
    let log_topic = format!("kafka://{brokers}/{}", unique("served"));
    let mut server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(["serve", fixture.definitions.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
            .args(["--online", &redis_url, "--log", log.to_str().unwrap(), "--log", &log_topic])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let get = |path: &str| http(port, "GET", path, "");
    let started = Instant::now();
    while get("/metrics").0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(20), "serve did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The latest window of each user (the store keeps the latest ones).
    let mut latest: BTreeMap<String, (i64, &Vec<u8>)> = BTreeMap::new();
    for (key, value) in &got {
        let key: serde_json::Value = serde_json::from_slice(key).unwrap();
        let (user, start) = (key["user_id"].as_str().unwrap().to_string(), key["window_start"].as_i64().unwrap());
        if latest.get(&user).is_none_or(|(s, _)| start > *s) {
            latest.insert(user, (start, value));
        }
    }
    let mut checked = 0;
    for (user, (start, value)) in latest.iter().take(100) {
        let start = *start;
        let hash = format!("lockstep:velocity:[\"{user}\"]");
        let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(&hash).query(&mut connection).unwrap();
        if lockstep_stream::online::stored_window(&compiled, &fields, start).is_none() {
            continue; // trimmed: older than the windows the store keeps
        }
        let at = start + 3_600_000 + 30_000;
        let (status, body) = get(&format!("/v1/features/velocity/{user}?at={at}"));
        assert_eq!(status, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        let row: serde_json::Value = serde_json::from_slice(value).unwrap();
        assert_eq!(answer["window_start"], start, "{body}");
        assert_eq!(answer["window_end"], row["window_end"]);
        for aggregate in ["tx_count", "total_amount", "max_amount", "sd", "last_merchant"] {
            assert_eq!(answer["values"][aggregate], row[aggregate], "{aggregate} of {user} at {at}");
        }
        let (_, earlier) = get(&format!("/v1/features/velocity/{user}?at={}", at - 1));
        let earlier: serde_json::Value = serde_json::from_str(&earlier).unwrap();
        assert_eq!(earlier["window_start"], start - 300_000, "1 ms earlier: the window before");
        checked += 1;
    }
    assert!(checked > 20, "only {checked} windows checked");
    // A key never seen: the window's defaults. Many keys at once. Client errors.
    let (status, body) = get("/v1/features/velocity/nobody?at=2026-01-05T12:00:00Z");
    assert_eq!(status, 200);
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["values"]["tx_count"], 0);
    assert!(answer["values"]["total_amount"].is_null());
    // Many keys in one request (both key forms), at a time the store still holds.
    let (user, (start, _)) = latest.iter().next().unwrap();
    let body = format!(r#"{{"keys": ["{user}", ["{user}"]], "at": {}}}"#, start + 3_630_000);
    let (status, body) = http(port, "POST", "/v1/features/velocity", &body);
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap().as_array().unwrap().len(), 2);
    assert_eq!(get("/v1/features/nope/u1").0, 404);
    assert_eq!(get("/v1/features/velocity/[1,2]").0, 400);
    assert_eq!(http(port, "POST", "/v1/features/velocity", "{not json").0, 400);
    let metrics = get("/metrics").1;
    assert!(metrics.contains("lockstep_serve_latency_seconds_bucket"), "{metrics}");
    assert_eq!(metric(&metrics, "lockstep_serve_log_failures_total"), Some(0.0), "{metrics}");
    // SIGTERM: the server stops taking requests, flushes its logs and exits cleanly.
    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = server.0.wait().unwrap();
    assert!(status.success(), "serve after SIGTERM: {status}");
    // Every answer was logged, to both logs, with the same content.
    let answers = 2 * checked + 1 + 2;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.lines().count(), answers);
    let topic = log_topic.rsplit('/').next().unwrap();
    let records = read_topic(&brokers, topic);
    assert_eq!(records.len(), answers);
    let from_file: Vec<serde_json::Value> = logged.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let from_topic: Vec<serde_json::Value> =
        records.iter().map(|r| serde_json::from_slice(r.1.as_deref().unwrap()).unwrap()).collect();
    assert_eq!(from_file, from_topic, "the file and the topic log the same answers");

    // The skew check recomputes every logged answer offline: no skew (no event was too late).
    let history = fixture.history.url().to_string();
    let skew = |definitions: &Path, served: &str| {
        Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(["skew", definitions.to_str().unwrap(), "--served", served, "--history", &history])
            .output()
            .unwrap()
    };
    for served in [log.to_str().unwrap(), &log_topic] {
        let clean = skew(&fixture.definitions, served);
        let out = String::from_utf8_lossy(&clean.stdout).to_string() + &String::from_utf8_lossy(&clean.stderr);
        assert!(clean.status.success(), "{served}: {out}");
        assert!(out.contains(&format!("velocity: 0 of {answers} served answers differ")), "{served}: {out}");
    }
    // Offline with a different serving delay than the one served: skew, exit 1.
    let text = std::fs::read_to_string(&fixture.definitions).unwrap();
    let wrong = fixture._dir.path().join("wrong-delay.yaml");
    std::fs::write(
        &wrong,
        text.replacen(
            "  velocity:\n    source: transactions\n",
            "  velocity:\n    source: transactions\n    serving_delay: 5m\n",
            1,
        ),
    )
    .unwrap();
    for served in [log.to_str().unwrap(), &log_topic] {
        let skewed = skew(&wrong, served);
        let out = String::from_utf8_lossy(&skewed.stdout).to_string();
        assert_eq!(skewed.status.code(), Some(1), "{served}: {out}");
        assert!(!out.contains("velocity: 0 of"), "{served}: {out}");
    }
}

/// A child process killed when the test ends, passing or not.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; returns (status, body). Status 0: not listening.
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

#[test]
fn the_online_store_never_moves_a_window_backwards() {
    use arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
    use lockstep_stream::online::{OnlineStore, OnlineWrites, stored_window};
    use std::sync::Arc;
    let Some(redis_url) = service("REDIS_URL") else { return };
    let feature_name = unique("versions").replace('-', "_");
    let text = format!(
        "sources:\n  s:\n    schema: {{ k: string, t: timestamp }}\n    event_time: t\nfeatures:\n  {feature_name}:\n    source: s\n    key: [k]\n    window: {{ tumbling: 1m }}\n    aggregations: {{ n: count(*) }}\n  {feature_name}_s:\n    source: s\n    key: [k]\n    window: {{ session: 1m }}\n    aggregations: {{ n: count(*) }}\n"
    );
    let definitions = Definitions::parse("v.yaml", &text, Path::new(".")).unwrap();
    let compiled = compile_feature(&definitions, definitions.feature(&feature_name).unwrap()).unwrap();
    let sessions = compile_feature(&definitions, definitions.feature(&format!("{feature_name}_s")).unwrap()).unwrap();
    // Both feature sets have the output schema (k, window_start, window_end, n).
    let row_at = |n: i64, start: i64| {
        RecordBatch::try_new(
            compiled.output_schema(),
            vec![
                Arc::new(StringArray::from(vec!["a"])),
                Arc::new(TimestampMillisecondArray::from(vec![start]).with_timezone("UTC")),
                Arc::new(TimestampMillisecondArray::from(vec![start + 60_000]).with_timezone("UTC")),
                Arc::new(Int64Array::from(vec![n])),
            ],
        )
        .unwrap()
    };
    let mut writes = OnlineWrites::default();
    let upsert = |writes: &mut OnlineWrites, feature: &lockstep_features::CompiledFeature, n, start, version| {
        let rows = row_at(n, start);
        writes.upsert(feature, &WindowRecords::new(&rows, 1), 0, &window_value(&rows, 0), version).unwrap();
    };
    let mut connection = redis::Client::open(redis_url.as_str()).unwrap().get_connection().unwrap();
    let fields = |connection: &mut redis::Connection, feature: &str| -> HashMap<String, String> {
        redis::cmd("HGETALL").arg(format!("lockstep:{feature}:[\"a\"]")).query(connection).unwrap()
    };
    let n_at = |connection: &mut redis::Connection, start: i64| -> Option<i64> {
        let row = stored_window(&compiled, &fields(connection, &feature_name), start)?;
        assert_eq!(row["window_end"], start + 60_000);
        row["n"].as_i64()
    };

    // Windows: runs of equal neighbours, versioned.
    let mut store = OnlineStore::connect(&redis_url, &compiled).unwrap();
    upsert(&mut writes, &compiled, 2, 0, 10);
    store.send(std::mem::take(&mut writes)).unwrap();
    assert_eq!(n_at(&mut connection, 0), Some(2));
    // An older write (a replayed cycle, or a stale worker) changes nothing; an equal one rewrites.
    upsert(&mut writes, &compiled, 1, 0, 5);
    store.send(std::mem::take(&mut writes)).unwrap();
    assert_eq!(n_at(&mut connection, 0), Some(2));
    upsert(&mut writes, &compiled, 3, 0, 10);
    store.send(std::mem::take(&mut writes)).unwrap();
    assert_eq!(n_at(&mut connection, 0), Some(3));
    // Neighbours with equal values are one run; a gap or another value starts a new one.
    upsert(&mut writes, &compiled, 4, 60_000, 13);
    upsert(&mut writes, &compiled, 4, 120_000, 14);
    upsert(&mut writes, &compiled, 4, 240_000, 15);
    upsert(&mut writes, &compiled, 5, 300_000, 16);
    store.send(std::mem::take(&mut writes)).unwrap();
    let mut names: Vec<String> = fields(&mut connection, &feature_name).into_keys().collect();
    names.sort();
    assert_eq!(names, ["r:0:0", "r:240000:240000", "r:300000:300000", "r:60000:120000", "version"]);
    assert_eq!(
        [60_000, 120_000, 180_000, 240_000].map(|s| n_at(&mut connection, s)),
        [Some(4), Some(4), None, Some(4)]
    );
    // A window fired again inside an older run: the higher version wins there, only there.
    upsert(&mut writes, &compiled, 6, 120_000, 17);
    store.send(std::mem::take(&mut writes)).unwrap();
    assert_eq!([60_000, 120_000].map(|s| n_at(&mut connection, s)), [Some(4), Some(6)]);
    // One flush carrying a replayed write (of another window) and a new one applies the new one.
    upsert(&mut writes, &compiled, 7, 360_000, 6);
    upsert(&mut writes, &compiled, 5, 0, 18);
    store.send(std::mem::take(&mut writes)).unwrap();
    assert_eq!(n_at(&mut connection, 0), Some(5));
    assert_eq!(n_at(&mut connection, 360_000), None, "a write older than the hash's version is a replay");
    let hash = format!("lockstep:{feature_name}:[\"a\"]");
    let version: String = redis::cmd("HGET").arg(&hash).arg("version").query(&mut connection).unwrap();
    assert_eq!(version, format!("{:020}", 18));
    let ttl: i64 = redis::cmd("PTTL").arg(&hash).query(&mut connection).unwrap();
    assert!(ttl > 0, "the key expires");
    // Beyond twice `retain` fields, runs ending more than `retain - 1` steps before the latest
    // window go (retain 3 here: one window, no serving delay or lateness, 2 spare).
    assert_eq!(lockstep_stream::online::retained_windows(&compiled), 3);
    for i in 0..10 {
        upsert(&mut writes, &compiled, 100 + i, 600_000 + i * 60_000, 20 + i as u64);
    }
    store.send(std::mem::take(&mut writes)).unwrap();
    let kept: Vec<i64> = (0..10).filter_map(|i| n_at(&mut connection, 600_000 + i * 60_000)).collect();
    assert_eq!(kept, [107, 108, 109]);
    assert_eq!(fields(&mut connection, &feature_name).len(), 4);

    // Sessions: one field each; retractions follow the same rule.
    let mut store = OnlineStore::connect(&redis_url, &sessions).unwrap();
    let session = |connection: &mut redis::Connection| {
        stored_window(&sessions, &fields(connection, &format!("{feature_name}_s")), 0).map(|row| row["n"].clone())
    };
    upsert(&mut writes, &sessions, 2, 0, 10);
    store.send(std::mem::take(&mut writes)).unwrap();
    assert_eq!(session(&mut connection), Some(serde_json::json!(2)));
    let keys: Vec<arrow::array::ArrayRef> = vec![Arc::new(StringArray::from(vec!["a"]))];
    writes.delete(&sessions, &keys, 0, 0, 9).unwrap();
    store.send(std::mem::take(&mut writes)).unwrap();
    assert_eq!(session(&mut connection), Some(serde_json::json!(2)));
    writes.delete(&sessions, &keys, 0, 0, 11).unwrap();
    store.send(std::mem::take(&mut writes)).unwrap();
    assert_eq!(session(&mut connection), None);
    // Beyond twice `retain` sessions, all but the `retain` latest go.
    let retain = lockstep_stream::online::retained_windows(&sessions) as i64;
    for i in 0..2 * retain + 2 {
        upsert(&mut writes, &sessions, i, 600_000 + i * 60_000, 20 + i as u64);
    }
    store.send(std::mem::take(&mut writes)).unwrap();
    let mut starts: Vec<i64> =
        lockstep_stream::online::stored_windows(&sessions, &fields(&mut connection, &format!("{feature_name}_s")))
            .into_keys()
            .collect();
    starts.sort();
    assert_eq!(starts, (retain + 2..2 * retain + 2).map(|i| 600_000 + i * 60_000).collect::<Vec<_>>());
}

/// `GET /metrics` on `addr`, or `None` while the server is not up.
fn scrape(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name) && !l.starts_with('#'))?.rsplit(' ').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_while_the_job_runs() {
    let Some(brokers) = brokers() else { return };
    let fixture = Fixture::new(&brokers, "metrics", 2, options(20_000, 13), "2m").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let child = fixture.job("velocity", &unique("g"), "w1", &["--no-online", "--max-batch", "500", "--metrics", &addr]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(text) = scrape(&addr) {
            last = text;
            if metric(&last, "lockstep_windows_fired_total").is_some_and(|n| n > 0.0) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(last.starts_with("HTTP/1.1 200"), "{last}");
    for name in [
        "lockstep_events_total",
        "lockstep_too_late_total",
        "lockstep_dead_lettered_total",
        "lockstep_windows_fired_total",
        "lockstep_consumer_lag_messages",
        "lockstep_consumer_lag_seconds",
        "lockstep_watermark_lag_seconds",
        "lockstep_transaction_commit_seconds_bucket",
        "lockstep_arrival_latency_total",
        "lockstep_feature_freshness_seconds",
    ] {
        assert!(metric(&last, name).is_some(), "{name} missing from:\n{last}");
    }
    assert!(metric(&last, "lockstep_events_total").unwrap() > 0.0);
}

/// A topic is read to its log end, past a transaction still open: a killed worker's stays open
/// until the broker aborts it, and a reader stopping at the last stable offset would miss every
/// record committed after its first one. The read waits for it, then returns the records
/// committed on both sides of it and none of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_is_read_past_a_transaction_still_open() {
    let Some(brokers) = brokers() else { return };
    let topic = unique("open-txn");
    create_topic(&brokers, &topic, 1).await;
    let transactional = |id: &str| -> ThreadedProducer<DefaultProducerContext> {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("transactional.id", format!("{topic}.{id}"))
            .create()
            .unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        producer
    };
    let send = |producer: &ThreadedProducer<DefaultProducerContext>, values: &[&str]| {
        producer.begin_transaction().unwrap();
        for value in values {
            producer.send(BaseRecord::<str, str>::to(&topic).key("k").payload(value)).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    };
    let (open, other) = (transactional("open"), transactional("other"));
    send(&other, &["before"]);
    other.commit_transaction(Duration::from_secs(30)).unwrap();
    send(&open, &["aborted-1", "aborted-2"]);
    send(&other, &["after-1", "after-2"]);
    other.commit_transaction(Duration::from_secs(30)).unwrap();

    let (b, t) = (brokers.clone(), topic.clone());
    let reader = std::thread::spawn(move || lockstep_stream::topic::read_committed(&b, &t));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!reader.is_finished(), "the read ended before the open transaction did");
    open.abort_transaction(Duration::from_secs(30)).unwrap();
    let records = reader.join().unwrap().unwrap();
    let values: Vec<String> = records.iter().map(|(_, v, _)| show(v.as_deref().unwrap_or_default())).collect();
    assert_eq!(values, ["before", "after-1", "after-2"]);

    // The test suite's own reader too.
    let values: Vec<String> =
        read_topic(&brokers, &topic).iter().map(|(_, v, _)| show(v.as_deref().unwrap_or_default())).collect();
    assert_eq!(values, ["before", "after-1", "after-2"]);
}
