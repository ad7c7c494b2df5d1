//! Prometheus metrics of a streaming worker, served as text at `/metrics` (`--metrics ADDR`).
//!
//! Counters: events in, too late, late but applied, dead-lettered, windows fired (fires,
//! refires and retractions). Gauges per partition: consumer lag in messages and seconds, and
//! watermark lag (now − watermark). A histogram of transaction commit latency. Arrival latency
//! (now − event time when an event is read) in four buckets: on time (< 5 s), slightly late
//! (< 60 s), moderately late (< 10 min), very late. Feature freshness: now − the latest
//! `window_end` fired.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::RecordBatch;

/// Commit latency bucket bounds, in seconds.
const COMMIT_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Produce-to-output latency buckets: bucket i holds latencies up to 1.02^i − 1 ms.
const LATENCY_GROWTH: f64 = 1.02;
const LATENCY_BUCKETS: usize = 1_300;
/// Arrival latency bucket bounds (ms) and labels.
const ARRIVAL: [(i64, &str); 3] = [(5_000, "on_time"), (60_000, "slightly_late"), (600_000, "moderately_late")];

/// The live metrics of one worker.
#[derive(Default)]
pub struct Metrics {
    pub events: AtomicU64,
    pub too_late: AtomicU64,
    pub late_applied: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub windows_fired: AtomicU64,
    partitions: AtomicU64,
    last_window_end: AtomicI64,
    arrivals: [AtomicU64; 4],
    commits: Mutex<Histogram>,
    /// Produce-to-output latency counts in log buckets (2% wide) of milliseconds.
    output_latency: Mutex<Vec<u64>>,
    per_partition: Mutex<BTreeMap<i32, PartitionGauges>>,
}

#[derive(Default, Clone, Copy)]
struct PartitionGauges {
    position: i64,
    high_watermark: i64,
    watermark_lag_ms: i64,
    last_message_ms: i64,
}

#[derive(Default)]
struct Histogram {
    buckets: [u64; COMMIT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Metrics { last_window_end: AtomicI64::new(i64::MIN), ..Metrics::default() })
    }

    pub fn set_partitions(&self, n: usize) {
        self.partitions.store(n as u64, Ordering::Relaxed);
    }

    pub fn set_position(&self, partition: i32, next_offset: i64) {
        let mut gauges = self.per_partition.lock().expect("not poisoned");
        let entry = gauges.entry(partition).or_default();
        entry.position = next_offset;
        entry.high_watermark = entry.high_watermark.max(next_offset);
    }

    pub fn set_high_watermark(&self, partition: i32, high: i64, last_message_ms: Option<i64>) {
        let mut gauges = self.per_partition.lock().expect("not poisoned");
        let entry = gauges.entry(partition).or_default();
        entry.high_watermark = entry.high_watermark.max(high);
        if let Some(t) = last_message_ms {
            entry.last_message_ms = t;
        }
    }

    pub fn set_watermark(&self, partition: i32, watermark: i64, now_ms: i64) {
        let mut gauges = self.per_partition.lock().expect("not poisoned");
        gauges.entry(partition).or_default().watermark_lag_ms = now_ms.saturating_sub(watermark);
    }

    pub fn set_last_window_end(&self, end: i64) {
        self.last_window_end.fetch_max(end, Ordering::Relaxed);
    }

    pub fn observe_commit(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let mut histogram = self.commits.lock().expect("not poisoned");
        for (i, bound) in COMMIT_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                histogram.buckets[i] += 1;
            }
        }
        histogram.count += 1;
        histogram.sum += seconds;
    }

    /// Records the latency from each causing message's produce time to `now_ms`, when its
    /// window reached the online store (or the committed output without a store).
    pub fn observe_output_latency(&self, produced_ms: &[i64], now_ms: i64) {
        if produced_ms.is_empty() {
            return;
        }
        let mut buckets = self.output_latency.lock().expect("not poisoned");
        if buckets.is_empty() {
            buckets.resize(LATENCY_BUCKETS, 0);
        }
        for t in produced_ms {
            let ms = now_ms.saturating_sub(*t).max(0) as f64;
            let bucket = ((ms + 1.0).ln() / LATENCY_GROWTH.ln()).ceil() as usize;
            buckets[bucket.min(LATENCY_BUCKETS - 1)] += 1;
        }
    }

    /// Percentiles (0–100) of the produce-to-output latency in milliseconds (within 2%).
    pub fn output_latency_percentiles(&self, percentiles: &[f64]) -> Option<Vec<u32>> {
        let buckets = self.output_latency.lock().expect("not poisoned");
        let total: u64 = buckets.iter().sum();
        if total == 0 {
            return None;
        }
        Some(
            percentiles
                .iter()
                .map(|p| {
                    let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
                    let mut seen = 0;
                    let bucket = buckets.iter().position(|n| {
                        seen += n;
                        seen >= rank
                    });
                    let bucket = bucket.unwrap_or(LATENCY_BUCKETS - 1);
                    (LATENCY_GROWTH.powi(bucket as i32) - 1.0).round() as u32
                })
                .collect(),
        )
    }

    /// Counts the arrival latency of the events of `stage` (event time in column `time`).
    pub fn observe_arrivals(&self, stage: &RecordBatch, time: usize, now_ms: i64) {
        let Ok(times) = lockstep_features::stage::millis_of(stage.column(time)) else { return };
        let mut counts = [0u64; 4];
        for t in times.iter().flatten() {
            let delay = now_ms.saturating_sub(t);
            let bucket = ARRIVAL.iter().position(|(bound, _)| delay < *bound).unwrap_or(3);
            counts[bucket] += 1;
        }
        for (i, n) in counts.into_iter().enumerate() {
            self.arrivals[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self, feature: &str, now_ms: i64) -> String {
        let mut out = String::new();
        let label = format!("feature=\"{feature}\"");
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{label}}} {value}");
        };
        counter(&mut out, "lockstep_events_total", "Events read and decoded.", self.events.load(Ordering::Relaxed));
        counter(
            &mut out,
            "lockstep_too_late_total",
            "Events too late for a window (sent to the late topic).",
            self.too_late.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "lockstep_late_applied_total",
            "Late events applied within allowed lateness.",
            self.late_applied.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "lockstep_dead_lettered_total",
            "Malformed messages sent to the dead-letter topic.",
            self.dead_lettered.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "lockstep_windows_fired_total",
            "Window rows emitted (fires, refires, retractions).",
            self.windows_fired.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP lockstep_assigned_partitions Input partitions this worker owns.\n# TYPE lockstep_assigned_partitions gauge\nlockstep_assigned_partitions{{{label}}} {}",
            self.partitions.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP lockstep_arrival_latency_total Events by arrival latency (now - event time).\n# TYPE lockstep_arrival_latency_total counter"
        );
        let names = ["on_time", "slightly_late", "moderately_late", "very_late"];
        for (i, name) in names.iter().enumerate() {
            let _ = writeln!(
                out,
                "lockstep_arrival_latency_total{{{label},bucket=\"{name}\"}} {}",
                self.arrivals[i].load(Ordering::Relaxed)
            );
        }
        let gauges = self.per_partition.lock().expect("not poisoned").clone();
        let _ = writeln!(
            out,
            "# HELP lockstep_consumer_lag_messages Messages behind the end of the partition.\n# TYPE lockstep_consumer_lag_messages gauge"
        );
        for (p, g) in &gauges {
            let _ = writeln!(
                out,
                "lockstep_consumer_lag_messages{{{label},partition=\"{p}\"}} {}",
                (g.high_watermark - g.position).max(0)
            );
        }
        let _ = writeln!(
            out,
            "# HELP lockstep_consumer_lag_seconds Age of the last message read while behind; 0 when caught up.\n# TYPE lockstep_consumer_lag_seconds gauge"
        );
        for (p, g) in &gauges {
            let behind = g.high_watermark > g.position && g.last_message_ms > 0;
            let lag = if behind { (now_ms - g.last_message_ms).max(0) as f64 / 1000.0 } else { 0.0 };
            let _ = writeln!(out, "lockstep_consumer_lag_seconds{{{label},partition=\"{p}\"}} {lag}");
        }
        let _ = writeln!(
            out,
            "# HELP lockstep_watermark_lag_seconds Now minus the partition's watermark.\n# TYPE lockstep_watermark_lag_seconds gauge"
        );
        for (p, g) in &gauges {
            let _ = writeln!(
                out,
                "lockstep_watermark_lag_seconds{{{label},partition=\"{p}\"}} {}",
                g.watermark_lag_ms as f64 / 1000.0
            );
        }
        let last = self.last_window_end.load(Ordering::Relaxed);
        if last > i64::MIN {
            let _ = writeln!(
                out,
                "# HELP lockstep_feature_freshness_seconds Now minus the latest window_end fired.\n# TYPE lockstep_feature_freshness_seconds gauge\nlockstep_feature_freshness_seconds{{{label}}} {}",
                (now_ms - last) as f64 / 1000.0
            );
        }
        if let Some(q) = self.output_latency_percentiles(&[50.0, 99.0]) {
            let _ = writeln!(
                out,
                "# HELP lockstep_produce_to_output_seconds Produce time of the causing event to the window in the online store.\n# TYPE lockstep_produce_to_output_seconds summary"
            );
            let _ = writeln!(
                out,
                "lockstep_produce_to_output_seconds{{{label},quantile=\"0.5\"}} {}",
                q[0] as f64 / 1000.0
            );
            let _ = writeln!(
                out,
                "lockstep_produce_to_output_seconds{{{label},quantile=\"0.99\"}} {}",
                q[1] as f64 / 1000.0
            );
        }
        let histogram = self.commits.lock().expect("not poisoned");
        let _ = writeln!(
            out,
            "# HELP lockstep_transaction_commit_seconds Latency of committing a cycle's transaction.\n# TYPE lockstep_transaction_commit_seconds histogram"
        );
        for (i, bound) in COMMIT_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "lockstep_transaction_commit_seconds_bucket{{{label},le=\"{bound}\"}} {}",
                histogram.buckets[i]
            );
        }
        let _ = writeln!(out, "lockstep_transaction_commit_seconds_bucket{{{label},le=\"+Inf\"}} {}", histogram.count);
        let _ = writeln!(out, "lockstep_transaction_commit_seconds_sum{{{label}}} {}", histogram.sum);
        let _ = writeln!(out, "lockstep_transaction_commit_seconds_count{{{label}}} {}", histogram.count);
        out
    }
}

/// Serves `GET /metrics` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, feature: String, metrics: Arc<Metrics>) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            let feature = feature.clone();
            async move {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                ([("content-type", "text/plain; version=0.0.4")], metrics.render(&feature, now))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

/// The CPU time (user and system, every thread) the process has used so far.
pub fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the `rusage` it is given and touches nothing else.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return Duration::ZERO;
    }
    // SAFETY: a successful getrusage has written the struct, which was zeroed before anyway.
    let usage = unsafe { usage.assume_init() };
    let time = |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}
