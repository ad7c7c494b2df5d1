//! The streaming job: consumes a source topic from Kafka, runs the shared window and aggregate
//! kernels of `lockstep-features`, and commits output, state and offsets in one transaction.
//!
//! [`rules`] holds the pure decisions of SPEC §4 (watermarks, lateness, firing, release);
//! [`engine`] runs them per input partition; [`kafka`] is the exactly-once worker, [`replay`] the
//! broker-less source, [`online`] the Redis store that [`serve`] reads and [`skew`] checks, and
//! [`topic`] reads whole topics for `compare` and `skew`.

pub mod collect;
pub mod decode;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod kafka;
pub mod metrics;
pub mod online;
pub mod produce;
pub mod records;
pub mod replay;
pub mod rules;
pub mod serve;
pub mod skew;
pub mod topic;

pub use error::StreamError;
