//! The batch job: a feature set over a source's history, computed with DataFusion.
//!
//! [`BatchJob`] compiles a feature set (from `lockstep-features`) into one DataFusion plan — scan,
//! filter, stage projection, then lockstep's window stage ([`exec::FeatureWindowExec`]) — and
//! writes SPEC §2 rows to Parquet or Delta. The window stage runs the shared pane and aggregate
//! kernels, the same code the streaming job runs.

pub mod error;
pub mod exec;
pub mod output;
pub mod plan;
pub mod source;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{LogicalPlanBuilder, SortExpr, col};
use datafusion::prelude::SessionContext;
use lockstep_features::{CompiledFeature, Location};

pub use error::BatchError;
pub use exec::StageCounters;
pub use output::{OutputFormat, OutputTarget};
pub use plan::SessionLimits;

use crate::exec::WindowStage;
use crate::plan::FeatureWindowNode;

/// A configured batch job; see the crate documentation.
pub struct BatchJob {
    feature: CompiledFeature,
    history: Location,
    limits: SessionLimits,
    counters: Arc<StageCounters>,
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
        })
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

    async fn frame(&self) -> Result<(SessionContext, DataFrame), BatchError> {
        let state = plan::session_state(&self.limits)?;
        let ctx = SessionContext::new_with_state(state);
        let history = source::read_history(&ctx, &self.feature.source, &self.history).await?;
        let mut builder = LogicalPlanBuilder::from(history.logical_plan().clone());
        if let Some(filter) = &self.feature.filter {
            builder = builder.filter(filter.clone())?;
        }
        let staged = builder.project(self.feature.stage_exprs())?.build()?;
        let stage = WindowStage::new(&self.feature, self.counters.clone());
        let windowed = FeatureWindowNode::try_new(stage, staged)?.into_plan();
        let mut order: Vec<SortExpr> = self
            .feature
            .feature
            .key
            .iter()
            .map(|k| col(lockstep_features::compile::quoted(k)).sort(true, true))
            .collect();
        order.push(col("window_start").sort(true, true));
        let plan = LogicalPlanBuilder::from(windowed).sort(order)?.build()?;
        let frame = DataFrame::new(ctx.state(), plan);
        Ok((ctx, frame))
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
        let (ctx, frame) = self.frame().await?;
        let mut metadata = serde_json::Map::new();
        metadata.insert("lockstep.feature".into(), self.feature.feature.name.clone().into());
        metadata.insert("lockstep.history".into(), self.history.url().into());
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
        let (_ctx, frame) = self.frame().await?;
        Ok(frame.collect().await?)
    }
}
