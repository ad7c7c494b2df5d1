//! Loading JSON lines into a topic (`lockstep produce`): each line is one message, keyed by a
//! field of the line so that events of one key land on one partition, optionally at a fixed rate
//! (load tests and demos against a real cluster).

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::error::StreamError;

/// Sends `lines` to `topic` (created with `partitions` if missing), keyed by field `key`, at
/// `rate` messages per second if given. `progress` gets the count sent so far.
pub fn produce_lines(
    brokers: &str,
    topic: &str,
    key: &str,
    partitions: i32,
    lines: &[String],
    rate: Option<u64>,
    progress: impl Fn(usize),
) -> Result<(), StreamError> {
    let kafka = |e: KafkaError| StreamError::Kafka(e.to_string());
    crate::topic::create_if_missing(brokers, topic, partitions)?;
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .map_err(kafka)?;
    let started = Instant::now();
    for (i, line) in lines.iter().enumerate() {
        if let Some(rate) = rate.filter(|r| *r > 0) {
            // Hold the average rate: message i is due at i / rate seconds.
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed())
                && wait > Duration::from_millis(1)
            {
                std::thread::sleep(wait);
            }
        }
        let key_value = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get(key).map(|k| k.as_str().map_or_else(|| k.to_string(), str::to_string)))
            .unwrap_or_default();
        let mut record = BaseRecord::to(topic).key(key_value.as_str()).payload(line.as_str());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((error, _)) => return Err(kafka(error)),
            }
        }
        if i % 10_000 == 0 {
            progress(i);
        }
    }
    producer.flush(Duration::from_secs(120)).map_err(kafka)?;
    progress(lines.len());
    Ok(())
}
