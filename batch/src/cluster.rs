//! Running batch plans on a Ballista cluster (`--cluster df://HOST:PORT`).
//!
//! The client builds the same logical plan as an in-process run and hands it to the Ballista
//! scheduler, which plans it with lockstep's query planner (so `FeatureWindow` becomes
//! [`FeatureWindowExec`]) and splits it into stages at the hash repartition by key. Executors run
//! the stages: scan, filter and stage projection, then the shuffle by key, then the per-partition
//! sort and the window stage, then the final ordered merge, whose rows stream back to the client.
//! The client writes the output, so the atomic Parquet rename and the single Delta commit hold
//! as they do in-process.
//!
//! The one piece Ballista cannot carry by itself is lockstep's window stage: [`LockstepLogicalCodec`]
//! and [`LockstepPhysicalCodec`] put it on the wire (the stage's definition, not code: every
//! process runs the same `features` kernels) and hand every other node to Ballista's codecs.
//! A Delta history is read as the Parquet files of its pinned version (see
//! [`crate::source::read_delta_files`]), since Delta's scan has no physical codec.

use std::sync::Arc;

use ballista::extension::SessionContextExt;
use ballista_core::extension::SessionConfigExt;
use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::catalog::TableProvider;
use datafusion::common::{DataFusionError, Result, TableReference};
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::{Extension, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use lockstep_features::{AggregateSpec, StageLayout, ValueType, Window};

use crate::error::BatchError;
use crate::exec::{FeatureWindowExec, Spread, StageCounters, WantedWindows, WindowStage};
use crate::plan::{FeatureWindowNode, SessionLimits};

/// The first bytes of every plan node lockstep encodes; anything else belongs to Ballista.
const MAGIC: &[u8; 8] = b"lockstep";

/// The window stage on the wire: its definition, from which every process builds the same
/// stage. Wanted windows (training sets) follow the JSON in a compact binary form.
#[derive(serde::Serialize, serde::Deserialize)]
struct StageWire {
    feature: String,
    window: Window,
    specs: Vec<AggregateSpec>,
    layout: StageLayout,
    keys: Vec<(String, ValueType)>,
    wanted: bool,
}

/// Appends the stage to `buf`.
pub fn encode_stage(stage: &WindowStage, buf: &mut Vec<u8>) -> Result<()> {
    let keys = stage
        .key_names
        .iter()
        .zip(stage.output_schema.fields())
        .map(|(name, field)| {
            let value_type = ValueType::of_arrow(field.data_type()).ok_or_else(|| {
                DataFusionError::Internal(format!("key `{name}` has type {} with no lockstep type", field.data_type()))
            })?;
            Ok((name.clone(), value_type))
        })
        .collect::<Result<Vec<_>>>()?;
    let wire = StageWire {
        feature: stage.feature.clone(),
        window: stage.window,
        specs: stage.specs.clone(),
        layout: stage.layout.clone(),
        keys,
        wanted: stage.wanted.is_some(),
    };
    let json = serde_json::to_vec(&wire).map_err(|e| DataFusionError::Internal(format!("encoding the stage: {e}")))?;
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(json.len() as u64).to_le_bytes());
    buf.extend_from_slice(&json);
    if let Some(wanted) = &stage.wanted {
        encode_wanted(wanted, buf);
    }
    Ok(())
}

/// The stage `buf` holds, or `None` when `buf` is not a lockstep node. Counters are fresh: on a
/// cluster each task counts for itself.
pub fn decode_stage(buf: &[u8]) -> Result<Option<WindowStage>> {
    let Some(rest) = buf.strip_prefix(MAGIC.as_slice()) else { return Ok(None) };
    let corrupt = |what: &str| DataFusionError::Internal(format!("corrupt lockstep window stage: {what}"));
    let (length, rest) = rest.split_first_chunk::<8>().ok_or_else(|| corrupt("no length"))?;
    let length = usize::try_from(u64::from_le_bytes(*length)).map_err(|_| corrupt("length"))?;
    if rest.len() < length {
        return Err(corrupt("truncated"));
    }
    let (json, rest) = rest.split_at(length);
    let wire: StageWire = serde_json::from_slice(json).map_err(|e| corrupt(&e.to_string()))?;
    let output_schema = lockstep_features::compile::output_schema(&wire.keys, &wire.specs);
    let wanted =
        if wire.wanted { Some(Arc::new(decode_wanted(rest).ok_or_else(|| corrupt("wanted windows"))?)) } else { None };
    Ok(Some(WindowStage {
        feature: wire.feature,
        window: wire.window,
        specs: wire.specs,
        layout: wire.layout,
        key_names: wire.keys.into_iter().map(|(name, _)| name).collect(),
        output_schema,
        counters: Arc::new(StageCounters::default()),
        wanted,
        // A cluster's window stage runs in the hash-partitioned tasks its stages are cut into.
        spread: Spread::Partitions,
    }))
}

/// Keys (row bytes) with their window starts: `u64` key count, then per key a `u32` length,
/// the bytes, a `u32` start count and the starts as little-endian `i64`s. A million labels take
/// about 8 MB.
fn encode_wanted(wanted: &WantedWindows, buf: &mut Vec<u8>) {
    buf.extend_from_slice(&(wanted.by_key.len() as u64).to_le_bytes());
    for (key, starts) in &wanted.by_key {
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        buf.extend_from_slice(key);
        buf.extend_from_slice(&(starts.len() as u32).to_le_bytes());
        for start in starts {
            buf.extend_from_slice(&start.to_le_bytes());
        }
    }
}

fn decode_wanted(mut buf: &[u8]) -> Option<WantedWindows> {
    fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if buf.len() < n {
            return None;
        }
        let (head, rest) = buf.split_at(n);
        *buf = rest;
        Some(head)
    }
    let u32_at = |buf: &mut &[u8]| take(buf, 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
    let keys = u64::from_le_bytes(take(&mut buf, 8)?.try_into().ok()?);
    let mut pairs = Vec::new();
    for _ in 0..keys {
        let length = u32_at(&mut buf)?;
        let key = take(&mut buf, length)?;
        let count = u32_at(&mut buf)?;
        for _ in 0..count {
            pairs.push((key, i64::from_le_bytes(take(&mut buf, 8)?.try_into().ok()?)));
        }
    }
    buf.is_empty().then(|| WantedWindows::from_pairs(pairs))
}

/// Ballista's logical codec plus lockstep's `FeatureWindow` node.
#[derive(Debug, Default)]
pub struct LockstepLogicalCodec {
    ballista: BallistaLogicalExtensionCodec,
}

impl LogicalExtensionCodec for LockstepLogicalCodec {
    fn try_decode(&self, buf: &[u8], inputs: &[LogicalPlan], ctx: &TaskContext) -> Result<Extension> {
        match decode_stage(buf)? {
            Some(stage) => {
                let input = inputs
                    .first()
                    .cloned()
                    .ok_or_else(|| DataFusionError::Internal("FeatureWindow takes one input".into()))?;
                Ok(Extension { node: Arc::new(FeatureWindowNode::try_new(stage, input)?) })
            }
            None => self.ballista.try_decode(buf, inputs, ctx),
        }
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        match node.node.as_any().downcast_ref::<FeatureWindowNode>() {
            Some(window) => encode_stage(&window.stage, buf),
            None => self.ballista.try_encode(node, buf),
        }
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: arrow::datatypes::SchemaRef,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        self.ballista.try_decode_table_provider(buf, table_ref, schema, ctx)
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        self.ballista.try_encode_table_provider(table_ref, node, buf)
    }

    fn try_decode_file_format(&self, buf: &[u8], ctx: &TaskContext) -> Result<Arc<dyn FileFormatFactory>> {
        self.ballista.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(&self, buf: &mut Vec<u8>, node: Arc<dyn FileFormatFactory>) -> Result<()> {
        self.ballista.try_encode_file_format(buf, node)
    }
}

/// Ballista's physical codec plus lockstep's [`FeatureWindowExec`].
#[derive(Debug, Default)]
pub struct LockstepPhysicalCodec {
    ballista: BallistaPhysicalExtensionCodec,
}

impl PhysicalExtensionCodec for LockstepPhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match decode_stage(buf)? {
            Some(stage) => {
                let input = inputs
                    .first()
                    .cloned()
                    .ok_or_else(|| DataFusionError::Internal("FeatureWindowExec takes one input".into()))?;
                Ok(Arc::new(FeatureWindowExec::try_new(stage, input)?))
            }
            None => self.ballista.try_decode(buf, inputs, ctx, converter),
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        match node.downcast_ref::<FeatureWindowExec>() {
            Some(window) => encode_stage(window.stage(), buf),
            None => self.ballista.try_encode(node, buf, converter),
        }
    }
}

/// Starts the message of a job whose rows came back from the cluster broken (see
/// [`crate::output::ClusterRows`]); such a job is run again.
pub const INCONSISTENT: &str = "the cluster returned inconsistent rows";

/// Attempts a job gets when the cluster returns inconsistent rows.
pub const ATTEMPTS: usize = 3;

/// Whether `error` is (or wraps) an [`INCONSISTENT`] result.
pub fn inconsistent(error: &impl std::fmt::Display) -> bool {
    error.to_string().contains(INCONSISTENT)
}

/// Largest gRPC message a lockstep cluster accepts (a training set's wanted windows travel in
/// the plan: about 8 bytes per label).
pub const GRPC_MESSAGE_LIMIT: usize = 256 << 20;

/// A session configuration every process of a cluster agrees on: lockstep's settings, Ballista's,
/// and lockstep's codecs.
pub fn cluster_config(limits: &SessionLimits) -> SessionConfig {
    crate::plan::session_config(limits)
        .upgrade_for_ballista()
        .with_ballista_logical_extension_codec(Arc::new(LockstepLogicalCodec::default()))
        .with_ballista_physical_extension_codec(Arc::new(LockstepPhysicalCodec::default()))
        // The static planner: one plan for the whole job, planned by lockstep's query planner.
        .with_ballista_adaptive_query_planner(false)
        .with_ballista_grpc_client_max_message_size(GRPC_MESSAGE_LIMIT)
        .with_ballista_job_name("lockstep")
}

/// A client context whose plans run on the Ballista scheduler at `url` (`df://host:port`).
pub async fn remote_context(url: &str, limits: &SessionLimits) -> Result<SessionContext, BatchError> {
    if !url.starts_with("df://") {
        return Err(BatchError::Config(format!("--cluster takes a Ballista scheduler as df://HOST:PORT, not `{url}`")));
    }
    // Reach the scheduler now: a job would otherwise fail only once it runs, with a transport error.
    let address = url.trim_start_matches("df://").trim_end_matches('/');
    let reached =
        tokio::time::timeout(std::time::Duration::from_secs(10), tokio::net::TcpStream::connect(address)).await;
    match reached {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(BatchError::Config(format!(
                "cannot reach the scheduler at {url}: {e}; start one with `lockstep scheduler`"
            )));
        }
        Err(_) => return Err(BatchError::Config(format!("cannot reach the scheduler at {url}: no answer in 10 s"))),
    }
    let runtime = crate::plan::runtime(limits)?;
    let state = SessionStateBuilder::new()
        .with_config(cluster_config(limits))
        .with_runtime_env(runtime)
        .with_default_features()
        .build();
    SessionContext::remote_with_state(url, state)
        .await
        .map_err(|e| BatchError::Config(format!("cannot use the cluster at {url}: {}", e.strip_backtrace())))
}

/// The scheduler's session for each job: the client's configuration with lockstep's query
/// planner, so the scheduler plans `FeatureWindow` as lockstep does in-process.
pub fn scheduler_session(config: SessionConfig) -> Result<SessionState> {
    let config = config
        .with_ballista_logical_extension_codec(Arc::new(LockstepLogicalCodec::default()))
        .with_ballista_physical_extension_codec(Arc::new(LockstepPhysicalCodec::default()));
    Ok(SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_runtime_env(Arc::new(RuntimeEnv::default()))
        .with_optimizer_rules(ballista_core::optimizer::ballista_default_optimizer_rules())
        .with_query_planner(crate::plan::query_planner())
        .with_scalar_functions(ballista_core::extension::ballista_scalar_functions())
        .with_aggregate_functions(ballista_core::extension::ballista_aggregate_functions())
        .with_window_functions(ballista_core::extension::ballista_window_functions())
        .build())
}
