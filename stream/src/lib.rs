//! The streaming job: consumes a source topic from Kafka, runs the shared window and aggregate
//! kernels of `lockstep-features`, and commits output, state and offsets in one transaction.
//!
//! So far: [`rules`], the pure decisions of SPEC §4 (watermarks, lateness, firing, release).
//! The Kafka runtime, state changelog and replay source are being built on top of them.

pub mod collect;
pub mod decode;
pub mod engine;
pub mod error;
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
