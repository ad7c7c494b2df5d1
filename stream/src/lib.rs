//! The streaming job: consumes a source topic from Kafka, runs the shared window and aggregate kernels of `lockstep-features`, and commits output, state and offsets in one transaction.
