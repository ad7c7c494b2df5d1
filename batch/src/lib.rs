//! The batch job: a feature set over a source's history, computed with DataFusion.
//!
//! [`BatchJob`] compiles a feature set (from `lockstep-features`) into one DataFusion plan — scan,
//! filter, stage projection, then lockstep's window stage ([`exec::FeatureWindowExec`]) — and
//! writes SPEC §2 rows to Parquet or Delta. The window stage runs the shared pane and aggregate
//! kernels, the same code the streaming job runs.

pub mod cluster;
pub mod error;
pub mod exec;
pub mod output;
pub mod plan;
pub mod rows_parquet;
pub mod source;
pub mod training;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, SortExpr, col, lit};
use datafusion::prelude::SessionContext;
use lockstep_features::{CompiledFeature, Location};

pub use error::BatchError;
pub use exec::StageCounters;
pub use output::{OutputFormat, OutputTarget};
pub use plan::SessionLimits;

use crate::exec::{Spread, WindowStage};
use crate::plan::FeatureWindowNode;

/// The commit metadata field of an output Delta table holding the history version its rows
/// reflect; `backfill` continues from it.
pub const HISTORY_VERSION: &str = "lockstep.history_version";

/// A configured batch job; see the crate documentation.
pub struct BatchJob {
    feature: CompiledFeature,
    history: Location,
    limits: SessionLimits,
    counters: Arc<StageCounters>,
    history_version: Option<deltalake::kernel::Version>,
    ranges: Option<Ranges>,
    wanted: Option<Arc<exec::WantedWindows>>,
    /// The Delta version of the history the last `frame` read (Delta histories only).
    read_version: std::sync::Mutex<Option<deltalake::kernel::Version>>,
}

/// Restricts a job to some windows: only events with times in `events` are read, and only rows
/// whose `window_start` lies in `windows` are written. Ranges are half-open, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges {
    pub events: Vec<(i64, i64)>,
    pub windows: Vec<(i64, i64)>,
}

/// `column` lies in one of `ranges` (half-open, milliseconds), as an expression comparing the
/// column with literals of its own type so that Parquet and Delta statistics can prune.
pub fn in_ranges(
    column: &str,
    data_type: &arrow::datatypes::DataType,
    ranges: &[(i64, i64)],
) -> Result<Expr, BatchError> {
    use datafusion::scalar::ScalarValue;
    let literal = |ms: i64| -> Result<Expr, BatchError> {
        let value = ScalarValue::TimestampMillisecond(Some(ms), Some("UTC".into())).cast_to(data_type)?;
        Ok(lit(value))
    };
    let mut any: Option<Expr> = None;
    for &(from, to) in ranges {
        let column = col(lockstep_features::compile::quoted(column));
        let inside = column.clone().gt_eq(literal(from)?).and(column.lt(literal(to)?));
        any = Some(match any {
            None => inside,
            Some(previous) => previous.or(inside),
        });
    }
    Ok(any.unwrap_or(lit(false)))
}

/// The order of a job's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowOrder {
    /// By key, then `window_start`.
    Key,
    /// By `window_start`, then key.
    Time,
    /// As the window stage's partitions produce them.
    Any,
}

/// What a finished batch job did.
#[derive(Debug, Clone)]
pub struct BatchSummary {
    /// Events that passed the filter and reached the window stage.
    pub events: u64,
    /// Events skipped because their event time was null.
    pub null_times: u64,
    /// Rows written (one per key and window).
    pub windows: u64,
    pub elapsed: Duration,
    pub output: String,
}

impl BatchJob {
    /// A job computing `feature` over `history` (defaults to the source's `history`).
    pub fn new(feature: CompiledFeature, history: Option<Location>) -> Result<Self, BatchError> {
        let history = history.or_else(|| feature.source.history.clone()).ok_or_else(|| {
            BatchError::Config(format!("source `{}` has no `history`; pass --history URL", feature.source.name))
        })?;
        Ok(BatchJob {
            feature,
            history,
            limits: SessionLimits::default(),
            counters: Arc::new(StageCounters::default()),
            history_version: None,
            ranges: None,
            wanted: None,
            read_version: std::sync::Mutex::new(None),
        })
    }

    /// Reads a Delta history at `version` instead of its latest version.
    pub fn at_history_version(mut self, version: deltalake::kernel::Version) -> Self {
        self.history_version = Some(version);
        self
    }

    /// Writes only these windows (all windows are still computed, but few are evaluated).
    pub fn with_wanted(mut self, wanted: Arc<exec::WantedWindows>) -> Self {
        self.wanted = Some(wanted);
        self
    }

    /// Computes only some windows; see [`Ranges`].
    pub fn with_ranges(mut self, ranges: Ranges) -> Self {
        self.ranges = Some(ranges);
        self
    }

    /// Sets memory and parallelism.
    pub fn with_limits(mut self, limits: SessionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Live counters, for a progress display.
    pub fn counters(&self) -> Arc<StageCounters> {
        self.counters.clone()
    }

    /// The history being read.
    pub fn history(&self) -> &Location {
        &self.history
    }

    /// The job's plan. Rows are ordered by key then `window_start`, or with `by_time` by
    /// `window_start` then key (Delta output: files then cover narrow time ranges, which keeps a
    /// backfill's `replaceWhere` rewrite small).
    async fn frame_ordered(&self, by_time: bool) -> Result<(SessionContext, DataFrame), BatchError> {
        self.frame_in(if by_time { RowOrder::Time } else { RowOrder::Key }).await
    }

    async fn frame_in(&self, order: RowOrder) -> Result<(SessionContext, DataFrame), BatchError> {
        let ctx = plan::context(&self.limits).await?;
        let history = match (&self.limits.cluster, &self.history) {
            (Some(_), Location::Delta(path)) => {
                let opened = source::read_delta_files(&ctx, path, self.history_version).await?;
                source::check_schema(&self.feature.source, path, &opened.frame)?;
                opened
            }
            _ => source::read_history_at(&ctx, &self.feature.source, &self.history, self.history_version).await?,
        };
        *self.read_version.lock().expect("not poisoned") = history.version;
        let history = history.frame;
        let mut builder = LogicalPlanBuilder::from(history.logical_plan().clone());
        if let Some(ranges) = &self.ranges {
            let time = &self.feature.source.event_time;
            let field = history.schema().field_with_unqualified_name(time)?;
            builder = builder.filter(in_ranges(time, field.data_type(), &ranges.events)?)?;
        }
        if let Some(filter) = &self.feature.filter {
            builder = builder.filter(filter.clone())?;
        }
        let staged = builder.project(self.feature.stage_exprs())?.build()?;
        let mut stage = WindowStage::new(&self.feature, self.counters.clone());
        stage.wanted = self.wanted.clone();
        if order == RowOrder::Key && self.limits.cluster.is_none() {
            // Rows ordered by key come straight from concurrent runs of whole keys, without a
            // merge of output rows; a cluster spreads keys over its tasks by hash instead.
            stage.spread = Spread::KeyRuns;
        }
        let mut windowed = LogicalPlanBuilder::from(FeatureWindowNode::try_new(stage, staged)?.into_plan());
        if let Some(ranges) = &self.ranges {
            windowed = windowed.filter(in_ranges(
                "window_start",
                &lockstep_features::value::timestamp_type(),
                &ranges.windows,
            )?)?;
        }
        let mut sort: Vec<SortExpr> = self
            .feature
            .feature
            .key
            .iter()
            .map(|k| col(lockstep_features::compile::quoted(k)).sort(true, true))
            .collect();
        let start = col("window_start").sort(true, true);
        let plan = match order {
            RowOrder::Key => {
                sort.push(start);
                windowed.sort(sort)?.build()?
            }
            RowOrder::Time => {
                sort.insert(0, start);
                windowed.sort(sort)?.build()?
            }
            RowOrder::Any => windowed.build()?,
        };
        let frame = DataFrame::new(ctx.state(), plan);
        Ok((ctx, frame))
    }

    async fn frame(&self) -> Result<(SessionContext, DataFrame), BatchError> {
        self.frame_ordered(false).await
    }

    /// The job's plan as a DataFrame (rows by `window_start` then key when `by_time`), with the
    /// Delta version of the history it reads. The context is this process's: on a cluster the
    /// frame is the stream of rows the cluster returns, and writing it happens here.
    pub async fn dataframe(
        &self,
        by_time: bool,
    ) -> Result<(SessionContext, DataFrame, Option<deltalake::kernel::Version>), BatchError> {
        let (ctx, frame) = self.frame_ordered(by_time).await?;
        let version = *self.read_version.lock().expect("not poisoned");
        if self.limits.cluster.is_none() {
            return Ok((ctx, frame, version));
        }
        let local = SessionContext::new_with_state(plan::session_state(&self.limits)?);
        let keys = self.feature.feature.key.len();
        let order: Vec<usize> =
            if by_time { std::iter::once(keys).chain(0..keys).collect() } else { (0..=keys).collect() };
        let check = output::ClusterRows::new(frame.schema().as_arrow(), order, self.counters.clone())?;
        let rows = output::ordered_source(frame, Some(check)).await?;
        let frame = DataFrame::new(local.state(), rows);
        Ok((local, frame, version))
    }

    /// The job's logical and physical plans, as text.
    pub async fn explain(&self) -> Result<String, BatchError> {
        let (_ctx, frame) = self.frame().await?;
        let logical = frame.clone().into_optimized_plan()?;
        let physical = frame.create_physical_plan().await?;
        Ok(format!(
            "Logical plan:\n{}\n\nPhysical plan:\n{}",
            logical.display_indent(),
            datafusion::physical_plan::displayable(physical.as_ref()).indent(false)
        ))
    }

    /// Runs the job, writing every window row to `target`.
    pub async fn run(&self, target: &OutputTarget) -> Result<BatchSummary, BatchError> {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            match self.run_once(target, started).await {
                Err(error) if self.on_cluster() && attempt < cluster::ATTEMPTS && cluster::inconsistent(&error) => {
                    tracing::warn!(attempt, %error, "nothing was written; running the job again");
                    self.counters.windows.store(0, Ordering::Relaxed);
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn run_once(&self, target: &OutputTarget, started: Instant) -> Result<BatchSummary, BatchError> {
        let (ctx, frame, version) = self.dataframe(matches!(target, OutputTarget::Delta(_))).await?;
        let mut metadata = serde_json::Map::new();
        metadata.insert("lockstep.feature".into(), self.feature.feature.name.clone().into());
        metadata.insert("lockstep.history".into(), self.history.url().into());
        if let Some(version) = version {
            metadata.insert(HISTORY_VERSION.into(), (version as i64).into());
        }
        target.write(&ctx.state(), frame, &self.feature.feature.key, metadata).await?;
        Ok(BatchSummary {
            events: self.counters.events.load(Ordering::Relaxed),
            null_times: self.counters.null_times.load(Ordering::Relaxed),
            windows: self.counters.windows.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
            output: target.url().to_string(),
        })
    }

    /// Runs the job and returns the rows in memory (tests and small outputs).
    pub async fn collect(&self) -> Result<Vec<arrow::array::RecordBatch>, BatchError> {
        if !self.on_cluster() {
            let (_ctx, frame) = self.frame().await?;
            return Ok(frame.collect().await?);
        }
        let mut attempt = 1;
        loop {
            let (_ctx, frame, _) = self.dataframe(false).await?;
            match frame.collect().await {
                Err(error) if attempt < cluster::ATTEMPTS && cluster::inconsistent(&error) => {
                    tracing::warn!(attempt, %error, "running the job again");
                    self.counters.windows.store(0, Ordering::Relaxed);
                    attempt += 1;
                }
                result => return Ok(result?),
            }
        }
    }

    /// Runs the job and returns the rows in memory in no particular order (a training set
    /// indexes them; sorting would only cost time). On a cluster, rows come back sorted, which
    /// lets their order be checked.
    pub async fn collect_unordered(&self) -> Result<Vec<arrow::array::RecordBatch>, BatchError> {
        if self.on_cluster() {
            return self.collect().await;
        }
        let (_ctx, frame) = self.frame_in(RowOrder::Any).await?;
        Ok(frame.collect().await?)
    }

    /// Whether the job runs on a cluster (its events are then counted on the executors, and the
    /// summary has only the rows written).
    pub fn on_cluster(&self) -> bool {
        self.limits.cluster.is_some()
    }
}
