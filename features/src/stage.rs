//! The stage columns of a feature set, read row by row into partial states.
//!
//! Both jobs produce the same stage columns from [`CompiledFeature::stage_exprs`] (the batch job
//! plans them over the history; the streaming job evaluates them over decoded micro-batches with
//! [`StageEvaluator`]) and both fold a row into its pane or session with [`StageBatch::apply`].
//! So the rule "which aggregate sees which value" exists once.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch};
use arrow::datatypes::{
    DataType, Int64Type, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType,
};
use datafusion::common::{DFSchema, DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;

use crate::aggregate::{AggregateSpec, Partial};
use crate::compile::{CompiledFeature, StageLayout};
use crate::value::ArgColumn;
use crate::window::to_millis;

/// One batch of stage columns, ready to be applied row by row.
pub struct StageBatch<'a> {
    times: Int64Array,
    args: Vec<Option<ArgColumn<'a>>>,
    masks: Vec<Option<&'a BooleanArray>>,
}

impl<'a> StageBatch<'a> {
    /// Reads `batch` (columns in `layout` order).
    pub fn new(layout: &StageLayout, batch: &'a RecordBatch) -> Result<Self> {
        let times = millis_of(batch.column(layout.time))?;
        let args = layout
            .args
            .iter()
            .map(|i| {
                i.map(|i| {
                    ArgColumn::new(batch.column(i)).ok_or_else(|| {
                        DataFusionError::Execution(format!(
                            "aggregate argument of unexpected type {}",
                            batch.column(i).data_type()
                        ))
                    })
                })
                .transpose()
            })
            .collect::<Result<_>>()?;
        let masks = layout.masks.iter().map(|i| i.map(|i| batch.column(i).as_boolean())).collect();
        Ok(StageBatch { times, args, masks })
    }

    /// The event time of `row` in milliseconds; `None` when it is null.
    pub fn time(&self, row: usize) -> Option<i64> {
        (!self.times.is_null(row)).then(|| self.times.value(row))
    }

    /// Folds `row` (at event time `time`) into `states`, one per aggregate, honouring each
    /// aggregate's `FILTER`.
    pub fn apply(&self, specs: &[AggregateSpec], states: &mut [Partial], row: usize, time: i64) {
        for (i, state) in states.iter_mut().enumerate() {
            if self.masks[i].is_some_and(|m| !m.value(row)) {
                continue;
            }
            state.update(specs[i].function, self.args[i].as_ref(), row, time);
        }
    }
}

/// The event-time column in milliseconds (timestamps of any unit are floored to milliseconds).
pub fn millis_of(column: &ArrayRef) -> Result<Int64Array> {
    let out: Int64Array = match column.data_type() {
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            column.as_primitive::<TimestampMillisecondType>().reinterpret_cast::<Int64Type>()
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            column.as_primitive::<TimestampMicrosecondType>().unary(|v| to_millis(v, TimeUnit::Microsecond))
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            column.as_primitive::<TimestampNanosecondType>().unary(|v| to_millis(v, TimeUnit::Nanosecond))
        }
        DataType::Timestamp(TimeUnit::Second, _) => {
            column.as_primitive::<TimestampSecondType>().unary(|v| to_millis(v, TimeUnit::Second))
        }
        DataType::Int64 => column.as_primitive::<Int64Type>().clone(),
        other => {
            return Err(DataFusionError::Execution(format!("the event time column has type {other}, not a timestamp")));
        }
    };
    Ok(out)
}

/// Evaluates a feature set's filter and stage expressions over batches of source rows, outside
/// a DataFusion plan (the streaming job's micro-batches).
pub struct StageEvaluator {
    filter: Option<Arc<dyn PhysicalExpr>>,
    exprs: Vec<Arc<dyn PhysicalExpr>>,
    schema: arrow::datatypes::SchemaRef,
}

impl StageEvaluator {
    /// Plans the expressions against the source's declared schema.
    pub fn new(feature: &CompiledFeature) -> Result<Self> {
        let ctx = SessionContext::new();
        let df_schema = DFSchema::try_from(feature.source_schema.as_ref().clone())?;
        let filter = feature.filter.as_ref().map(|f| ctx.create_physical_expr(f.clone(), &df_schema)).transpose()?;
        let exprs = feature
            .stage_exprs()
            .into_iter()
            .map(|e| ctx.create_physical_expr(e, &df_schema))
            .collect::<Result<Vec<_>>>()?;
        let fields: Vec<arrow::datatypes::Field> = feature
            .stage_exprs()
            .iter()
            .zip(&exprs)
            .map(|(logical, physical)| {
                let name = logical.schema_name().to_string();
                let data_type = physical.data_type(feature.source_schema.as_ref())?;
                Ok(arrow::datatypes::Field::new(name, data_type, true))
            })
            .collect::<Result<_>>()?;
        Ok(StageEvaluator { filter, exprs, schema: Arc::new(arrow::datatypes::Schema::new(fields)) })
    }

    /// The stage columns of `batch` (source schema) and, per row, whether it passes the
    /// feature's filter (a null filter result does not pass).
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<(RecordBatch, BooleanArray)> {
        let rows = batch.num_rows();
        let passes = match &self.filter {
            None => BooleanArray::from(vec![true; rows]),
            Some(filter) => {
                let value = filter.evaluate(batch)?.into_array(rows)?;
                let value = value.as_boolean();
                value.iter().map(|v| Some(v == Some(true))).collect()
            }
        };
        let columns = self
            .exprs
            .iter()
            .map(|e| e.evaluate(batch).and_then(|v| v.into_array(rows)))
            .collect::<Result<Vec<_>>>()?;
        let stage = RecordBatch::try_new(self.schema.clone(), columns)?;
        Ok((stage, passes))
    }
}
