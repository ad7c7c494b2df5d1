//! Compiles a feature set's filter, aggregate arguments and `FILTER (WHERE ...)` clauses to
//! DataFusion expressions against the source schema.
//!
//! The result, [`CompiledFeature`], is what both jobs run: the batch job plans its
//! [`CompiledFeature::stage_exprs`] over the history, the streaming job evaluates the same
//! expressions over decoded micro-batches, and both feed the result to the window stage in the
//! layout [`StageLayout`] describes. Every expression is type-checked here, so a bad definition
//! fails before any job starts, with the file, line and column of the offending text.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{DFSchema, DataFusionError, SchemaError};
use datafusion::logical_expr::{Expr, ExprSchemable, cast, col};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{self, DuplicateTreatment, FunctionArg, FunctionArgExpr, FunctionArguments};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser as SqlParser;

use crate::aggregate::{AggregateSpec, Function};
use crate::definitions::{DefinitionError, DefinitionErrors, Definitions, FeatureSet, Position, Source, closest};
use crate::value::{ValueType, timestamp_type};
use crate::window::Window;

/// Name of the event-time column the window stage reads.
pub const TIME_COLUMN: &str = "__lockstep_event_time";

/// One aggregation, compiled.
#[derive(Debug, Clone)]
pub struct CompiledAggregate {
    pub spec: AggregateSpec,
    /// The argument (of the aggregate's input type, up to a cast); `None` for `count(*)`.
    pub arg: Option<Expr>,
    /// The `FILTER (WHERE ...)` predicate; `None` when there is none.
    pub filter: Option<Expr>,
    /// The SQL as written, for plans and messages.
    pub sql: String,
}

/// A feature set ready to run: typed, checked expressions over its source.
#[derive(Debug, Clone)]
pub struct CompiledFeature {
    pub feature: FeatureSet,
    pub source: Source,
    /// The source's declared schema as Arrow (timestamps in milliseconds, UTC; all nullable).
    pub source_schema: SchemaRef,
    pub key_types: Vec<ValueType>,
    /// The feature's filter (rows where it is not true are dropped).
    pub filter: Option<Expr>,
    pub aggregates: Vec<CompiledAggregate>,
}

/// Where the window stage finds its inputs among the stage columns.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StageLayout {
    /// Key columns are `0..keys`.
    pub keys: usize,
    /// The event time column (any timestamp unit, or int64 milliseconds).
    pub time: usize,
    /// Per aggregate, its argument column.
    pub args: Vec<Option<usize>>,
    /// Per aggregate, its boolean `FILTER` column (never null).
    pub masks: Vec<Option<usize>>,
}

impl CompiledFeature {
    /// The window definition.
    pub fn window(&self) -> Window {
        self.feature.window
    }

    /// The aggregate specs, in declared order.
    pub fn specs(&self) -> Vec<AggregateSpec> {
        self.aggregates.iter().map(|a| a.spec.clone()).collect()
    }

    /// The expressions the window stage reads, in [`StageLayout`] order: keys, event time,
    /// then the aggregates' arguments and `FILTER` masks. An argument or mask several aggregates
    /// share (`sum(amount)`, `max(amount)`) is one column, so the sort before the window stage
    /// carries it once.
    pub fn stage_exprs(&self) -> Vec<Expr> {
        self.stage_columns().0
    }

    /// Where each input sits among [`CompiledFeature::stage_exprs`].
    pub fn layout(&self) -> StageLayout {
        self.stage_columns().1
    }

    /// [`CompiledFeature::stage_exprs`] and [`CompiledFeature::layout`], built together so they
    /// cannot disagree.
    fn stage_columns(&self) -> (Vec<Expr>, StageLayout) {
        let mut exprs: Vec<Expr> = self
            .feature
            .key
            .iter()
            .zip(&self.key_types)
            .map(|(key, t)| cast(col(quoted(key)), t.arrow_type()).alias(key))
            .collect();
        let keys = exprs.len();
        exprs.push(col(quoted(&self.source.event_time)).alias(TIME_COLUMN));
        // Each distinct argument or mask expression with the column it was given.
        let mut columns: Vec<(Expr, usize)> = Vec::new();
        let mut column_of = |expr: Expr, name: String, exprs: &mut Vec<Expr>| -> usize {
            if let Some((_, i)) = columns.iter().find(|(e, _)| *e == expr) {
                return *i;
            }
            exprs.push(expr.clone().alias(name));
            columns.push((expr, exprs.len() - 1));
            exprs.len() - 1
        };
        let (mut args, mut masks) = (Vec::new(), Vec::new());
        for (i, aggregate) in self.aggregates.iter().enumerate() {
            args.push(match (&aggregate.arg, aggregate.spec.input) {
                // Cast even when the declared type matches: histories may store a compatible
                // physical type (e.g. Utf8View, Int32, timestamps in nanoseconds).
                (Some(arg), Some(input)) => {
                    Some(column_of(cast(arg.clone(), input.arrow_type()), format!("__lockstep_arg_{i}"), &mut exprs))
                }
                _ => None,
            });
            masks.push(aggregate.filter.as_ref().map(|filter| {
                column_of(Expr::IsTrue(Box::new(filter.clone())), format!("__lockstep_when_{i}"), &mut exprs)
            }));
        }
        (exprs, StageLayout { keys, time: keys, args, masks })
    }

    /// The output schema of SPEC §2: keys, `window_start`, `window_end`, then the aggregations.
    pub fn output_schema(&self) -> SchemaRef {
        let keys: Vec<(String, ValueType)> =
            self.feature.key.iter().cloned().zip(self.key_types.iter().copied()).collect();
        output_schema(&keys, &self.specs())
    }
}

/// The output schema of SPEC §2 for these keys (name and type) and aggregates.
pub fn output_schema(keys: &[(String, ValueType)], specs: &[AggregateSpec]) -> SchemaRef {
    let mut fields: Vec<Field> = keys.iter().map(|(k, t)| Field::new(k, t.arrow_type(), true)).collect();
    fields.push(Field::new("window_start", timestamp_type(), false));
    fields.push(Field::new("window_end", timestamp_type(), false));
    for spec in specs {
        let nullable = !matches!(spec.function, Function::CountStar | Function::Count | Function::CountDistinct);
        fields.push(Field::new(&spec.name, spec.output.arrow_type(), nullable));
    }
    Arc::new(Schema::new(fields))
}

/// A column name as a SQL identifier, quoted so that case and odd characters survive
/// DataFusion's normalization.
pub fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The Arrow schema of a source as declared.
pub fn source_schema(source: &Source) -> SchemaRef {
    Arc::new(Schema::new(
        source.schema.iter().map(|(name, t)| Field::new(name, t.arrow_type(), true)).collect::<Vec<_>>(),
    ))
}

/// Compiles every feature set of a file; all errors of all feature sets are reported together.
pub fn compile_all(definitions: &Definitions) -> Result<Vec<CompiledFeature>, DefinitionErrors> {
    let mut compiled = Vec::new();
    let mut errors = Vec::new();
    for feature in &definitions.features {
        match compile_feature(definitions, feature) {
            Ok(c) => compiled.push(c),
            Err(DefinitionErrors(mut e)) => errors.append(&mut e),
        }
    }
    if errors.is_empty() { Ok(compiled) } else { Err(DefinitionErrors(errors)) }
}

/// Compiles one feature set.
pub fn compile_feature(definitions: &Definitions, feature: &FeatureSet) -> Result<CompiledFeature, DefinitionErrors> {
    let source = definitions.source_of(feature).clone();
    let schema = source_schema(&source);
    let compiler = Compiler {
        file: definitions.file.clone(),
        source: &source,
        df_schema: DFSchema::try_from(schema.as_ref().clone()).map_err(|e| {
            DefinitionErrors(vec![DefinitionError {
                file: definitions.file.clone(),
                position: feature.position,
                message: format!("bad schema: {e}"),
                help: None,
            }])
        })?,
        ctx: SessionContext::new(),
    };
    let mut errors = Vec::new();
    let filter = feature
        .filter
        .as_deref()
        .and_then(|sql| compiler.boolean(sql, feature.filter_position, "the filter").map_err(|e| errors.push(e)).ok());
    let mut aggregates = Vec::new();
    for aggregation in &feature.aggregations {
        match compiler.aggregate(&aggregation.name, &aggregation.sql, aggregation.position) {
            Ok(a) => aggregates.push(a),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(DefinitionErrors(errors));
    }
    let key_types = feature.key.iter().map(|k| source.column_type(k).unwrap_or(ValueType::String)).collect();
    Ok(CompiledFeature {
        feature: feature.clone(),
        source: source.clone(),
        source_schema: schema,
        key_types,
        filter,
        aggregates,
    })
}

struct Compiler<'a> {
    file: String,
    source: &'a Source,
    df_schema: DFSchema,
    ctx: SessionContext,
}

impl Compiler<'_> {
    fn error(&self, position: Position, message: String, help: Option<String>) -> DefinitionError {
        DefinitionError { file: self.file.clone(), position, message, help }
    }

    fn columns_help(&self) -> String {
        let columns: Vec<String> = self.source.schema.iter().map(|(c, t)| format!("{c}: {}", t.name())).collect();
        format!("source `{}` has columns {}", self.source.name, columns.join(", "))
    }

    /// Parses and type-checks a scalar SQL expression; returns it with its lockstep type.
    fn expression(&self, sql: &str, position: Position, what: &str) -> Result<(Expr, DataType), DefinitionError> {
        let expr =
            self.ctx.parse_sql_expr(sql, &self.df_schema).map_err(|e| self.datafusion_error(e, sql, position, what))?;
        let physical = self
            .ctx
            .create_physical_expr(expr.clone(), &self.df_schema)
            .map_err(|e| self.datafusion_error(e, sql, position, what))?;
        let data_type =
            physical.data_type(self.df_schema.as_arrow()).map_err(|e| self.datafusion_error(e, sql, position, what))?;
        let _ = expr.get_type(&self.df_schema).map_err(|e| self.datafusion_error(e, sql, position, what))?;
        Ok((expr, data_type))
    }

    fn boolean(&self, sql: &str, position: Position, what: &str) -> Result<Expr, DefinitionError> {
        let (expr, data_type) = self.expression(sql, position, what)?;
        if data_type != DataType::Boolean && data_type != DataType::Null {
            return Err(self.error(
                position,
                format!("{what} `{sql}` is of type {}, not a true/false condition", describe(&data_type)),
                Some("write a comparison such as `amount > 0`".into()),
            ));
        }
        Ok(expr)
    }

    fn datafusion_error(&self, error: DataFusionError, sql: &str, position: Position, what: &str) -> DefinitionError {
        if let DataFusionError::SchemaError(schema_error, _) = error.find_root()
            && let SchemaError::FieldNotFound { field, .. } = schema_error.as_ref()
        {
            let names: Vec<&str> = self.source.schema.iter().map(|(c, _)| c.as_str()).collect();
            let help = match closest(&field.name, names.iter().copied()) {
                Some(near) => format!("did you mean `{near}`? {}", self.columns_help()),
                None => self.columns_help(),
            };
            return self.error(position, format!("unknown column `{}` in {what} `{sql}`", field.name), Some(help));
        }
        let message = error.find_root().message().to_string();
        let first_line = message.lines().next().unwrap_or_default().to_string();
        self.error(position, format!("{what} `{sql}` is not valid: {first_line}"), Some(self.columns_help()))
    }

    fn aggregate(&self, name: &str, sql: &str, position: Position) -> Result<CompiledAggregate, DefinitionError> {
        let what = format!("aggregation `{name}`");
        let call = parse_call(sql).map_err(|message| {
            self.error(
                position,
                format!("{what} `{sql}`: {message}"),
                Some(format!("write an aggregate call: {}, optionally with FILTER (WHERE ...)", Function::NAMES)),
            )
        })?;
        let function_name = call.name.to_lowercase();
        let Some(mut function) = Function::by_name(&function_name) else {
            let known = ["count", "sum", "avg", "min", "max", "first", "last", "stddev", "var"];
            let help = match closest(&function_name, known.into_iter()) {
                Some(near) => format!("did you mean `{near}`? lockstep aggregates: {}", Function::NAMES),
                None => format!("lockstep aggregates: {}", Function::NAMES),
            };
            return Err(self.error(
                position,
                format!("unknown aggregate function `{}` in {what}", call.name),
                Some(help),
            ));
        };
        match (function, call.star, call.distinct) {
            (Function::Count, true, false) => function = Function::CountStar,
            (Function::Count, false, true) => function = Function::CountDistinct,
            (Function::Count, true, true) => {
                return Err(self.error(
                    position,
                    format!("{what}: count(distinct *) is not an aggregate"),
                    Some("write count(distinct column)".into()),
                ));
            }
            (_, true, _) => {
                return Err(self.error(
                    position,
                    format!("{what}: only count takes `*`"),
                    Some(format!("write {function_name}(column)")),
                ));
            }
            (_, _, true) => {
                return Err(self.error(
                    position,
                    format!("{what}: only count takes DISTINCT"),
                    Some(format!("write {function_name}(column), or count(distinct column)")),
                ));
            }
            _ => {}
        }
        let (arg, input) = match &call.arg {
            None if function == Function::CountStar => (None, None),
            None => {
                return Err(self.error(
                    position,
                    format!("{what}: {function_name} needs one argument"),
                    Some(format!("write {function_name}(column)")),
                ));
            }
            Some(arg_sql) => {
                let (expr, data_type) = self.expression(arg_sql, position, &format!("the argument of {what}"))?;
                let Some(value_type) = ValueType::of_arrow(&data_type) else {
                    return Err(self.error(
                        position,
                        format!(
                            "the argument of {what} `{arg_sql}` has type {}, which lockstep does not aggregate",
                            describe(&data_type)
                        ),
                        Some("cast it to one of string, int64, float64, bool or timestamp".into()),
                    ));
                };
                (Some(expr), Some(value_type))
            }
        };
        let output = function.output_type(input).map_err(|message| {
            self.error(
                position,
                format!("type mismatch in {what} `{sql}`: {message}"),
                Some("aggregate a numeric column, or CAST the argument".into()),
            )
        })?;
        let filter = match &call.filter {
            Some(filter_sql) => Some(self.boolean(filter_sql, position, &format!("the FILTER of {what}"))?),
            None => None,
        };
        Ok(CompiledAggregate {
            spec: AggregateSpec { name: name.to_string(), function, input, output },
            arg,
            filter,
            sql: sql.to_string(),
        })
    }
}

fn describe(data_type: &DataType) -> String {
    ValueType::of_arrow(data_type).map_or_else(|| data_type.to_string(), |t| t.name().to_string())
}

/// An aggregate call taken apart: `name([DISTINCT] arg | *) [FILTER (WHERE filter)]`.
#[derive(Debug, PartialEq, Eq)]
struct Call {
    name: String,
    star: bool,
    distinct: bool,
    arg: Option<String>,
    filter: Option<String>,
}

fn parse_call(sql: &str) -> Result<Call, String> {
    let dialect = GenericDialect {};
    let mut parser = SqlParser::new(&dialect).try_with_sql(sql).map_err(|e| format!("cannot parse: {e}"))?;
    let expr = parser.parse_expr().map_err(|e| format!("cannot parse: {e}"))?;
    if parser.peek_token().token != datafusion::sql::sqlparser::tokenizer::Token::EOF {
        return Err(format!("unexpected text after the aggregate call: `{}`", parser.peek_token().token));
    }
    let ast::Expr::Function(function) = expr else {
        return Err("not an aggregate call".into());
    };
    if function.over.is_some() || !function.within_group.is_empty() || function.null_treatment.is_some() {
        return Err("OVER, WITHIN GROUP and IGNORE/RESPECT NULLS are not supported; lockstep's window is the feature set's `window`".into());
    }
    let name = function.name.to_string();
    let (distinct, args) = match &function.args {
        FunctionArguments::List(list) => {
            if !list.clauses.is_empty() {
                return Err("ORDER BY and other clauses inside the call are not supported".into());
            }
            (matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct)), list.args.as_slice())
        }
        FunctionArguments::None => (false, &[][..]),
        FunctionArguments::Subquery(_) => return Err("subqueries are not supported".into()),
    };
    if args.len() > 1 {
        return Err(format!("{name} takes one argument, found {}", args.len()));
    }
    let (star, arg) = match args.first() {
        None => (false, None),
        Some(FunctionArg::Unnamed(FunctionArgExpr::Wildcard)) => (true, None),
        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(e))) => (false, Some(e.to_string())),
        Some(other) => return Err(format!("unsupported argument `{other}`")),
    };
    Ok(Call { name, star, distinct, arg, filter: function.filter.as_ref().map(|f| f.to_string()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Aggregates over the same argument, or with the same `FILTER`, read one stage column; each
    /// distinct expression has a column of its own, and the layout points every aggregate at it.
    #[test]
    fn shared_arguments_and_filters_are_one_stage_column() {
        let yaml = r#"
sources:
  tx:
    schema: { user_id: string, amount: float64, event_type: string, event_time: timestamp }
    event_time: event_time
features:
  f:
    source: tx
    key: [user_id]
    window: { tumbling: 1h }
    aggregations:
      total: sum(amount)
      biggest: max(amount)
      refunds: count(*) FILTER (WHERE event_type = 'refund')
      refund_total: sum(amount) FILTER (WHERE event_type = 'refund')
      doubled: sum(amount * 2)
      n: count(*)
"#;
        let definitions = Definitions::parse("f.yaml", yaml, std::path::Path::new(".")).unwrap();
        let feature = compile_feature(&definitions, definitions.feature("f").unwrap()).unwrap();
        let layout = feature.layout();
        // user_id, event time, amount, the refund mask, amount * 2.
        assert_eq!(feature.stage_exprs().len(), 5);
        assert_eq!(layout.args, [Some(2), Some(2), None, Some(2), Some(4), None]);
        assert_eq!(layout.masks, [None, None, Some(3), Some(3), None, None]);
        assert_eq!((layout.keys, layout.time), (1, 1));
    }

    #[test]
    fn takes_calls_apart() {
        let call = parse_call("count(*) FILTER (WHERE event_type = 'purchase')").unwrap();
        assert_eq!(
            call,
            Call {
                name: "count".into(),
                star: true,
                distinct: false,
                arg: None,
                filter: Some("event_type = 'purchase'".into())
            }
        );
        let call = parse_call("COUNT(DISTINCT merchant_id)").unwrap();
        assert!(call.distinct && call.arg.as_deref() == Some("merchant_id"));
        assert!(parse_call("sum(amount) + 1").unwrap_err().contains("not an aggregate call"));
        assert!(parse_call("sum(amount) extra").unwrap_err().contains("unexpected text"));
        assert!(parse_call("amount").unwrap_err().contains("not an aggregate call"));
        assert!(parse_call("sum(a, b)").unwrap_err().contains("one argument"));
    }
}
