//! The Kafka runtime: one worker of a consumer group, running the engine of every input partition
//! assigned to it, exactly once (SPEC §4).
//!
//! Each cycle reads a micro-batch, runs it through the partitions' engines, and commits in ONE
//! Kafka transaction:
//! - the fired windows (output topic), too-late events (`<topic>.late`) and malformed messages
//!   (`<topic>.dlq`);
//! - the engines' state changes, to a compacted changelog topic with one partition per input
//!   partition (`<group>.<feature set>.changelog`);
//! - the input offsets, through `send_offsets_to_transaction` with the group's metadata, so a
//!   worker fenced out of the group cannot commit.
//!
//! When a partition is assigned (at start, or when a worker joins or leaves), its engine is
//! rebuilt from its changelog partition, read with `read_committed` up to the high watermark —
//! past any transaction still open — before any of its messages is processed. Committed offsets
//! and changelog come from the same transactions, so a restored engine continues exactly where
//! the last committed cycle left it. A revoked partition's uncommitted messages are dropped; its
//! new owner reads them again from the committed offset.
//!
//! Cycles overlap by one. A cycle is first built: its records encoded into an outbox, its
//! online-store writes buffered, nothing sent. Once the next micro-batch has been read, a helper
//! thread opens the built cycle's transaction, sends its records and online-store writes and
//! commits, while the worker builds the next cycle. So no transaction is open while the worker
//! reads (and handles rebalances): a rebalance drops the built cycle, which is read again from
//! the committed offsets. If a commit aborts, the cycle built behind it is dropped too and both
//! are done again.
//!
//! A bounded run (`until_idle`) ends partition by partition: a worker fires the open windows of
//! the partitions it has read to their ends in one last transaction, whose offsets carry
//! [`FINISHED`], and stops once every input partition of the group carries it. A partition a dead
//! worker read but never finished is restored and finished by the worker it moves to.
//!
//! All transaction calls block, so the worker runs on its own thread, never on an async
//! executor. The online store is written before each commit with versioned, idempotent writes
//! (see [`crate::online`]), so a cycle replayed after a crash rewrites the same values.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use lockstep_features::{CompiledFeature, StageEvaluator};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use crate::decode::JsonDecoder;
use crate::engine::{ChangeKind, Effects, Engine};
use crate::error::StreamError;
use crate::fetch::{FetchQueue, FetchTarget};
use crate::metrics::{Metrics, process_cpu};
use crate::online::{OnlineStore, OnlineWrites};
use crate::records::{WindowRecords, window_key_of};
use crate::topic::log_end;

/// Messages in a worker's first cycles, before their size adapts.
pub const FIRST_BATCH: usize = 5_000;

/// Most messages one read of the fetch queue takes.
const FETCH_CHUNK: usize = 4096;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    pub brokers: String,
    /// The consumer group; workers of one group share the partitions.
    pub group: String,
    /// This worker's name in the group: its transactional id is `<group>.<feature>.<instance>`.
    /// A restarted worker must keep its name so its unfinished transaction is aborted at once.
    pub instance: String,
    /// End the run once nothing new arrives for this long (a bounded run).
    pub until_idle: Option<Duration>,
    /// Most messages per cycle (one transaction). Cycles start at [`FIRST_BATCH`] messages (or
    /// fewer, under this) and adapt to the commit's latency (see `next_batch`).
    pub max_batch: usize,
    /// Longest wait to fill a cycle.
    pub batch_wait: Duration,
    /// Transaction timeout; a crashed worker's open transaction blocks its partitions this long.
    pub transaction_timeout: Duration,
    /// Group session timeout; a crashed worker's partitions move after this long.
    pub session_timeout: Duration,
    /// librdkafka settings for every client of the job (`--kafka-config`), e.g. TLS or SASL.
    pub client_config: Vec<(String, String)>,
    /// librdkafka settings for the transactional producer only (`--producer-config`).
    pub producer_config: Vec<(String, String)>,
}

/// Settings the job makes itself, because exactly-once or the group depends on them.
const RESERVED_SETTINGS: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "transactional.id",
    "enable.idempotence",
    "isolation.level",
    "enable.auto.commit",
    "enable.auto.offset.store",
];

impl KafkaOptions {
    pub fn new(brokers: &str, group: &str, instance: &str) -> Self {
        KafkaOptions {
            brokers: brokers.into(),
            group: group.into(),
            instance: instance.into(),
            until_idle: None,
            max_batch: 50_000,
            batch_wait: Duration::from_millis(100),
            transaction_timeout: Duration::from_secs(10),
            session_timeout: Duration::from_secs(6),
            client_config: Vec::new(),
            producer_config: Vec::new(),
        }
    }

    /// Adds a librdkafka setting given as `KEY=VALUE`, for every client or (`producer`) for the
    /// transactional producer only. Settings exactly-once depends on are refused.
    pub fn add_setting(&mut self, setting: &str, producer: bool) -> Result<(), StreamError> {
        let Some((key, value)) = setting.split_once('=') else {
            return Err(StreamError::Config(format!("Kafka setting `{setting}`: write it as KEY=VALUE")));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(StreamError::Config(format!("Kafka setting `{setting}`: the key is empty")));
        }
        if RESERVED_SETTINGS.contains(&key) {
            return Err(StreamError::Config(format!(
                "Kafka setting `{key}`: lockstep sets it itself (brokers come from --brokers, the group from \
                 --group; exactly-once needs the rest as they are)"
            )));
        }
        let list = if producer { &mut self.producer_config } else { &mut self.client_config };
        list.push((key.to_string(), value.to_string()));
        Ok(())
    }

    /// `config` with the brokers and the user's settings (which win over the job's defaults).
    fn client(&self, mut config: ClientConfig, producer: bool) -> ClientConfig {
        config.set("bootstrap.servers", &self.brokers);
        let extra = if producer { &self.producer_config[..] } else { &[] };
        for (key, value) in self.client_config.iter().chain(extra) {
            config.set(key, value);
        }
        config
    }
}

/// The topics of a feature set's streaming job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub input: String,
    pub output: String,
    pub late: String,
    pub dlq: String,
    pub changelog: String,
}

impl Topics {
    pub fn of(feature: &CompiledFeature, group: &str) -> Result<Self, StreamError> {
        let input = feature.source.kafka.as_ref().map(|k| k.topic.clone()).ok_or_else(|| {
            StreamError::Config(format!(
                "source `{}` has no `kafka: {{ topic: ... }}`; add one, or use --replay URL",
                feature.source.name
            ))
        })?;
        let name = &feature.feature.name;
        Ok(Topics {
            output: feature.feature.output.topic.clone().unwrap_or_else(|| format!("{name}.windows")),
            late: format!("{input}.late"),
            dlq: format!("{input}.dlq"),
            changelog: format!("{group}.{name}.changelog"),
            input,
        })
    }
}

/// The streaming job's topology, as text (`lockstep plan`).
pub fn topology(feature: &CompiledFeature, group: &str) -> String {
    let source = &feature.source;
    let set = &feature.feature;
    let mut out = String::new();
    let topics = Topics::of(feature, group);
    let input = topics.as_ref().map_or_else(|e| format!("(none: {e})"), |t| t.input.clone());
    out.push_str(&format!("source topic   {input}, JSON, keyed by [{}]\n", set.key.join(", ")));
    out.push_str(&format!(
        "decode         {} columns; malformed messages → {}\n",
        source.schema.len(),
        topics.as_ref().map_or("-".into(), |t| t.dlq.clone())
    ));
    out.push_str(&format!("filter         {}\n", set.filter.as_deref().unwrap_or("(none)")));
    out.push_str(&format!(
        "watermark      per partition: max event time − {}; allowed lateness {}{}\n",
        source.watermark,
        source.allowed_lateness,
        source.idle_timeout.map_or(String::new(), |t| format!("; idle partitions advance after {t}"))
    ));
    out.push_str(&format!("windows        {} per key (panes of exact partial states)\n", set.window));
    let aggregates: Vec<String> = feature.aggregates.iter().map(|a| format!("{} = {}", a.spec.name, a.sql)).collect();
    out.push_str(&format!("aggregates     {}\n", aggregates.join(", ")));
    if let Ok(t) = &topics {
        out.push_str(&format!("too late       → {}\n", t.late));
        out.push_str(&format!("fired windows  → {} (key: key columns + window_start)\n", t.output));
        out.push_str(&format!("state          → {} (compacted, one partition per input partition)\n", t.changelog));
    }
    out.push_str(&format!("online store   {}\n", set.output.online.as_deref().unwrap_or("(none)")));
    out.push_str("commit         output, late, dead letters, state and offsets in one transaction per cycle\n");
    out
}

/// What a worker did.
#[derive(Debug, Clone, Default)]
pub struct KafkaSummary {
    pub events: u64,
    pub dead_lettered: u64,
    pub too_late: u64,
    pub windows: u64,
    pub transactions: u64,
    /// Time spent in cycles (reading excluded): events / busy is the sustained throughput.
    pub busy: Duration,
    /// CPU time of the whole process (every thread: reading, processing, the Kafka client's
    /// threads, online-store writes) from the first message read to the end of the last cycle:
    /// events / cpu is the throughput per core.
    pub cpu: Duration,
    /// From the first message read to the commit of the last one read before the input went
    /// idle (zero if it never did): events / span is the end-to-end rate, waits included.
    pub span: Duration,
}

enum GroupEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Records rebalances for the worker loop, which acts on them between polls.
struct GroupContext {
    topic: String,
    events: Mutex<Vec<GroupEvent>>,
    /// Set while `events` holds events, so a poll without one takes no lock.
    pending: AtomicBool,
    /// Assigned partitions' messages go to the worker's fetch queue.
    fetch: FetchTarget,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = list.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect();
                self.events.lock().expect("not poisoned").push(GroupEvent::Revoked(partitions));
                self.pending.store(true, Ordering::Release);
            }
            // Before the assignment takes effect, so no message is fetched before (see `fetch`).
            Rebalance::Assign(list) => {
                let partitions: Vec<i32> = list.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect();
                self.fetch.forward(consumer, &self.topic, &partitions);
            }
            Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions = list.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect();
            self.events.lock().expect("not poisoned").push(GroupEvent::Assigned(partitions));
            self.pending.store(true, Ordering::Release);
        }
    }
}

struct PartitionState {
    engine: Engine,
    /// When the partition last delivered a message (or was assigned).
    last_message: Instant,
    /// The offset after the last message processed (the committed offset before any).
    next_offset: i64,
    /// The partition's bounded run has ended: its last firing is committed, its watermark is
    /// at the end of time (so any later message is too late), and every offset committed for
    /// it carries [`FINISHED`].
    ended: bool,
}

impl PartitionState {
    /// A partition's state from its restored engine and committed offset. A partition whose run
    /// ended elsewhere ends here too, its windows not fired again (they were, with the mark).
    fn new(mut engine: Engine, committed: Committed) -> Result<PartitionState, StreamError> {
        let next_offset = committed.offset.unwrap_or(0);
        if committed.finished {
            engine.finish(next_offset as u64)?;
        }
        Ok(PartitionState { engine, last_message: Instant::now(), next_offset, ended: committed.finished })
    }
}

/// The metadata of the input offsets of a partition whose bounded run has ended (see
/// `PartitionState::ended`). A bounded run stops only once every input partition's committed
/// offset reaches its end with this mark, so the open windows of a worker that died after
/// reading its input still fire: its partner waits for those partitions, restores them and
/// fires them itself.
pub const FINISHED: &str = "lockstep.finished";

/// A partition's committed input offset.
#[derive(Debug, Clone, Copy, Default)]
struct Committed {
    offset: Option<i64>,
    /// It carries [`FINISHED`].
    finished: bool,
}

/// One worker; see the module documentation.
pub struct Worker {
    feature: CompiledFeature,
    options: KafkaOptions,
    topics: Topics,
    /// The input's messages, read in batches. Declared before `consumer`, so dropped first.
    fetch: FetchQueue,
    consumer: BaseConsumer<GroupContext>,
    producer: Arc<ThreadedProducer<DefaultProducerContext>>,
    decoder: JsonDecoder,
    evaluator: StageEvaluator,
    partitions: BTreeMap<i32, PartitionState>,
    /// Lent to the commit thread while the next cycle is built.
    online: Option<OnlineStore>,
    /// The online-store writes of the cycle being built (with an online store).
    writes: Option<OnlineWrites>,
    /// The records of the cycle being built.
    outbox: Outbox,
    /// An emptied outbox back from a commit, whose buffers the next cycle reuses.
    spare: Outbox,
    /// The last cycle built, not sent yet.
    prepared: Option<Prepared>,
    metrics: Arc<Metrics>,
    summary: KafkaSummary,
    /// Rebalances seen, to restart the idle clock.
    assignments: u64,
    input_partitions: i32,
    /// Windows of input partition `p` go to output partition `p % output_partitions`.
    output_partitions: i32,
    /// Produce times (ms) of the messages that caused this cycle's window changes.
    produced: Vec<i64>,
    /// Most messages the next cycle reads (at most `options.max_batch`).
    batch: usize,
    /// The messages of the cycle being read; its buffers are kept from cycle to cycle.
    input: Input,
    /// The process's CPU time when the first message was read.
    cpu_started: Option<Duration>,
    /// When the first message was read.
    first_read: Option<Instant>,
    /// How long reading the cycle being built took.
    reading: Duration,
}

fn kafka(error: KafkaError) -> StreamError {
    StreamError::Kafka(error.to_string())
}

impl Worker {
    /// Connects, creates missing topics, and joins the group.
    pub fn start(
        feature: CompiledFeature,
        options: KafkaOptions,
        online: Option<OnlineStore>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StreamError> {
        let topics = Topics::of(&feature, &options.group)?;
        let (input_partitions, output_partitions) = ensure_topics(&options, &topics)?;
        let context = GroupContext {
            topic: topics.input.clone(),
            events: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            fetch: FetchTarget::default(),
        };
        let target = context.fetch.clone();
        let mut consumer = ClientConfig::new();
        consumer
            .set("client.id", format!("lockstep-{}", options.instance))
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", options.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", (options.session_timeout.as_millis() / 6).max(100).to_string())
            .set("max.poll.interval.ms", "300000")
            // Once its queue holds `queued.min.messages`, the client waits this long before it
            // fetches again (1 s by default): a worker that drains 100,000 messages in less would
            // sit idle for the rest of it. Measured: a 1M-message backlog drained in 7.8 s with
            // the default and 3.3 s with 20 ms, at the same CPU time.
            .set("fetch.queue.backoff.ms", "20");
        let consumer: BaseConsumer<GroupContext> = options
            .client(consumer, false)
            .set("group.id", &options.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .create_with_context(context)
            .map_err(kafka)?;
        let transactional_id = format!("{}.{}.{}", options.group, feature.feature.name, options.instance);
        let mut producer = ClientConfig::new();
        producer
            .set("transaction.timeout.ms", options.transaction_timeout.as_millis().to_string())
            .set("message.timeout.ms", (options.transaction_timeout.as_millis() * 9 / 10).to_string())
            // A cycle's records are flushed by its commit: batch them in large message sets.
            .set("linger.ms", "50")
            .set("batch.num.messages", "100000")
            .set("queue.buffering.max.messages", "1000000")
            .set("compression.type", "lz4")
            // Errors surface when the transaction commits; a report per record is only work.
            .set("delivery.report.only.error", "true");
        let producer: ThreadedProducer<DefaultProducerContext> = options
            .client(producer, true)
            .set("transactional.id", &transactional_id)
            .set("enable.idempotence", "true")
            .create()
            .map_err(kafka)?;
        // Aborts whatever this worker's previous run left open, and fences it.
        producer.init_transactions(Duration::from_secs(60)).map_err(kafka)?;
        let fetch = FetchQueue::new(&consumer, &target, FETCH_CHUNK).map_err(StreamError::Kafka)?;
        consumer.subscribe(&[&topics.input]).map_err(kafka)?;
        info!(group = %options.group, %transactional_id, input = %topics.input, "worker started");
        let batch = options.max_batch.clamp(1, FIRST_BATCH);
        Ok(Worker {
            decoder: JsonDecoder::new(&feature.source, feature.source_schema.clone()),
            evaluator: StageEvaluator::new(&feature)?,
            feature,
            options,
            topics,
            fetch,
            consumer,
            producer: Arc::new(producer),
            partitions: BTreeMap::new(),
            writes: online.as_ref().map(|_| OnlineWrites::default()),
            online,
            outbox: Outbox::default(),
            spare: Outbox::default(),
            prepared: None,
            metrics,
            summary: KafkaSummary::default(),
            assignments: 0,
            input_partitions,
            output_partitions,
            produced: Vec::new(),
            batch,
            input: Input::default(),
            cpu_started: None,
            first_read: None,
            reading: Duration::ZERO,
        })
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Runs until `stop` is set, the input has been idle for `until_idle`, or an error.
    pub fn run(mut self, stop: Arc<AtomicBool>) -> Result<KafkaSummary, StreamError> {
        let mut last_message = Instant::now();
        let mut lag_checked = Instant::now();
        let mut waiting = false;
        while !stop.load(Ordering::Relaxed) {
            if lag_checked.elapsed() >= Duration::from_secs(5) {
                self.refresh_lag();
                lag_checked = Instant::now();
            }
            let assigned_before = self.assignments;
            let reading = Instant::now();
            self.poll_batch()?;
            self.reading = reading.elapsed();
            if self.assignments != assigned_before {
                // A new assignment restarts the idle clock: its partitions may hold a backlog.
                last_message = Instant::now();
            }
            if self.input.is_empty() {
                let pending = self.prepared.is_some();
                if !self.settle()? {
                    continue;
                }
                if let (true, Some(first)) = (pending, self.first_read) {
                    self.summary.span = first.elapsed();
                }
                self.fire_idle_partitions()?;
                if let Some(idle) = self.options.until_idle
                    && last_message.elapsed() >= idle
                    && self.end_of_run(idle, &mut waiting)?
                {
                    return Ok(self.summary);
                }
                continue;
            }
            last_message = Instant::now();
            self.cpu_started.get_or_insert_with(process_cpu);
            self.first_read.get_or_insert_with(Instant::now);
            self.cycle()?;
            self.fire_idle_partitions()?;
        }
        self.settle()?;
        Ok(self.summary)
    }

    /// The end of a bounded run, once its input has been idle for `idle`. When this worker's
    /// partitions are read to their ends, their open windows fire (`finish`); the run ends once
    /// every input partition of the group is finished so. A partition read and committed by a
    /// worker that died before its last firing is not: this worker waits until it is assigned
    /// here (a session timeout), then fires it. Two live workers never wait on each other, as
    /// each finishes its own partitions first. `waiting` keeps the waiting message to one.
    fn end_of_run(&mut self, idle: Duration, waiting: &mut bool) -> Result<bool, StreamError> {
        let ends = match self.input_ends() {
            Ok(ends) => ends,
            Err(error) => {
                warn!(%error, "cannot read the input's ends yet");
                return Ok(false);
            }
        };
        let position = self.consumer.position().map_err(kafka)?;
        let read = self.partitions.iter().all(|(p, state)| {
            let at = position.find_partition(&self.topics.input, *p).and_then(|e| e.offset().to_raw()).unwrap_or(-1);
            // No position yet: assigned and nothing fetched since, judged by its committed offset.
            at.max(state.next_offset) >= ends[p]
        });
        if !read {
            return Ok(false);
        }
        if self.partitions.values().any(|state| !state.ended) {
            info!(idle_secs = idle.as_secs_f64(), "input idle: firing every open window of this worker's partitions");
            if !self.finish(&ends)? {
                return Ok(false);
            }
        }
        // Offsets can be unstable for a while behind a dead worker's open transaction.
        let all: Vec<i32> = ends.keys().copied().collect();
        let committed = match self.committed_offsets(&all) {
            Ok(committed) => committed,
            Err(error) => {
                warn!(%error, "cannot read the group's committed offsets yet");
                return Ok(false);
            }
        };
        let unfinished: Vec<i32> = ends
            .iter()
            .filter(|(p, end)| {
                let c = committed.get(p).copied().unwrap_or_default();
                **end > 0 && !(c.finished && c.offset.is_some_and(|at| at >= **end))
            })
            .map(|(p, _)| *p)
            .collect();
        if unfinished.is_empty() {
            info!("every input partition is finished: stopping");
            return Ok(true);
        }
        if !*waiting {
            info!(?unfinished, "waiting for partitions whose last firing is not committed to finish or move here");
            *waiting = true;
        }
        Ok(false)
    }

    /// The high watermark of every input partition.
    fn input_ends(&self) -> Result<BTreeMap<i32, i64>, StreamError> {
        let timeout = Duration::from_secs(10);
        (0..self.input_partitions)
            .map(|p| {
                let (_, high) = self.consumer.fetch_watermarks(&self.topics.input, p, timeout).map_err(kafka)?;
                Ok((p, high))
            })
            .collect()
    }

    /// Updates the consumer-lag gauges from the partitions' high watermarks.
    fn refresh_lag(&self) {
        for p in self.partitions.keys() {
            if let Ok((_, high)) = self.consumer.fetch_watermarks(&self.topics.input, *p, Duration::from_secs(1)) {
                self.metrics.set_high_watermark(*p, high, None);
            }
        }
    }

    /// Reads up to `max_batch` messages within `batch_wait` into `self.input`, handling
    /// rebalances as they come.
    fn poll_batch(&mut self) -> Result<(), StreamError> {
        self.input.clear();
        let deadline = Instant::now() + self.options.batch_wait;
        loop {
            // The consumer queue holds the group's events (and messages of partitions added
            // after the start, see `fetch`). Its rebalances are handled before the next read,
            // so every message is judged by the assignment it was fetched under.
            while self.poll_one()? {}
            self.handle_group_events()?;
            let room = self.batch.saturating_sub(self.input.len());
            if room == 0 {
                break;
            }
            // Messages already fetched are taken without a wait. A trickle of them must not
            // hold the cycle past its deadline, so the clock is read after every read (of up
            // to `FETCH_CHUNK` messages).
            let read = self.read_fetched(Duration::ZERO, room)?;
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                break;
            }
            if read == 0 {
                // Waits for the whole room, or until the deadline.
                self.read_fetched(wait, room)?;
            }
        }
        Ok(())
    }

    /// Reads up to `most` messages from the fetch queue, waiting up to `timeout`, keeping those of
    /// assigned partitions. Returns how many were read.
    fn read_fetched(&mut self, timeout: Duration, most: usize) -> Result<usize, StreamError> {
        let (input, partitions) = (&mut self.input, &self.partitions);
        let mut failed = Vec::new();
        let read = self.fetch.read(timeout, most, |message| match message.error() {
            None => {
                if partitions.contains_key(&message.partition()) {
                    input.push(
                        message.partition(),
                        message.offset(),
                        message.timestamp(),
                        message.key(),
                        message.payload(),
                    );
                }
            }
            Some(code) => failed.push(code),
        });
        for code in failed {
            self.consumer_error(KafkaError::MessageConsumption(code))?;
        }
        Ok(read)
    }

    /// Polls the consumer queue once without waiting, keeping a message of an assigned
    /// partition; returns whether the poll returned a message or an error (rather than
    /// nothing, or a served rebalance).
    fn poll_one(&mut self) -> Result<bool, StreamError> {
        match self.consumer.poll(Duration::ZERO) {
            None => return Ok(false),
            Some(Ok(message)) => {
                if self.partitions.contains_key(&message.partition()) {
                    let timestamp = message.timestamp().to_millis();
                    let (p, offset) = (message.partition(), message.offset());
                    self.input.push(p, offset, timestamp, message.key(), message.payload());
                }
            }
            Some(Err(error)) => self.consumer_error(error)?,
        }
        Ok(true)
    }

    /// A consumer error: the end of the job when the source topic is gone, nothing for the end
    /// of a partition, a warning otherwise.
    fn consumer_error(&self, error: KafkaError) -> Result<(), StreamError> {
        let code = error.rdkafka_error_code();
        if matches!(error, KafkaError::PartitionEOF(_)) || code == Some(RDKafkaErrorCode::PartitionEOF) {
            return Ok(());
        }
        if code == Some(RDKafkaErrorCode::UnknownTopicOrPartition) {
            return Err(StreamError::Kafka(format!("source topic `{}`: {error}", self.topics.input)));
        }
        warn!(%error, "consumer error");
        Ok(())
    }

    fn handle_group_events(&mut self) -> Result<(), StreamError> {
        if !self.consumer.context().pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let events = {
            let mut events = self.consumer.context().events.lock().expect("not poisoned");
            self.consumer.context().pending.store(false, Ordering::Release);
            std::mem::take(&mut *events)
        };
        if events.is_empty() {
            return Ok(());
        }
        // The cycle built but not sent may hold work of revoked partitions: drop it and read
        // again from the committed offsets once the assignment has changed.
        let dropped = self.prepared.take().is_some();
        if dropped {
            info!("rebalance: dropping the cycle not committed yet; it is done again");
        }
        for event in events {
            match event {
                GroupEvent::Revoked(partitions) => {
                    info!(?partitions, "partitions revoked");
                    for p in &partitions {
                        self.partitions.remove(p);
                    }
                    self.input.drop_partitions(&partitions);
                }
                GroupEvent::Assigned(partitions) => {
                    self.assignments += 1;
                    info!(?partitions, "partitions assigned; restoring their state");
                    let mut committed = self.committed_offsets(&partitions)?;
                    for p in partitions {
                        let started = Instant::now();
                        let engine = self.restore(p)?;
                        info!(
                            partition = p,
                            keys = engine.live_keys(),
                            millis = started.elapsed().as_millis() as u64,
                            "state restored"
                        );
                        let state = PartitionState::new(engine, committed.remove(&p).unwrap_or_default())?;
                        // The partition's gauges exist from its assignment, before any message.
                        self.metrics.set_position(p, state.next_offset);
                        self.partitions.insert(p, state);
                    }
                }
            }
        }
        if dropped {
            self.input.clear();
            self.rewind()?;
        }
        self.metrics.set_partitions(self.partitions.len());
        Ok(())
    }

    /// Rebuilds partition `p`'s engine from its changelog partition.
    fn restore(&self, p: i32) -> Result<Engine, StreamError> {
        let mut engine = Engine::new(&self.feature, true)?;
        // The log end, past any transaction still open: a read_committed client would be told
        // the last stable offset, before it. An open transaction is waited for (the broker ends
        // a dead worker's after its transaction timeout): once the coordinator has decided to
        // commit one, its records are part of the state even while its markers are on the way.
        let config = self.options.client(ClientConfig::new(), false);
        let (low, high) =
            log_end(config, &self.topics.changelog, p, Duration::from_secs(30)).map_err(StreamError::Kafka)?;
        if high <= low {
            return Ok(engine);
        }
        let reader: BaseConsumer = self
            .options
            .client(ClientConfig::new(), false)
            .set("group.id", format!("{}.restore", self.options.group))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()
            .map_err(kafka)?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topics.changelog, p, Offset::Beginning).map_err(kafka)?;
        reader.assign(&list).map_err(kafka)?;
        let mut records: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let give_up = Instant::now() + self.options.transaction_timeout * 3 + Duration::from_secs(30);
        loop {
            if Instant::now() > give_up {
                return Err(StreamError::Kafka(format!(
                    "changelog `{}` partition {p} could not be read to offset {high}",
                    self.topics.changelog
                )));
            }
            match reader.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    if let Some(key) = message.key() {
                        records.push((key.to_vec(), message.payload().map(|v| v.to_vec())));
                    }
                    if message.offset() + 1 >= high {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => {
                    let position = reader.position().map_err(kafka)?;
                    let at = position
                        .find_partition(&self.topics.changelog, p)
                        .and_then(|e| e.offset().to_raw())
                        .unwrap_or(0);
                    if at >= high {
                        break;
                    }
                }
                Some(Err(error)) => return Err(kafka(error)),
            }
        }
        engine.restore(records.iter().map(|(k, v)| (k.as_slice(), v.as_deref())))?;
        Ok(engine)
    }

    /// Builds the cycle of one micro-batch while the previous one is sent and committed; the
    /// new one is sent and committed during the next cycle (or [`Self::settle`]).
    fn cycle(&mut self) -> Result<(), StreamError> {
        let cycle_started = Instant::now();
        let input = std::mem::take(&mut self.input);
        let previous = self.prepared.take();
        let metadata = match previous {
            Some(_) => Some(self.group_metadata()?),
            None => None,
        };
        let producer = Arc::clone(&self.producer);
        let topics = self.topics.clone();
        let mut online = self.online.take();
        let read = input.len();
        let (computed, committed) = std::thread::scope(|scope| {
            let committing = previous.map(|prepared| {
                let (producer, topics, online) = (&producer, &topics, online.as_mut());
                scope.spawn(move || {
                    let started = Instant::now();
                    (commit_prepared(producer, topics, metadata, online, prepared), started.elapsed())
                })
            });
            let started = Instant::now();
            let computed = self.process_batch(&input);
            let processing = started.elapsed();
            let committed = committing.map(|c| c.join().expect("the commit thread does not panic"));
            if let Some((_, committing)) = &committed {
                self.batch = next_batch(self.batch, self.options.max_batch, read, processing, *committing);
                debug!(
                    read,
                    reading_ms = self.reading.as_secs_f64() * 1e3,
                    processing_ms = processing.as_secs_f64() * 1e3,
                    commit_ms = committing.as_secs_f64() * 1e3,
                    next = self.batch,
                    "cycle"
                );
            }
            (computed, committed.map(|(commit, _)| commit))
        });
        self.online = online;
        self.input = input;
        if let Some(committed) = committed
            && !self.committed(committed?)?
        {
            return Ok(());
        }
        let offsets = computed?;
        self.prepared = Some(Prepared {
            offsets: Some(offsets),
            outbox: std::mem::replace(&mut self.outbox, std::mem::take(&mut self.spare)),
            writes: self.writes.as_mut().map(std::mem::take).unwrap_or_default(),
            produced: std::mem::take(&mut self.produced),
        });
        self.summary.busy += cycle_started.elapsed();
        self.book_cpu();
        Ok(())
    }

    /// Runs `by_partition` through the engines into the outbox and the online-store writes;
    /// returns the input offsets to commit.
    fn process_batch(&mut self, input: &Input) -> Result<TopicPartitionList, StreamError> {
        let mut offsets = TopicPartitionList::new();
        for (p, messages) in &input.partitions {
            if messages.is_empty() {
                continue;
            }
            self.process_partition(*p, messages, &input.bytes)?;
            let next = messages.last().map_or(0, |m| m.offset + 1);
            let last_ms = messages.last().and_then(|m| m.timestamp);
            self.metrics.set_high_watermark(*p, next, last_ms);
            let mut committed = offsets.add_partition(&self.topics.input, *p);
            committed.set_offset(Offset::Offset(next)).map_err(kafka)?;
            self.metrics.set_position(*p, next);
            if let Some(state) = self.partitions.get_mut(p) {
                state.last_message = Instant::now();
                state.next_offset = next;
                if state.ended {
                    committed.set_metadata(FINISHED);
                }
            }
        }
        Ok(offsets)
    }

    fn book_cpu(&mut self) {
        if let Some(started) = self.cpu_started {
            self.summary.cpu = process_cpu().saturating_sub(started);
        }
    }

    fn group_metadata(&self) -> Result<ConsumerGroupMetadata, StreamError> {
        self.consumer.group_metadata().ok_or_else(|| StreamError::Kafka("no consumer group metadata".into()))
    }

    /// Commits the open cycle, if any, and waits for it. Returns false when it aborted (and the
    /// worker rewound).
    fn settle(&mut self) -> Result<bool, StreamError> {
        let Some(prepared) = self.prepared.take() else { return Ok(true) };
        let started = Instant::now();
        let metadata = match prepared.offsets {
            Some(_) => Some(self.group_metadata()?),
            None => None,
        };
        let committed = commit_prepared(&self.producer, &self.topics, metadata, self.online.as_mut(), prepared)?;
        self.summary.busy += started.elapsed();
        self.book_cpu();
        self.committed(committed)
    }

    /// Books a finished commit; an aborted one rewinds (dropping the cycle being built too).
    /// Returns whether it committed.
    fn committed(&mut self, commit: Commit) -> Result<bool, StreamError> {
        self.spare = commit.outbox;
        if !commit.committed {
            self.rewind()?;
            return Ok(false);
        }
        self.metrics.observe_commit(commit.took);
        self.metrics.observe_output_latency(&commit.produced, commit.written_at);
        self.summary.transactions += 1;
        Ok(true)
    }

    fn process_partition(&mut self, p: i32, messages: &[InputMessage], bytes: &[u8]) -> Result<(), StreamError> {
        let payloads: Vec<Option<&[u8]>> = messages.iter().map(|m| m.payload(bytes)).collect();
        let decoded = self.decoder.decode(&payloads);
        for (index, error) in &decoded.errors {
            let message = &messages[*index];
            let headers = OwnedHeaders::new().insert(Header { key: "lockstep.error", value: Some(error.as_str()) });
            self.outbox.forward(Dest::DeadLetters, p, message, bytes, headers);
            self.summary.dead_lettered += 1;
            self.metrics.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
        let now_ms = now_millis();
        let state = self.partitions.get_mut(&p).expect("messages come only from assigned partitions");
        let (stage, passes) = self.evaluator.evaluate(&decoded.rows)?;
        let seqs: Vec<u64> = decoded.messages.iter().map(|i| messages[*i].offset as u64).collect();
        self.metrics.observe_arrivals(&stage, self.feature.layout().time, now_ms);
        let effects = state.engine.process(&stage, &passes, &seqs)?;
        self.summary.events += decoded.rows.num_rows() as u64;
        self.metrics.events.fetch_add(decoded.rows.num_rows() as u64, Ordering::Relaxed);
        for late in &effects.late {
            let message = &messages[decoded.messages[late.row]];
            let windows = serde_json::to_string(&late.windows).expect("pairs of integers serialize");
            let watermark = late.watermark.to_string();
            let event_time = late.event_time.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: "lockstep.reason", value: Some(late.reason.as_str()) })
                .insert(Header { key: "lockstep.event_time", value: Some(event_time.as_str()) })
                .insert(Header { key: "lockstep.watermark", value: Some(watermark.as_str()) })
                .insert(Header { key: "lockstep.windows", value: Some(windows.as_str()) });
            self.outbox.forward(Dest::Late, p, message, bytes, headers);
        }
        self.summary.too_late += effects.late.len() as u64;
        self.metrics.too_late.fetch_add(effects.late.len() as u64, Ordering::Relaxed);
        self.metrics.late_applied.store(state.engine.counters().late_applied, Ordering::Relaxed);
        let engine = &self.partitions[&p].engine;
        let online = self.writes.as_mut();
        let output = Dest::Output(p % self.output_partitions);
        emit(&mut self.outbox, output, &self.feature, engine, &effects, online, &self.metrics)?;
        self.summary.windows += effects.changes.len() as u64;
        for change in &effects.changes {
            let at = messages.partition_point(|m| (m.offset as u64) < change.seq);
            if let Some(produced) = messages.get(at).and_then(|m| m.timestamp) {
                self.produced.push(produced);
            }
        }
        if let Some(w) = engine.watermark() {
            self.metrics.set_watermark(p, w, now_ms);
        }
        let state = self.partitions.get_mut(&p).expect("assigned");
        write_changelog(&mut self.outbox, p, &mut state.engine);
        Ok(())
    }

    /// With the source's `idle_timeout`, a partition silent for that long moves its watermark on
    /// processing time, and the windows it passes fire (in one transaction).
    fn fire_idle_partitions(&mut self) -> Result<(), StreamError> {
        let Some(timeout) = self.feature.source.idle_timeout else { return Ok(()) };
        let timeout = Duration::from_millis(timeout.millis().max(0) as u64);
        let now = now_millis();
        let due: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, s)| {
                s.last_message.elapsed() >= timeout
                    && s.engine.next_timer().is_some_and(|t| t <= now.saturating_sub(s.engine.watermark_delay()))
            })
            .map(|(p, _)| *p)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        info!(?due, "idle partitions: advancing their watermarks on processing time");
        if !self.settle()? {
            return Ok(());
        }
        for p in due {
            let Some(state) = self.partitions.get_mut(&p) else { continue };
            let effects = state.engine.advance_idle(now, state.next_offset.max(0) as u64)?;
            let engine = &self.partitions[&p].engine;
            let online = self.writes.as_mut();
            let output = Dest::Output(p % self.output_partitions);
            emit(&mut self.outbox, output, &self.feature, engine, &effects, online, &self.metrics)?;
            self.summary.windows += effects.changes.len() as u64;
            let state = self.partitions.get_mut(&p).expect("listed above");
            write_changelog(&mut self.outbox, p, &mut state.engine);
        }
        self.commit_now(None)?;
        Ok(())
    }

    /// Sends and commits the cycle built so far with `offsets`. Returns whether it committed.
    fn commit_now(&mut self, offsets: Option<TopicPartitionList>) -> Result<bool, StreamError> {
        self.prepared = Some(Prepared {
            offsets,
            outbox: std::mem::replace(&mut self.outbox, std::mem::take(&mut self.spare)),
            writes: self.writes.as_mut().map(std::mem::take).unwrap_or_default(),
            produced: std::mem::take(&mut self.produced),
        });
        self.settle()
    }

    /// Drops uncommitted work: engines come back from the changelog, reading resumes at the
    /// committed offsets.
    fn rewind(&mut self) -> Result<(), StreamError> {
        self.produced.clear();
        self.outbox.clear();
        if let Some(writes) = &mut self.writes {
            *writes = OnlineWrites::default();
        }
        self.prepared = None;
        let partitions: Vec<i32> = self.partitions.keys().copied().collect();
        let mut committed = self.committed_offsets(&partitions)?;
        for p in partitions {
            let engine = self.restore(p)?;
            let committed = committed.remove(&p).unwrap_or_default();
            self.partitions.insert(p, PartitionState::new(engine, committed)?);
            let offset = committed.offset.map_or(Offset::Beginning, Offset::Offset);
            self.consumer.seek(&self.topics.input, p, offset, Duration::from_secs(10)).map_err(kafka)?;
        }
        Ok(())
    }

    /// The group's committed input offsets of `partitions` (none for a partition never committed).
    /// A partition whose offset comes back with an error of its own (say, unstable behind a dead
    /// worker's open transaction) is asked again for up to a minute: an unknown offset must not
    /// read as "never committed", which would process the partition again from its beginning.
    fn committed_offsets(&self, partitions: &[i32]) -> Result<BTreeMap<i32, Committed>, StreamError> {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let mut list = TopicPartitionList::new();
            for p in partitions {
                list.add_partition(&self.topics.input, *p);
            }
            let committed = self.consumer.committed_offsets(list, Duration::from_secs(60)).map_err(kafka)?;
            let failed = committed.elements().iter().find_map(|e| e.error().err().map(|error| (e.partition(), error)));
            match failed {
                Some((p, error)) if Instant::now() < give_up => {
                    debug!(partition = p, %error, "committed offset not available yet; asking again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Some((p, error)) => {
                    return Err(StreamError::Kafka(format!("the committed offset of input partition {p}: {error}")));
                }
                None => {
                    return Ok(committed
                        .elements()
                        .iter()
                        .map(|e| {
                            let offset = e.offset().to_raw().filter(|at| *at >= 0);
                            let finished = offset.is_some() && e.metadata() == FINISHED;
                            (e.partition(), Committed { offset, finished })
                        })
                        .collect());
                }
            }
        }
    }

    /// A bounded run's last firing: every open window of every partition of this worker whose
    /// run has not ended fires, in one transaction with the partitions' offsets marked
    /// [`FINISHED`]. Returns whether it committed.
    fn finish(&mut self, ends: &BTreeMap<i32, i64>) -> Result<bool, StreamError> {
        if !self.settle()? {
            return Ok(false);
        }
        let partitions: Vec<i32> = self.partitions.iter().filter(|(_, s)| !s.ended).map(|(p, _)| *p).collect();
        let mut offsets = TopicPartitionList::new();
        for &p in &partitions {
            let state = self.partitions.get_mut(&p).expect("listed above");
            // The offset the partition was read to (its end, or past it if more arrived since).
            state.next_offset = state.next_offset.max(ends.get(&p).copied().unwrap_or(0));
            let effects = state.engine.finish(state.next_offset as u64)?;
            let mut marked = offsets.add_partition(&self.topics.input, p);
            marked.set_offset(Offset::Offset(state.next_offset)).map_err(kafka)?;
            marked.set_metadata(FINISHED);
            let engine = &self.partitions[&p].engine;
            let online = self.writes.as_mut();
            let output = Dest::Output(p % self.output_partitions);
            emit(&mut self.outbox, output, &self.feature, engine, &effects, online, &self.metrics)?;
            self.summary.windows += effects.changes.len() as u64;
        }
        if !self.commit_now(Some(offsets))? {
            return Ok(false);
        }
        for p in partitions {
            if let Some(state) = self.partitions.get_mut(&p) {
                state.ended = true;
            }
        }
        Ok(true)
    }
}

/// Sends fired windows and retractions to `output` (topic, partition) and the online store.
fn emit(
    outbox: &mut Outbox,
    output: Dest,
    feature: &CompiledFeature,
    engine: &Engine,
    effects: &Effects,
    mut online: Option<&mut OnlineWrites>,
    metrics: &Metrics,
) -> Result<(), StreamError> {
    if effects.changes.is_empty() {
        return Ok(());
    }
    let keys = feature.key_types.len();
    let rows: Option<&RecordBatch> = effects.rows.as_ref();
    let retracted: Vec<&crate::engine::Change> = effects.changes.iter().filter(|c| c.row.is_none()).collect();
    let retracted_keys = if retracted.is_empty() {
        Vec::new()
    } else {
        engine.key_columns(&retracted.iter().map(|c| &c.key).collect::<Vec<_>>())?
    };
    let mut retraction = 0;
    let mut latest_end = i64::MIN;
    let records = rows.map(|rows| WindowRecords::new(rows, keys));
    let (mut key, mut value) = (Vec::with_capacity(64), Vec::with_capacity(256));
    // One timestamp for the records of one call (a clock read per record is measurable).
    let timestamp = now_millis();
    for change in &effects.changes {
        let label = match change.kind {
            ChangeKind::Fire => "fire",
            ChangeKind::Refire => "refire",
            ChangeKind::Retract => "retract",
        };
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header { key: "lockstep.change", value: Some(label) })
            .insert(Header { key: "lockstep.feature", value: Some(feature.feature.name.as_str()) });
        match (change.row, &records) {
            (Some(row), Some(records)) => {
                key.clear();
                value.clear();
                records.key(&mut key, row);
                records.value(&mut value, row);
                outbox.push(output, Some(&key), Some(&value), Some(headers), Some(timestamp));
                if let Some(store) = online.as_deref_mut() {
                    store.upsert(feature, records, row, &value, change.seq)?;
                }
                latest_end = latest_end.max(change.end);
            }
            _ => {
                let key = window_key_of(&feature.feature.key, &retracted_keys, retraction, change.start);
                outbox.push(output, Some(&key), None, Some(headers), Some(timestamp));
                if let Some(store) = online.as_deref_mut() {
                    store.delete(feature, &retracted_keys, retraction, change.start, change.seq)?;
                }
                retraction += 1;
            }
        }
    }
    metrics.windows_fired.fetch_add(effects.changes.len() as u64, Ordering::Relaxed);
    if latest_end > i64::MIN {
        metrics.set_last_window_end(latest_end);
    }
    Ok(())
}

/// Sends the engine's state changes to its changelog partition.
fn write_changelog(outbox: &mut Outbox, partition: i32, engine: &mut Engine) {
    engine.write_changes(|key, value| outbox.push(Dest::Changelog(partition), Some(key), value, None, None));
}

/// Where a record of a cycle goes.
#[derive(Debug, Clone, Copy)]
enum Dest {
    /// The output topic, this partition.
    Output(i32),
    Late,
    DeadLetters,
    /// The changelog topic, this partition.
    Changelog(i32),
}

/// The messages of one cycle, by partition in offset order. Their keys and values are copied
/// into one buffer, kept from cycle to cycle, rather than into an allocation per message.
#[derive(Default)]
struct Input {
    bytes: Vec<u8>,
    partitions: BTreeMap<i32, Vec<InputMessage>>,
    len: usize,
}

/// An input message; its key and value are ranges of its [`Input`]'s bytes.
struct InputMessage {
    offset: i64,
    /// The record's timestamp (ms), the produce time unless the topic says otherwise.
    timestamp: Option<i64>,
    key: Option<std::ops::Range<usize>>,
    payload: Option<std::ops::Range<usize>>,
}

impl Input {
    fn push(
        &mut self,
        partition: i32,
        offset: i64,
        timestamp: Option<i64>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) {
        let mut copy = |part: Option<&[u8]>| {
            part.map(|bytes| {
                let start = self.bytes.len();
                self.bytes.extend_from_slice(bytes);
                start..self.bytes.len()
            })
        };
        let key = copy(key);
        let payload = copy(payload);
        self.partitions.entry(partition).or_default().push(InputMessage { offset, timestamp, key, payload });
        self.len += 1;
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the messages of revoked partitions.
    fn drop_partitions(&mut self, revoked: &[i32]) {
        for p in revoked {
            if let Some(messages) = self.partitions.get_mut(p) {
                self.len -= messages.len();
                messages.clear();
            }
        }
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.partitions.values_mut().for_each(Vec::clear);
        self.len = 0;
    }
}

impl InputMessage {
    fn key<'b>(&self, bytes: &'b [u8]) -> Option<&'b [u8]> {
        self.key.clone().map(|range| &bytes[range])
    }

    fn payload<'b>(&self, bytes: &'b [u8]) -> Option<&'b [u8]> {
        self.payload.clone().map(|range| &bytes[range])
    }
}

/// A record waiting in the [`Outbox`]: its key and payload are ranges of the outbox's bytes.
struct Pending {
    dest: Dest,
    key: Option<std::ops::Range<usize>>,
    payload: Option<std::ops::Range<usize>>,
    headers: Option<OwnedHeaders>,
    timestamp: Option<i64>,
}

/// The records of the cycle being built. A transaction cannot open before the previous one
/// commits, so records are encoded here meanwhile and sent in one go afterwards.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    records: Vec<Pending>,
}

impl Outbox {
    fn push(
        &mut self,
        dest: Dest,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
        timestamp: Option<i64>,
    ) {
        let mut range = |bytes: &[u8]| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(bytes);
            start..self.bytes.len()
        };
        let key = key.map(&mut range);
        let payload = payload.map(&mut range);
        self.records.push(Pending { dest, key, payload, headers, timestamp });
    }

    /// Queues an input message unchanged (key and value) for `dest`, with `headers` and a
    /// `lockstep.source` header naming its partition and offset (late and dead-letter topics).
    fn forward(&mut self, dest: Dest, partition: i32, message: &InputMessage, bytes: &[u8], headers: OwnedHeaders) {
        let source = format!("{partition}/{}", message.offset);
        let headers = headers.insert(Header { key: "lockstep.source", value: Some(source.as_str()) });
        self.push(dest, message.key(bytes), message.payload(bytes), Some(headers), None);
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.records.clear();
    }

    /// Hands every record to the producer (the transaction must be open), emptying the outbox.
    fn send_all(
        &mut self,
        producer: &ThreadedProducer<DefaultProducerContext>,
        topics: &Topics,
    ) -> Result<(), StreamError> {
        for pending in self.records.drain(..) {
            let (topic, partition) = match pending.dest {
                Dest::Output(p) => (&topics.output, Some(p)),
                Dest::Late => (&topics.late, None),
                Dest::DeadLetters => (&topics.dlq, None),
                Dest::Changelog(p) => (&topics.changelog, Some(p)),
            };
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
            if let Some(p) = partition {
                record = record.partition(p);
            }
            if let Some(range) = pending.key {
                record = record.key(&self.bytes[range]);
            }
            if let Some(range) = pending.payload {
                record = record.payload(&self.bytes[range]);
            }
            if let Some(headers) = pending.headers {
                record = record.headers(headers);
            }
            if let Some(timestamp) = pending.timestamp {
                record = record.timestamp(timestamp);
            }
            send(producer, record)?;
        }
        self.bytes.clear();
        Ok(())
    }
}

/// A cycle built and not sent yet.
struct Prepared {
    /// The input offsets to commit with it (none for idle firing and the final flush).
    offsets: Option<TopicPartitionList>,
    outbox: Outbox,
    writes: OnlineWrites,
    /// Produce times (ms) of the messages that caused its window changes.
    produced: Vec<i64>,
}

/// How a commit went.
struct Commit {
    committed: bool,
    /// The cycle's outbox, emptied.
    outbox: Outbox,
    took: Duration,
    produced: Vec<i64>,
    /// When its windows were in the online store (or committed, without one), ms.
    written_at: i64,
}

/// Opens a transaction for `prepared` and sends its records, then writes its online-store writes
/// while the producer flushes, then commits with its input offsets. Records and writes must all
/// be done before the commit (so a crash after it loses no write), but neither needs to wait for
/// the other. An abortable failure (say the group rebalanced) aborts the transaction and reports
/// `committed: false`: the worker then rewinds to the committed offsets and does the work again,
/// exactly once.
fn commit_prepared(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topics: &Topics,
    metadata: Option<ConsumerGroupMetadata>,
    online: Option<&mut OnlineStore>,
    prepared: Prepared,
) -> Result<Commit, StreamError> {
    let timeout = Duration::from_secs(60);
    let Prepared { offsets, mut outbox, writes, produced } = prepared;
    producer.begin_transaction().map_err(kafka)?;
    outbox.send_all(producer, topics)?;
    let mut written_at = None;
    if let Some(online) = online {
        std::thread::scope(|scope| {
            let sending = scope.spawn(|| flush(producer, timeout));
            let written = online.send(writes);
            // A failed send fails the commit, which handles it (abort and rewind).
            if let Ok(Err(error)) = sending.join() {
                warn!(%error, "sending the cycle's records before the commit failed");
            }
            written
        })?;
        written_at = Some(now_millis());
    }
    let started = Instant::now();
    let mut result = Ok(());
    if let (Some(offsets), Some(metadata)) = (&offsets, &metadata) {
        result = producer.send_offsets_to_transaction(offsets, metadata, timeout);
    }
    // Sent first: the client's own flush inside the commit waits in steps of 100 ms.
    let result = result.and_then(|()| flush(producer, timeout)).and_then(|()| producer.commit_transaction(timeout));
    let took = started.elapsed();
    let written_at = written_at.unwrap_or_else(now_millis);
    match result {
        Ok(()) => Ok(Commit { committed: true, outbox, took, produced, written_at }),
        Err(KafkaError::Transaction(error)) if error.txn_requires_abort() => {
            warn!(%error, "transaction aborted; rewinding to the last commit");
            producer.abort_transaction(timeout).map_err(kafka)?;
            Ok(Commit { committed: false, outbox, took, produced, written_at })
        }
        Err(error) => Err(kafka(error)),
    }
}

/// Sends every queued record and waits until the broker has acknowledged them all (or
/// `timeout`). The client's `flush` polls for delivery reports in steps of up to 100 ms and,
/// with reports for errors only, sleeps a whole step each time: a fixed 100 ms on every commit,
/// where this waits on librdkafka's own count of unacknowledged records instead (the producer's
/// polling thread serves any error reports meanwhile).
fn flush(producer: &ThreadedProducer<DefaultProducerContext>, timeout: Duration) -> Result<(), KafkaError> {
    let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: the handle is the producer's own and outlives the call; rd_kafka_flush may be
    // called from any thread.
    let code = unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), millis) };
    match RDKafkaErrorCode::from(code) {
        RDKafkaErrorCode::NoError => Ok(()),
        error => Err(KafkaError::Flush(error)),
    }
}

/// The size of the next cycle after one of `batch` messages at most read `read` and processed
/// them in `processing` while the previous cycle's commit took `committing`. A commit has a fixed
/// cost (its round trips to the transaction coordinator, the markers it writes) and overlaps
/// the processing of the next cycle: while the commit takes longer and the cycle was full, the
/// size doubles (up to `most`), so under a backlog cycles grow until processing hides the
/// commit; when processing takes more than twice as long, it halves (down to [`FIRST_BATCH`]),
/// so a cycle's work, memory and output latency stay no larger than that needs.
fn next_batch(batch: usize, most: usize, read: usize, processing: Duration, committing: Duration) -> usize {
    let most = most.max(1);
    if read >= batch && committing > processing {
        (batch * 2).min(most)
    } else if processing > committing * 2 {
        (batch / 2).max(FIRST_BATCH.min(most))
    } else {
        batch
    }
}

/// Enqueues a record, waiting while the local queue is full.
fn send<K, P>(
    producer: &ThreadedProducer<DefaultProducerContext>,
    record: BaseRecord<'_, K, P>,
) -> Result<(), StreamError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    let mut record = record;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((error, _)) => return Err(kafka(error)),
        }
    }
}

/// Creates the job's topics that do not exist yet; the input topic must exist. Returns the
/// number of partitions of the input and of the output topic.
fn ensure_topics(options: &KafkaOptions, topics: &Topics) -> Result<(i32, i32), StreamError> {
    let admin: AdminClient<DefaultClientContext> =
        options.client(ClientConfig::new(), false).create().map_err(kafka)?;
    let metadata = admin.inner().fetch_metadata(Some(&topics.input), Duration::from_secs(30)).map_err(kafka)?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topics.input && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            StreamError::Kafka(format!(
                "source topic `{}` does not exist on {}; create it keyed by the feature key",
                topics.input, options.brokers
            ))
        })?;
    let compact = [("cleanup.policy", "compact")];
    let new = [
        NewTopic::new(&topics.output, partitions as i32, TopicReplication::Fixed(1)),
        NewTopic::new(&topics.late, 1, TopicReplication::Fixed(1)),
        NewTopic::new(&topics.dlq, 1, TopicReplication::Fixed(1)),
        NewTopic::new(&topics.changelog, partitions as i32, TopicReplication::Fixed(1)).set(compact[0].0, compact[0].1),
    ];
    let results = futures::executor::block_on(admin.create_topics(&new, &AdminOptions::new())).map_err(kafka)?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(StreamError::Kafka(format!("cannot create topic `{topic}`: {code}"))),
        }
    }
    // The changelog must match the input partition for partition.
    let changelog_partitions = partitions_of(&admin, &topics.changelog)?;
    if changelog_partitions != partitions {
        return Err(StreamError::Kafka(format!(
            "changelog `{}` has {changelog_partitions} partitions but `{}` has {partitions}; they must match",
            topics.changelog, topics.input
        )));
    }
    let output_partitions = partitions_of(&admin, &topics.output)?;
    if output_partitions == 0 {
        return Err(StreamError::Kafka(format!("output topic `{}` has no partitions", topics.output)));
    }
    Ok((partitions as i32, output_partitions as i32))
}

/// The number of partitions of `topic`. A topic just created can take a moment to appear in
/// the metadata: waits up to 30 s for it, then says 0.
fn partitions_of(admin: &AdminClient<DefaultClientContext>, topic: &str) -> Result<usize, StreamError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metadata = admin.inner().fetch_metadata(Some(topic), Duration::from_secs(30)).map_err(kafka)?;
        let found = metadata.topics().first().filter(|t| t.error().is_none()).map_or(0, |t| t.partitions().len());
        if found > 0 || Instant::now() >= deadline {
            return Ok(found);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_grow_while_the_commit_outlasts_the_work_and_shrink_when_work_dominates() {
        let ms = Duration::from_millis;
        // A full cycle processed faster than the commit: double, up to the most.
        assert_eq!(next_batch(5_000, 50_000, 5_000, ms(30), ms(110)), 10_000);
        assert_eq!(next_batch(40_000, 50_000, 40_000, ms(90), ms(110)), 50_000);
        // Not full (the input is not backed up): keep the size.
        assert_eq!(next_batch(20_000, 50_000, 7_000, ms(10), ms(110)), 20_000);
        // Processing within twice the commit: keep; beyond it: halve, not under the first size.
        assert_eq!(next_batch(20_000, 50_000, 20_000, ms(200), ms(110)), 20_000);
        assert_eq!(next_batch(20_000, 50_000, 20_000, ms(300), ms(110)), 10_000);
        assert_eq!(next_batch(6_000, 50_000, 6_000, ms(300), ms(110)), FIRST_BATCH);
        // A most below the first size bounds both ways.
        assert_eq!(next_batch(300, 300, 300, ms(1), ms(110)), 300);
        assert_eq!(next_batch(300, 300, 300, ms(900), ms(110)), 300);
    }
}
