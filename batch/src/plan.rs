//! The batch job as one DataFusion plan.
//!
//! ```text
//!   Sort: keys, window_start                      (met by the window stage's own order)
//!     FeatureWindow: feature=…, window=…          (lockstep's logical node)
//!       Projection: keys, event time, arguments, FILTER masks
//!         Filter: <the feature's filter>
//!           TableScan: history (Parquet or Delta)
//! ```
//!
//! The physical planner turns `FeatureWindow` into `FeatureWindowExec`. For rows ordered by key
//! it asks for one stream sorted by key, then event time: DataFusion's optimizer sorts each scan
//! partition (spilling under the memory limit) and merges them, and the window stage computes
//! runs of whole keys concurrently, in order, so the final sort has nothing left to do. For rows
//! ordered by time (Delta output), rows in any order (training sets) and on a cluster, it asks
//! for input hash-partitioned by key and sorted in each partition (`RepartitionExec(hash(key))`
//! and a per-partition `SortExec`), and the final sort merges or sorts its output.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::{DFSchema, DFSchemaRef, DataFusionError, Result};
use datafusion::execution::SessionState;
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{Expr, Extension, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use datafusion::prelude::SessionConfig;

use crate::exec::{FeatureWindowExec, WindowStage};

/// The logical node of the window stage.
#[derive(Debug, Clone)]
pub struct FeatureWindowNode {
    pub stage: WindowStage,
    pub input: LogicalPlan,
    schema: DFSchemaRef,
}

impl FeatureWindowNode {
    pub fn try_new(stage: WindowStage, input: LogicalPlan) -> Result<Self> {
        let schema = Arc::new(DFSchema::try_from(stage.output_schema.as_ref().clone())?);
        Ok(FeatureWindowNode { stage, input, schema })
    }

    /// The node as a logical plan.
    pub fn into_plan(self) -> LogicalPlan {
        LogicalPlan::Extension(Extension { node: Arc::new(self) })
    }
}

impl PartialEq for FeatureWindowNode {
    fn eq(&self, other: &Self) -> bool {
        self.stage.describe() == other.stage.describe() && self.input == other.input
    }
}

impl Eq for FeatureWindowNode {}

impl Hash for FeatureWindowNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.stage.describe().hash(state);
        self.input.hash(state);
    }
}

impl PartialOrd for FeatureWindowNode {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        self.stage.describe().partial_cmp(&other.stage.describe())
    }
}

impl UserDefinedLogicalNodeCore for FeatureWindowNode {
    fn name(&self) -> &str {
        "FeatureWindow"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "FeatureWindow: {}", self.stage.describe())
    }

    fn with_exprs_and_inputs(&self, _exprs: Vec<Expr>, mut inputs: Vec<LogicalPlan>) -> Result<Self> {
        let input = inputs.pop().ok_or_else(|| DataFusionError::Internal("FeatureWindow takes one input".into()))?;
        FeatureWindowNode::try_new(self.stage.clone(), input)
    }
}

/// Plans [`FeatureWindowNode`] as described in the module documentation.
#[derive(Debug)]
struct FeatureWindowPlanner;

#[async_trait]
impl ExtensionPlanner for FeatureWindowPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn datafusion::catalog::Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<FeatureWindowNode>() else { return Ok(None) };
        let input = physical_inputs
            .first()
            .cloned()
            .ok_or_else(|| DataFusionError::Internal("FeatureWindow takes one input".into()))?;
        Ok(Some(Arc::new(FeatureWindowExec::try_new(node.stage.clone(), input)?)))
    }
}

/// A query planner that knows lockstep's logical nodes.
#[derive(Debug)]
struct LockstepQueryPlanner;

/// The query planner of every lockstep session (and of a cluster's scheduler).
pub fn query_planner() -> Arc<dyn QueryPlanner + Send + Sync> {
    Arc::new(LockstepQueryPlanner)
}

#[async_trait]
impl QueryPlanner for LockstepQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn datafusion::catalog::Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // Delta's own nodes (its write path wraps the input plan in them) plan alongside ours.
        DefaultPhysicalPlanner::with_extension_planners(vec![
            Arc::new(FeatureWindowPlanner),
            deltalake::delta_datafusion::planner::DeltaExtensionPlanner::new(),
        ])
        .create_physical_plan(logical_plan, session)
        .await
    }
}

/// Resources of a batch session.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Memory for sorts and aggregation before spilling to disk, in bytes.
    pub memory_limit: usize,
    /// Partitions (threads) to spread keys over; on a cluster, the tasks each stage is cut into.
    pub partitions: usize,
    /// A Ballista scheduler (`df://host:port`) to run plans on; `None` runs them in this process.
    pub cluster: Option<String>,
    /// Rows per batch between operators (tests make it small to cross many batch edges).
    pub batch_size: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            memory_limit: 1 << 30,
            partitions: std::thread::available_parallelism().map_or(2, |n| n.get()),
            cluster: None,
            batch_size: 8192,
        }
    }
}

/// A runtime whose sorts spill to disk past the memory limit.
pub fn runtime(limits: &SessionLimits) -> Result<Arc<datafusion::execution::runtime_env::RuntimeEnv>> {
    RuntimeEnvBuilder::new().with_memory_pool(Arc::new(FairSpillPool::new(limits.memory_limit))).build_arc()
}

/// The settings of every lockstep session.
pub fn session_config(limits: &SessionLimits) -> SessionConfig {
    SessionConfig::new()
        .with_target_partitions(limits.partitions)
        .with_batch_size(limits.batch_size)
        .set_bool("datafusion.execution.parquet.schema_force_view_types", false)
        // File statistics are off: DataFusion 55 turns a column whose Parquet min equals its max
        // into a constant, but Parquet min/max leave NaN out, so a float column holding one
        // number and NaN would read as that number everywhere. Row-group pruning by a filter
        // (a backfill's time ranges) reads the Parquet footers itself and still works, as does
        // Delta's file skipping.
        .set_bool("datafusion.execution.collect_statistics", false)
}

/// A context running plans on `limits.cluster`, or in this process when there is none.
pub async fn context(
    limits: &SessionLimits,
) -> std::result::Result<datafusion::prelude::SessionContext, crate::BatchError> {
    match &limits.cluster {
        Some(url) => crate::cluster::remote_context(url, limits).await,
        None => Ok(datafusion::prelude::SessionContext::new_with_state(session_state(limits)?)),
    }
}

/// A DataFusion session with lockstep's planner, a spilling memory pool and Delta support,
/// running plans in this process.
pub fn session_state(limits: &SessionLimits) -> Result<SessionState> {
    Ok(SessionStateBuilder::new()
        .with_config(session_config(limits))
        .with_runtime_env(runtime(limits)?)
        .with_default_features()
        .with_query_planner(Arc::new(LockstepQueryPlanner))
        .build())
}
