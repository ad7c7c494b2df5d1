//! Topics given by URL (`kafka://host:port[,host:port...]/topic`) and reading one whole: every
//! committed record from the beginning of each partition to its end. `lockstep compare` reads
//! output and late topics this way, `lockstep skew` a served-answers log.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::StreamError;

/// A topic named by `kafka://BROKERS/TOPIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicUrl {
    pub brokers: String,
    pub topic: String,
}

impl TopicUrl {
    /// `Ok(None)` when `text` is not a `kafka://` URL; an error when it is a malformed one.
    pub fn parse(text: &str) -> Result<Option<TopicUrl>, String> {
        let Some(rest) = text.strip_prefix("kafka://") else { return Ok(None) };
        let (brokers, topic) = rest
            .split_once('/')
            .filter(|(b, t)| !b.is_empty() && !t.is_empty() && !t.contains('/'))
            .ok_or_else(|| format!("{text}: a Kafka topic is kafka://HOST:PORT/TOPIC"))?;
        Ok(Some(TopicUrl { brokers: brokers.into(), topic: topic.into() }))
    }
}

impl std::fmt::Display for TopicUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kafka://{}/{}", self.brokers, self.topic)
    }
}

/// Creates `topic` with `partitions` (replication 1) unless it exists. Blocking.
pub fn create_if_missing(brokers: &str, topic: &str, partitions: i32) -> Result<(), StreamError> {
    let kafka = |e: KafkaError| StreamError::Kafka(e.to_string());
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().map_err(kafka)?;
    let created = futures::executor::block_on(
        admin.create_topics(&[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))], &AdminOptions::new()),
    )
    .map_err(kafka)?;
    for result in created {
        if let Err((name, code)) = result
            && code != RDKafkaErrorCode::TopicAlreadyExists
        {
            return Err(StreamError::Kafka(format!("cannot create topic `{name}`: {code}")));
        }
    }
    Ok(())
}

/// One record: key, value and headers.
pub type Record = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Vec<u8>)>);

/// Each partition of `topic` with its log start and end: the offsets of its first record and
/// after its last, committed or not. The ends are asked by a read_uncommitted client: a
/// read_committed one is told the last stable offset instead, which stops at the first record of
/// any open transaction (say, that of a worker killed a moment ago, which the broker aborts only
/// after its transaction timeout), so a reader stopping there would miss every record after it.
/// `config` names the brokers (and any settings the cluster needs).
pub fn log_ends(config: ClientConfig, topic: &str, timeout: Duration) -> Result<BTreeMap<i32, (i64, i64)>, String> {
    let client = uncommitted(config)?;
    let metadata = client.fetch_metadata(Some(topic), timeout).map_err(|e| e.to_string())?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err("no such topic (or it has no partitions)".into());
    }
    partitions
        .into_iter()
        .map(|p| Ok((p, client.fetch_watermarks(topic, p, timeout).map_err(|e| e.to_string())?)))
        .collect()
}

/// The log start and end of one partition of `topic`; see [`log_ends`].
pub fn log_end(config: ClientConfig, topic: &str, partition: i32, timeout: Duration) -> Result<(i64, i64), String> {
    uncommitted(config)?.fetch_watermarks(topic, partition, timeout).map_err(|e| e.to_string())
}

fn uncommitted(mut config: ClientConfig) -> Result<BaseConsumer, String> {
    config.set("isolation.level", "read_uncommitted").create().map_err(|e| e.to_string())
}

/// Every committed record of `topic` up to its log ends when the read starts, partition by
/// partition in offset order (read_committed, so aborted transactions are never seen).
/// Transactions open at the start are waited for: their records come once they commit, and
/// are skipped once they abort. Blocking: call it off the async executor. Fails when the topic
/// does not exist or the read makes no progress for 60 s (a transaction still open).
pub fn read_committed(brokers: &str, topic: &str) -> Result<Vec<Record>, String> {
    let timeout = Duration::from_secs(30);
    let ends = log_ends(ClientConfig::new().set("bootstrap.servers", brokers).clone(), topic, timeout)?;
    let mut open: BTreeMap<i32, i64> =
        ends.iter().filter(|(_, (low, high))| high > low).map(|(p, (_, high))| (*p, *high)).collect();
    let mut records = Vec::new();
    if open.is_empty() {
        return Ok(records);
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("lockstep.read.{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(|e| e.to_string())?;
    let mut assignment = TopicPartitionList::new();
    for p in open.keys() {
        assignment.add_partition_offset(topic, *p, Offset::Beginning).map_err(|e| e.to_string())?;
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut progress = Instant::now();
    let mut unchecked = 0usize;
    while !open.is_empty() {
        let message = consumer.poll(Duration::from_millis(500));
        // Where each partition's read has got to (past the markers and aborted records, which
        // are never handed out), asked whenever the reader waits, and every 4,096 records.
        let check = match message {
            Some(Ok(message)) => {
                let headers = message
                    .headers()
                    .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
                    .unwrap_or_default();
                records.push((message.key().map(<[u8]>::to_vec), message.payload().map(<[u8]>::to_vec), headers));
                progress = Instant::now();
                unchecked += 1;
                unchecked >= 4096
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => true,
            Some(Err(e)) => return Err(e.to_string()),
        };
        if !check {
            continue;
        }
        unchecked = 0;
        let position = consumer.position().map_err(|e| e.to_string())?;
        let before = open.len();
        open.retain(|p, end| {
            let at = position.find_partition(topic, *p).and_then(|e| e.offset().to_raw()).unwrap_or(-1);
            at < *end
        });
        if open.len() < before {
            progress = Instant::now();
        }
        if let Some((p, end)) = open.iter().next()
            && progress.elapsed() > Duration::from_secs(60)
        {
            return Err(format!(
                "partition {p} read no further for 60 s, short of its end at offset {end} (a transaction still open?)"
            ));
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_urls() {
        assert_eq!(TopicUrl::parse("served.jsonl"), Ok(None));
        let url = TopicUrl::parse("kafka://127.0.0.1:9092,127.0.0.1:9093/served").unwrap().unwrap();
        assert_eq!(url.brokers, "127.0.0.1:9092,127.0.0.1:9093");
        assert_eq!(url.topic, "served");
        assert_eq!(url.to_string(), "kafka://127.0.0.1:9092,127.0.0.1:9093/served");
        for bad in ["kafka://", "kafka://host:1", "kafka://host:1/", "kafka:///t", "kafka://h:1/a/b"] {
            assert!(TopicUrl::parse(bad).unwrap_err().contains("kafka://HOST:PORT/TOPIC"), "{bad}");
        }
    }
}
