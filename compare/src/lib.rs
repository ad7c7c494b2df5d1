//! Compare: matches two feature outputs on key and window, reports rows only on one side and
//! differing values, and labels each difference explained by a too-late event or not (SPEC §8).
//!
//! The two sides are joined by DataFusion (a full outer sort-merge join on the key columns and
//! `window_start`, null keys matching null keys), so neither side has to fit in memory: sorts
//! spill to disk beyond the memory limit. Each joined batch is then checked column by column
//! with Arrow's `IS DISTINCT FROM` kernel, which compares floats by their bits: NaN equals NaN,
//! `0.0` differs from `-0.0`, and null equals null but differs from any value.

pub mod kafka;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::compute::kernels::cmp::distinct;
use arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::row::{RowConverter, SortField};
use arrow::util::display::array_value_to_string;
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{JoinType, col};
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use lockstep_batch::{BatchError, SessionLimits};
use lockstep_features::Location;
use lockstep_stream::topic::TopicUrl;
use serde::Serialize;

/// Why a comparison could not run.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("{0}")]
    Schema(String),
    #[error("{location}: {message}")]
    Input { location: String, message: String },
}

impl From<datafusion::error::DataFusionError> for CompareError {
    fn from(error: datafusion::error::DataFusionError) -> Self {
        CompareError::Batch(BatchError::from(error))
    }
}

impl From<arrow::error::ArrowError> for CompareError {
    fn from(error: arrow::error::ArrowError) -> Self {
        CompareError::Batch(BatchError::Execution(error.to_string()))
    }
}

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A Parquet file or folder, or a Delta table.
    Table(Location),
    /// A topic of window records (`kafka://host:port/topic`), read with read_committed; the last
    /// record per key wins and a tombstone deletes.
    Kafka { brokers: String, topic: String },
}

impl Input {
    /// Reads `kafka://host:port/topic`, or a path or URL of a table (Delta when it holds a
    /// `_delta_log`, Parquet otherwise).
    pub fn parse(text: &str) -> Result<Input, CompareError> {
        let topic = TopicUrl::parse(text).map_err(|message| CompareError::Input { location: text.into(), message })?;
        if let Some(TopicUrl { brokers, topic }) = topic {
            return Ok(Input::Kafka { brokers, topic });
        }
        Ok(Input::Table(lockstep_batch::source::locate(text, None)))
    }

    pub fn describe(&self) -> String {
        match self {
            Input::Table(location) => location.url().to_string(),
            Input::Kafka { brokers, topic } => format!("kafka://{brokers}/{topic}"),
        }
    }
}

/// How to compare.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Key columns (default: the columns before `window_start`).
    pub keys: Option<Vec<String>>,
    /// Too-late events (the stream's `--late-out` table, or its `.late` topic as
    /// `kafka://host:port/topic`) that explain differences.
    pub late: Option<String>,
    /// Float values within this distance, absolute or relative, count as equal.
    pub tolerance: Option<f64>,
    /// Examples kept per column and per kind of missing row.
    pub examples: usize,
    pub limits: SessionLimits,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions { keys: None, late: None, tolerance: None, examples: 5, limits: SessionLimits::default() }
    }
}

/// One differing or missing row, for the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Example {
    pub key: Vec<String>,
    pub window_start: String,
    pub left: Option<String>,
    pub right: Option<String>,
    pub explained: bool,
}

/// Rows present on one side only.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Missing {
    pub rows: u64,
    pub explained: u64,
    pub examples: Vec<Example>,
}

/// Differences in one column among rows present on both sides.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ColumnDiff {
    pub column: String,
    pub rows: u64,
    pub explained: u64,
    /// Largest |left − right| among numeric differences with finite values.
    pub max_abs: Option<f64>,
    /// Largest |left − right| / max(|left|, |right|) among them.
    pub max_rel: Option<f64>,
    pub examples: Vec<Example>,
}

/// The result of a comparison.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Report {
    pub left: String,
    pub right: String,
    pub keys: Vec<String>,
    pub tolerance: Option<f64>,
    pub rows_left: u64,
    pub rows_right: u64,
    /// Rows on both sides (same key and `window_start`).
    pub matched: u64,
    /// Matched rows with at least one differing column.
    pub changed_rows: u64,
    pub changed_explained: u64,
    pub only_left: Missing,
    pub only_right: Missing,
    pub columns: Vec<ColumnDiff>,
    /// Join matches beyond one per row of the right side: the left holds some (key,
    /// `window_start`) more than once. Never explained.
    pub repeated_left: u64,
    /// The same for rows of the left side: the right repeats a (key, `window_start`).
    pub repeated_right: u64,
    /// Rows of the too-late table read (`--late`): one per event and window it missed.
    pub late_events: Option<u64>,
    /// Differing rows (changed or on one side only) explained by a too-late event, and not.
    pub explained: u64,
    pub unexplained: u64,
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Report {
    /// True when the two sides hold the same rows with the same values.
    pub fn identical(&self) -> bool {
        self.explained + self.unexplained == 0
    }

    /// The human summary.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "left  {}: {} rows", self.left, self.rows_left);
        let _ = writeln!(out, "right {}: {} rows", self.right, self.rows_right);
        let _ = writeln!(
            out,
            "matched on ({}, window_start): {} rows, {} identical{}",
            self.keys.join(", "),
            self.matched,
            self.matched - self.changed_rows,
            self.tolerance.map_or_else(|| " bit for bit".to_string(), |t| format!(" within {t}")),
        );
        let label = |explained: u64, total: u64| {
            if self.late_events.is_some() {
                format!(" ({explained} explained by late events)")
            } else {
                let _ = total;
                String::new()
            }
        };
        let _ = writeln!(
            out,
            "only left:  {}{}",
            self.only_left.rows,
            label(self.only_left.explained, self.only_left.rows)
        );
        let _ = writeln!(
            out,
            "only right: {}{}",
            self.only_right.rows,
            label(self.only_right.explained, self.only_right.rows)
        );
        let _ = writeln!(out, "changed:    {}{}", self.changed_rows, label(self.changed_explained, self.changed_rows));
        for (side, repeated) in [("left", self.repeated_left), ("right", self.repeated_right)] {
            if repeated > 0 {
                let _ = writeln!(
                    out,
                    "repeated:   the {side} holds some (key, window_start) more than once ({repeated} extra matches)"
                );
            }
        }
        for column in self.columns.iter().filter(|c| c.rows > 0) {
            let _ = write!(out, "  {:<20} {:>9} rows differ", column.column, column.rows);
            if let Some(abs) = column.max_abs {
                let _ = write!(out, ", largest difference {abs:.6e}");
            }
            if let Some(rel) = column.max_rel {
                let _ = write!(out, " (relative {rel:.3e})");
            }
            let _ = writeln!(out);
        }
        let examples = self
            .only_left
            .examples
            .iter()
            .map(|e| ("only left", "", e))
            .chain(self.only_right.examples.iter().map(|e| ("only right", "", e)))
            .chain(self.columns.iter().flat_map(|c| c.examples.iter().map(move |e| ("changed", c.column.as_str(), e))));
        let mut shown = 0;
        for (kind, column, example) in examples {
            if shown == 0 {
                let _ = writeln!(out, "examples:");
            }
            shown += 1;
            if shown > 10 {
                break;
            }
            let mark = if self.late_events.is_none() {
                ""
            } else if example.explained {
                "  [explained]"
            } else {
                "  [UNEXPLAINED]"
            };
            let values = match (&example.left, &example.right) {
                (Some(l), Some(r)) => format!("{column}: {l} vs {r}"),
                (Some(l), None) => format!("left {l}"),
                (None, Some(r)) => format!("right {r}"),
                (None, None) => String::new(),
            };
            let _ =
                writeln!(out, "  {kind:<10} ({}) @ {}  {values}{mark}", example.key.join(", "), example.window_start);
        }
        match self.late_events {
            Some(late) => {
                let _ = writeln!(
                    out,
                    "differences: {} explained by too-late events ({late} late rows read), {} unexplained",
                    self.explained, self.unexplained
                );
            }
            None => {
                let _ = writeln!(out, "differences: {} (no --late given: none explained)", self.unexplained);
            }
        }
        out
    }
}

/// Compares two feature outputs; see the crate documentation.
pub async fn compare(left: &Input, right: &Input, options: &CompareOptions) -> Result<Report, CompareError> {
    let started = Instant::now();
    let mut state_limits = options.limits.clone();
    state_limits.partitions = state_limits.partitions.max(1);
    let state = lockstep_batch::plan::session_state(&state_limits)?;
    let ctx = SessionContext::new_with_state(state);
    ctx.state_ref().write().config_mut().options_mut().optimizer.prefer_hash_join = false;
    // Read the tables first: a Kafka side takes the other side's schema.
    let left_table = match left {
        Input::Table(location) => Some(lockstep_batch::source::read_table(&ctx, location, None).await?.frame),
        Input::Kafka { .. } => None,
    };
    let right_table = match right {
        Input::Table(location) => Some(lockstep_batch::source::read_table(&ctx, location, None).await?.frame),
        Input::Kafka { .. } => None,
    };
    let schema_of = |frame: &Option<DataFrame>| frame.as_ref().map(|f| Arc::new(f.schema().as_arrow().clone()));
    let (left_schema, right_schema) = (schema_of(&left_table), schema_of(&right_table));
    let left_frame = match left_table {
        Some(frame) => frame,
        None => kafka::read_windows(&ctx, left, right_schema.clone(), options.keys.as_deref()).await?,
    };
    let right_frame = match right_table {
        Some(frame) => frame,
        None => kafka::read_windows(&ctx, right, left_schema.clone(), options.keys.as_deref()).await?,
    };
    let left_schema: SchemaRef = Arc::new(left_frame.schema().as_arrow().clone());
    let right_schema: SchemaRef = Arc::new(right_frame.schema().as_arrow().clone());
    let keys = key_columns(&left_schema, options.keys.as_deref())?;
    let columns = check_schemas(&left.describe(), &left_schema, &right.describe(), &right_schema, &keys)?;
    let late = match &options.late {
        Some(url) => Some(LateEvents::read(&ctx, url, &keys, &left_schema).await?),
        None => None,
    };

    // Project both sides to the shared column order, positionally renamed `l0..`/`r0..` so that
    // any column name survives, then join.
    // Timestamps are compared in milliseconds (Delta stores microseconds).
    let side = |frame: DataFrame, prefix: &str| -> Result<DataFrame, CompareError> {
        let schema = frame.schema().clone();
        let exprs: Vec<_> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let column = col(lockstep_features::compile::quoted(c));
                let column = match schema.field_with_unqualified_name(c).map(|f| f.data_type().clone()) {
                    Ok(DataType::Timestamp(_, _)) => {
                        datafusion::logical_expr::cast(column, lockstep_features::value::timestamp_type())
                    }
                    _ => column,
                };
                column.alias(format!("{prefix}{i}"))
            })
            .collect();
        Ok(frame.select(exprs)?)
    };
    let (lf, rf) = (side(left_frame, "l")?, side(right_frame, "r")?);
    let on: Vec<_> = (0..=keys.len())
        .map(|i| {
            datafusion::logical_expr::binary_expr(
                col(format!("l{i}")),
                datafusion::logical_expr::Operator::IsNotDistinctFrom,
                col(format!("r{i}")),
            )
        })
        .collect();
    // Rows per side, counted apart from the join: a side holding a (key, window_start) twice
    // makes the join match rows of the other side more than once, which the counts reveal.
    let (rows_left, rows_right) = (lf.clone().count().await? as u64, rf.clone().count().await? as u64);
    let joined = lf.join_on(rf, JoinType::Full, on)?;

    let mut acc = Accumulator::new(&columns, keys.len(), options, late);
    let mut stream = joined.execute_stream().await?;
    while let Some(batch) = stream.try_next().await? {
        acc.add(&batch)?;
    }
    let mut report = acc.finish();
    report.repeated_left = (report.matched + report.only_right.rows).saturating_sub(rows_right);
    report.repeated_right = (report.matched + report.only_left.rows).saturating_sub(rows_left);
    report.unexplained += report.repeated_left + report.repeated_right;
    report.rows_left = rows_left;
    report.rows_right = rows_right;
    report.left = left.describe();
    report.right = right.describe();
    report.keys = keys;
    report.tolerance = options.tolerance;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The key columns: `keys` if given (each must exist), else every column before `window_start`.
fn key_columns(schema: &SchemaRef, keys: Option<&[String]>) -> Result<Vec<String>, CompareError> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    if let Some(keys) = keys {
        for key in keys {
            if !names.contains(&key.as_str()) {
                return Err(CompareError::Schema(format!(
                    "key column `{key}` is not in the output; it has: {}",
                    names.join(", ")
                )));
            }
        }
        return Ok(keys.to_vec());
    }
    let start = names.iter().position(|n| *n == "window_start").ok_or_else(|| {
        CompareError::Schema(format!(
            "no `window_start` column: is this a lockstep feature output? It has: {}",
            names.join(", ")
        ))
    })?;
    Ok(names[..start].iter().map(|s| s.to_string()).collect())
}

/// Types that hold the same values however a format stores them.
fn same_type(a: &DataType, b: &DataType) -> bool {
    let normal = |t: &DataType| match t {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        // Delta stores timestamps in microseconds; lockstep's are whole milliseconds.
        DataType::Timestamp(_, _) => DataType::Timestamp(TimeUnit::Millisecond, None),
        other => other.clone(),
    };
    normal(a) == normal(b)
}

/// Both sides must hold the same columns with the same types. Returns the column order used:
/// keys, `window_start`, then the left's other columns (`window_end` first when present).
fn check_schemas(
    left_name: &str,
    left: &SchemaRef,
    right_name: &str,
    right: &SchemaRef,
    keys: &[String],
) -> Result<Vec<String>, CompareError> {
    let mut problems = Vec::new();
    for field in left.fields() {
        match right.field_with_name(field.name()) {
            Err(_) => problems.push(format!("`{}` is only on the left", field.name())),
            Ok(other) if !same_type(field.data_type(), other.data_type()) => problems.push(format!(
                "`{}` is {} on the left but {} on the right",
                field.name(),
                field.data_type(),
                other.data_type()
            )),
            Ok(_) => {}
        }
    }
    for field in right.fields() {
        if left.field_with_name(field.name()).is_err() {
            problems.push(format!("`{}` is only on the right", field.name()));
        }
    }
    if !problems.is_empty() {
        return Err(CompareError::Schema(format!(
            "{left_name} and {right_name} have different schemas: {}",
            problems.join("; ")
        )));
    }
    let mut columns: Vec<String> = keys.to_vec();
    columns.push("window_start".into());
    for field in left.fields() {
        if !columns.contains(field.name()) {
            columns.push(field.name().clone());
        }
    }
    Ok(columns)
}

/// Too-late events, by key: the windows each was too late for, and (session events) its time.
struct LateEvents {
    converter: RowConverter,
    windows: HashSet<(Vec<u8>, i64)>,
    sessions: HashMap<Vec<u8>, Vec<i64>>,
    count: u64,
}

impl LateEvents {
    async fn read(ctx: &SessionContext, url: &str, keys: &[String], output: &SchemaRef) -> Result<Self, CompareError> {
        let fields: Vec<SortField> = keys
            .iter()
            .map(|k| SortField::new(output.field_with_name(k).expect("checked").data_type().clone()))
            .collect();
        let converter = RowConverter::new(fields)?;
        let batches = match Input::parse(url)? {
            Input::Table(location) => {
                let frame = lockstep_batch::source::read_table(ctx, &location, None).await?.frame;
                let names: Vec<String> = frame.schema().fields().iter().map(|f| f.name().clone()).collect();
                let mut wanted: Vec<&str> = keys.iter().map(String::as_str).collect();
                wanted.extend(["late_window_start", "late_event_time"]);
                for column in &wanted {
                    if !names.iter().any(|n| n == column) {
                        return Err(CompareError::Input {
                            location: url.into(),
                            message: format!(
                                "column `{column}` is missing: give the too-late events a stream run wrote (--late-out); \
                                 this table has: {}",
                                names.join(", ")
                            ),
                        });
                    }
                }
                let exprs: Vec<_> = wanted.iter().map(|c| col(lockstep_features::compile::quoted(c))).collect();
                frame.select(exprs)?.collect().await?
            }
            Input::Kafka { brokers, topic } => kafka::read_late(&brokers, &topic, keys, output).await?,
        };
        let mut late = LateEvents { converter, windows: HashSet::new(), sessions: HashMap::new(), count: 0 };
        for batch in batches {
            let key_columns: Vec<ArrayRef> = (0..keys.len())
                .map(|i| {
                    arrow::compute::cast(
                        batch.column(i),
                        output.field_with_name(&keys[i]).expect("checked").data_type(),
                    )
                })
                .collect::<Result<_, _>>()?;
            let rows = late.converter.convert_columns(&key_columns)?;
            let millis = |column: &ArrayRef| arrow::compute::cast(column, &lockstep_features::value::timestamp_type());
            let starts = millis(batch.column(keys.len()))?;
            let times = millis(batch.column(keys.len() + 1))?;
            let starts = starts.as_primitive::<TimestampMillisecondType>();
            let times = times.as_primitive::<TimestampMillisecondType>();
            for row in 0..batch.num_rows() {
                let key = rows.row(row).as_ref().to_vec();
                if starts.is_valid(row) {
                    late.windows.insert((key, starts.value(row)));
                } else if times.is_valid(row) {
                    late.sessions.entry(key).or_default().push(times.value(row));
                }
            }
            late.count += batch.num_rows() as u64;
        }
        Ok(late)
    }

    /// Whether a too-late event explains a difference at `key` in the window `[start, end]` of
    /// either side: it was too late for that window, or (sessions) its time lies in it.
    fn explains(&self, key: &[u8], start: i64, spans: &[(i64, i64)]) -> bool {
        if self.windows.contains(&(key.to_vec(), start)) {
            return true;
        }
        self.sessions.get(key).is_some_and(|times| times.iter().any(|t| spans.iter().any(|(s, e)| s <= t && t <= e)))
    }
}

/// Folds joined batches into a [`Report`].
struct Accumulator<'a> {
    keys: usize,
    columns: Vec<String>,
    options: &'a CompareOptions,
    late: Option<LateEvents>,
    report: Report,
}

impl<'a> Accumulator<'a> {
    fn new(columns: &[String], keys: usize, options: &'a CompareOptions, late: Option<LateEvents>) -> Self {
        let report = Report {
            columns: columns[keys + 1..]
                .iter()
                .map(|c| ColumnDiff { column: c.clone(), ..ColumnDiff::default() })
                .collect(),
            late_events: late.as_ref().map(|l| l.count),
            ..Report::default()
        };
        Accumulator { keys, columns: columns.to_vec(), options, late, report }
    }

    fn add(&mut self, batch: &RecordBatch) -> Result<(), CompareError> {
        let n = self.columns.len();
        let (left, right) = (&batch.columns()[..n], &batch.columns()[n..]);
        let k = self.keys;
        let on_left = arrow::compute::is_not_null(&left[k])?;
        let on_right = arrow::compute::is_not_null(&right[k])?;
        // Per compared column, which rows differ (false where a side is missing).
        let mut differs: Vec<BooleanArray> = Vec::with_capacity(n - k - 1);
        for j in k + 1..n {
            differs.push(self.differ(&left[j], &right[j])?);
        }
        let rows = batch.num_rows();
        let mut any_difference = false;
        let mut changed = vec![false; rows];
        for (row, changed_row) in changed.iter_mut().enumerate() {
            let (l, r) = (on_left.value(row), on_right.value(row));
            self.report.rows_left += u64::from(l);
            self.report.rows_right += u64::from(r);
            if l && r {
                self.report.matched += 1;
                *changed_row = differs.iter().any(|d| d.value(row));
            }
            any_difference |= *changed_row || l != r;
        }
        if !any_difference {
            return Ok(());
        }
        // Keys of the present side, for explanations and examples.
        let keys: Vec<ArrayRef> = (0..=k)
            .map(|i| arrow::compute::kernels::zip::zip(&on_left, &left[i], &right[i]))
            .collect::<Result<_, _>>()?;
        let key_rows = match &self.late {
            Some(late) => Some(late.converter.convert_columns(&keys[..k])?),
            None => None,
        };
        let starts = keys[k].as_primitive::<TimestampMillisecondType>();
        let end_index = self.columns.iter().position(|c| c == "window_end");
        let ends = |side: &[ArrayRef], row: usize| -> Option<i64> {
            let column = side[end_index?].as_primitive_opt::<TimestampMillisecondType>()?;
            column.is_valid(row).then(|| column.value(row))
        };
        for (row, &changed_row) in changed.iter().enumerate() {
            let (l, r) = (on_left.value(row), on_right.value(row));
            if !(changed_row || l != r) {
                continue;
            }
            let start = starts.value(row);
            let explained = match (&self.late, &key_rows) {
                (Some(late), Some(key_rows)) => {
                    let spans: Vec<(i64, i64)> =
                        [ends(left, row), ends(right, row)].into_iter().flatten().map(|e| (start, e)).collect();
                    late.explains(key_rows.row(row).as_ref(), start, &spans)
                }
                _ => false,
            };
            if explained {
                self.report.explained += 1;
            } else {
                self.report.unexplained += 1;
            }
            let example = |left_value: Option<String>, right_value: Option<String>| Example {
                key: (0..k).map(|i| value_text(&keys[i], row)).collect(),
                window_start: lockstep_features::rows::format_time(start),
                left: left_value,
                right: right_value,
                explained,
            };
            let limit = self.options.examples;
            if l && !r {
                let missing = &mut self.report.only_left;
                missing.rows += 1;
                missing.explained += u64::from(explained);
                if missing.examples.len() < limit {
                    missing.examples.push(example(Some(row_text(&self.columns, left, k, row)), None));
                }
            } else if r && !l {
                let missing = &mut self.report.only_right;
                missing.rows += 1;
                missing.explained += u64::from(explained);
                if missing.examples.len() < limit {
                    missing.examples.push(example(None, Some(row_text(&self.columns, right, k, row))));
                }
            } else {
                self.report.changed_rows += 1;
                self.report.changed_explained += u64::from(explained);
                for (c, d) in differs.iter().enumerate() {
                    if !d.value(row) {
                        continue;
                    }
                    let j = k + 1 + c;
                    let diff = &mut self.report.columns[c];
                    diff.rows += 1;
                    diff.explained += u64::from(explained);
                    if let Some((abs, rel)) = numeric_difference(&left[j], &right[j], row) {
                        diff.max_abs = Some(diff.max_abs.map_or(abs, |m| m.max(abs)));
                        if let Some(rel) = rel {
                            diff.max_rel = Some(diff.max_rel.map_or(rel, |m| m.max(rel)));
                        }
                    }
                    if diff.examples.len() < limit {
                        let e = example(Some(value_text(&left[j], row)), Some(value_text(&right[j], row)));
                        diff.examples.push(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Which rows hold different values in one column pair: `IS DISTINCT FROM` on the bits, or
    /// outside the tolerance for floats.
    fn differ(&self, left: &ArrayRef, right: &ArrayRef) -> Result<BooleanArray, CompareError> {
        let right = if left.data_type() == right.data_type() {
            right.clone()
        } else {
            arrow::compute::cast(right, left.data_type())?
        };
        let distinct = distinct(left, &right)?;
        let Some(tolerance) = self.options.tolerance else { return Ok(distinct) };
        if left.data_type() != &DataType::Float64 {
            return Ok(distinct);
        }
        let (l, r) = (left.as_primitive::<Float64Type>(), right.as_primitive::<Float64Type>());
        Ok((0..left.len())
            .map(|i| {
                let d = distinct.value(i) && distinct.is_valid(i);
                if !d || l.is_null(i) || r.is_null(i) {
                    return Some(d);
                }
                let (a, b) = (l.value(i), r.value(i));
                let gap = (a - b).abs();
                Some(!(gap <= tolerance || gap <= tolerance * a.abs().max(b.abs())))
            })
            .collect())
    }

    fn finish(self) -> Report {
        self.report
    }
}

/// |left − right| and the relative difference of a numeric cell pair, when both are finite.
fn numeric_difference(left: &ArrayRef, right: &ArrayRef, row: usize) -> Option<(f64, Option<f64>)> {
    if left.is_null(row) || right.is_null(row) {
        return None;
    }
    let (a, b) = match left.data_type() {
        DataType::Float64 => {
            (left.as_primitive::<Float64Type>().value(row), right.as_primitive_opt::<Float64Type>()?.value(row))
        }
        DataType::Int64 => (
            left.as_primitive::<Int64Type>().value(row) as f64,
            right.as_primitive_opt::<Int64Type>()?.value(row) as f64,
        ),
        DataType::Timestamp(TimeUnit::Millisecond, _) => (
            left.as_primitive::<TimestampMillisecondType>().value(row) as f64,
            right.as_primitive_opt::<TimestampMillisecondType>()?.value(row) as f64,
        ),
        _ => return None,
    };
    if !a.is_finite() || !b.is_finite() {
        return None;
    }
    let abs = (a - b).abs();
    let scale = a.abs().max(b.abs());
    Some((abs, (scale > 0.0).then(|| abs / scale)))
}

/// A cell as text: timestamps in RFC 3339, floats in shortest round-trip form.
fn value_text(column: &ArrayRef, row: usize) -> String {
    if column.is_null(row) {
        return "null".into();
    }
    match column.data_type() {
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            lockstep_features::rows::format_time(column.as_primitive::<TimestampMillisecondType>().value(row))
        }
        DataType::Float64 => format!("{:?}", column.as_primitive::<Float64Type>().value(row)),
        _ => array_value_to_string(column, row).unwrap_or_else(|e| format!("<{e}>")),
    }
}

/// The non-key columns of one side's row, as `name=value` pairs.
fn row_text(columns: &[String], side: &[ArrayRef], keys: usize, row: usize) -> String {
    columns[keys + 1..]
        .iter()
        .zip(&side[keys + 1..])
        .map(|(name, column)| format!("{name}={}", value_text(column, row)))
        .collect::<Vec<_>>()
        .join(" ")
}
