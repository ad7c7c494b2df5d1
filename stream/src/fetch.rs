//! Reading the input topic in batches.
//!
//! rust-rdkafka hands out one message per poll, and each poll costs an event object, an `Arc`, a
//! queue lock and two clock reads: about a tenth of a worker's time on small messages. librdkafka
//! itself reads a queue in batches (`rd_kafka_consume_batch_queue`), which rust-rdkafka does not
//! wrap, so this module does, in the few calls it needs.
//!
//! The fetch queue of every input partition assigned to the worker is forwarded to one queue of
//! the worker's ([`FetchQueue`]), from the rebalance callback, before the assignment takes effect
//! ([`FetchTarget::forward`]). librdkafka undoes the forwarding when a partition is revoked, so it
//! is done again at every assignment. The consumer queue that rust-rdkafka polls then holds only
//! the group's events (rebalances, errors), which the worker still handles through rust-rdkafka,
//! and the messages are read from the fetch queue in batches. A partition librdkafka has no queue
//! for is not forwarded: its messages come through the consumer queue as before. Nothing is lost,
//! and each partition's messages keep their order: forwarding moves the messages already queued
//! for the partition along, ahead of the later ones.
//!
//! librdkafka keeps the consumer's position, drops messages of a revoked or re-seeked partition
//! fetched before the change (op versions), and counts reading this queue as polling for
//! `max.poll.interval.ms`, exactly as for messages polled one at a time.

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use tracing::warn;

/// One message read from a [`FetchQueue`], valid until the next read.
pub struct Fetched<'a> {
    message: &'a rd::rd_kafka_message_t,
}

impl Fetched<'_> {
    /// The consumer error this message stands for, if it is one.
    pub fn error(&self) -> Option<RDKafkaErrorCode> {
        (self.message.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then(|| self.message.err.into())
    }

    pub fn partition(&self) -> i32 {
        self.message.partition
    }

    pub fn offset(&self) -> i64 {
        self.message.offset
    }

    pub fn key(&self) -> Option<&[u8]> {
        bytes(self.message.key, self.message.key_len)
    }

    pub fn payload(&self) -> Option<&[u8]> {
        bytes(self.message.payload, self.message.len)
    }

    /// The record's timestamp in milliseconds, if it has one.
    pub fn timestamp(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: the message is alive (owned by the queue's last batch) and `kind` is writable.
        let millis = unsafe { rd::rd_kafka_message_timestamp(self.message, &mut kind) };
        (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && millis != -1).then_some(millis)
    }
}

fn bytes<'a>(pointer: *mut std::ffi::c_void, len: usize) -> Option<&'a [u8]> {
    if pointer.is_null() {
        return None;
    }
    // SAFETY: librdkafka gives `len` readable bytes at `pointer`, alive as long as the message.
    Some(unsafe { std::slice::from_raw_parts(pointer as *const u8, len) })
}

/// A native queue handle.
struct Queue(NonNull<rd::rd_kafka_queue_t>);

// SAFETY: librdkafka queues may be used from any thread.
unsafe impl Send for Queue {}

/// Where assigned partitions are forwarded: the worker's [`FetchQueue`] while it lives. Shared
/// with the consumer's context, whose rebalance callback forwards each assignment.
#[derive(Clone, Default)]
pub struct FetchTarget(Arc<Mutex<Option<Queue>>>);

impl FetchTarget {
    /// Forwards the fetch queues of `partitions` of `topic` to the fetch queue. Call before the
    /// partitions are assigned (from `pre_rebalance`), so none of their messages is fetched
    /// before. Messages already queued for a partition move along, in order. A partition
    /// librdkafka has no queue for keeps its messages on the consumer queue.
    pub fn forward<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, topic: &str, partitions: &[i32]) {
        let target = self.0.lock().expect("not poisoned");
        let Some(queue) = target.as_ref() else { return };
        let Ok(name) = CString::new(topic) else { return };
        let client = consumer.client().native_ptr();
        for &p in partitions {
            // SAFETY: `client` is a live consumer, `name` a C string, and the target queue is
            // alive while the lock is held (`FetchQueue::drop` takes it). The partition queue's
            // reference is released right after the forwarding, which keeps references of its own.
            unsafe {
                let partition = rd::rd_kafka_queue_get_partition(client, name.as_ptr(), p);
                if partition.is_null() {
                    warn!(partition = p, "no fetch queue for the partition: its messages are read one by one");
                    continue;
                }
                rd::rd_kafka_queue_forward(partition, queue.0.as_ptr());
                rd::rd_kafka_queue_destroy(partition);
            }
        }
    }
}

/// The queue the input partitions' messages are forwarded to; see the module documentation.
///
/// It must be dropped before its consumer (a queue reference outliving the client is an error in
/// librdkafka); a struct holding both declares it first.
pub struct FetchQueue {
    queue: NonNull<rd::rd_kafka_queue_t>,
    target: FetchTarget,
    /// The messages of the last read, destroyed at the next one.
    batch: Vec<*mut rd::rd_kafka_message_t>,
}

// SAFETY: librdkafka queues and messages may be used from any thread; the worker reads this one
// from one thread at a time (`&mut self`).
unsafe impl Send for FetchQueue {}

impl FetchQueue {
    /// A queue of `consumer`'s that `target` forwards assigned partitions to, read at most
    /// `capacity` messages at a time.
    pub fn new<C: ConsumerContext>(
        consumer: &BaseConsumer<C>,
        target: &FetchTarget,
        capacity: usize,
    ) -> Result<Self, String> {
        // SAFETY: the client is a live consumer; the queue is destroyed by `drop`.
        let queue = NonNull::new(unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) })
            .ok_or_else(|| "librdkafka could not create a queue".to_string())?;
        *target.0.lock().expect("not poisoned") = Some(Queue(queue));
        Ok(FetchQueue { queue, target: target.clone(), batch: Vec::with_capacity(capacity.max(1)) })
    }

    /// Reads up to `most` messages (at most the capacity given at creation), waiting up to
    /// `timeout` for the first, and hands each to `each` in queue order (each partition's in
    /// offset order). Returns how many were read.
    pub fn read(&mut self, timeout: Duration, most: usize, mut each: impl FnMut(Fetched<'_>)) -> usize {
        self.release();
        let most = most.min(self.batch.capacity());
        if most == 0 {
            return 0;
        }
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: the array has room for `most` pointers; librdkafka fills the first `n`.
        let n = unsafe { rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), millis, self.batch.as_mut_ptr(), most) };
        if n <= 0 {
            return 0;
        }
        // SAFETY: librdkafka wrote `n` message pointers.
        unsafe { self.batch.set_len(n as usize) };
        for &message in &self.batch {
            // SAFETY: each pointer is a live message until `release`.
            each(Fetched { message: unsafe { &*message } });
        }
        n as usize
    }

    fn release(&mut self) {
        for message in self.batch.drain(..) {
            // SAFETY: each message was read by `read` and is destroyed once.
            unsafe { rd::rd_kafka_message_destroy(message) };
        }
    }
}

impl Drop for FetchQueue {
    fn drop(&mut self) {
        self.release();
        let mut target = self.target.0.lock().expect("not poisoned");
        *target = None;
        // SAFETY: the queue was created by `new` and is destroyed once, after no forwarding can
        // reach it any more.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}
