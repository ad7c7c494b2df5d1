//! The replay source: a Parquet or Delta history fed through the streaming engine in
//! `arrival_time` order, as one partition, without a broker (SPEC §4).
//!
//! Ties in `arrival_time` keep file order; without an `arrival_time` column the history is
//! replayed in file order. Rows with a null `arrival_time` come last. The end of the history
//! is the end of input: every open window fires.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{Expr, cast, col};
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use lockstep_batch::{SessionLimits, plan::session_state, source::read_history};
use lockstep_features::compile::quoted;
use lockstep_features::{CompiledFeature, Location, StageEvaluator};

use crate::collect::{FinalWindows, late_rows, late_schema};
use crate::engine::{Engine, EngineCounters};
use crate::error::StreamError;

const ORDER_COLUMN: &str = "__lockstep_file_order";

/// What a replay produced.
pub struct ReplayOutput {
    /// The final value of every window fired, unordered (empty unless the windows were kept).
    pub windows: Vec<RecordBatch>,
    pub window_schema: SchemaRef,
    /// Too-late events (source columns plus the late columns).
    pub late: Vec<RecordBatch>,
    pub late_schema: SchemaRef,
    pub counters: EngineCounters,
    pub elapsed: Duration,
}

/// Replays `history` through the engine of `feature`. `progress` counts events read. With
/// `keep_windows`, the final windows are returned; otherwise only counted.
pub async fn replay(
    feature: &CompiledFeature,
    history: &Location,
    limits: &SessionLimits,
    keep_windows: bool,
    progress: Arc<AtomicU64>,
) -> Result<ReplayOutput, StreamError> {
    let started = Instant::now();
    let limits = SessionLimits { partitions: 1, ..limits.clone() };
    let ctx = SessionContext::new_with_state(session_state(&limits)?);
    let frame = read_history(&ctx, &feature.source, history).await?;
    let mut columns: Vec<Expr> = feature
        .source_schema
        .fields()
        .iter()
        .map(|f| cast(col(quoted(f.name())), f.data_type().clone()).alias(f.name()))
        .collect();
    columns.push(row_number().alias(ORDER_COLUMN));
    let mut frame = frame.select(columns)?;
    let mut order = Vec::new();
    if let Some(arrival) = &feature.source.arrival_time {
        order.push(col(quoted(arrival)).sort(true, false));
    }
    order.push(col(ORDER_COLUMN).sort(true, false));
    frame = frame.sort(order)?;
    let source_columns: Vec<usize> = (0..feature.source_schema.fields().len()).collect();

    let evaluator = StageEvaluator::new(feature)?;
    let mut engine = Engine::new(feature, false)?;
    let window_schema = engine.output_schema().clone();
    let late_schema = late_schema(&feature.source_schema);
    let mut windows = FinalWindows::new(window_schema.clone(), feature.key_types.len(), keep_windows);
    let mut late = Vec::new();
    let mut seq = 0u64;
    let mut stream = frame.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        let batch = batch?.project(&source_columns)?;
        let source = RecordBatch::try_new(feature.source_schema.clone(), batch.columns().to_vec())?;
        let (stage, passes) = evaluator.evaluate(&source)?;
        let seqs: Vec<u64> = (seq..seq + source.num_rows() as u64).collect();
        seq += source.num_rows() as u64;
        let effects = engine.process(&stage, &passes, &seqs)?;
        windows.add(&effects);
        late.extend(late_rows(&late_schema, &source, &effects)?);
        progress.fetch_add(source.num_rows() as u64, Ordering::Relaxed);
    }
    let effects = engine.finish(seq)?;
    windows.add(&effects);
    Ok(ReplayOutput {
        windows: windows.finish()?,
        window_schema,
        late,
        late_schema,
        counters: engine.counters(),
        elapsed: started.elapsed(),
    })
}
