//! Backfill: recomputes exactly the windows that late history rows touch and replaces them in the
//! output Delta table in one `replaceWhere` commit (SPEC §9).
//!
//! A run:
//! 1. reads the history version the output's rows reflect (the [`HISTORY_VERSION`] field of the
//!    newest output commit that has one);
//! 2. diffs the history's file list between that version and the latest: rows in added files
//!    (late data landing) and in removed files (rows rewritten or deleted) are the changed rows;
//! 3. maps each changed row's event time to the windows holding it — starts in `(t − size, t]`
//!    aligned to `every` — and merges those starts into `window_start` ranges;
//! 4. recomputes exactly those windows from the history at the latest version, reading only the
//!    events that can fall into them;
//! 5. writes them in ONE Delta commit: `replaceWhere` over the ranges, the new history version in
//!    the commit metadata, and an application transaction (`lockstep.backfill.<feature set>`, the
//!    history version) so a retried run is recognisably the same.
//!
//! A concurrent commit to the output that touches the ranges makes the commit conflict; the run
//! then starts again from the new output version, so no row is lost or doubled. A concurrent
//! append to the history is left for the next run: the recompute reads the pinned version and
//! records exactly that version.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::TimestampMillisecondType;
use datafusion::prelude::{SessionContext, col};
use deltalake::kernel::Version;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
use futures::TryStreamExt;
use lockstep_batch::source::open_delta;
use lockstep_batch::{BatchError, BatchJob, HISTORY_VERSION, Ranges, SessionLimits, in_ranges};
use lockstep_features::window::{Panes, Window};
use lockstep_features::{CompiledFeature, Location};

/// The commit metadata field recording the `window_start` ranges a backfill replaced.
pub const BACKFILL_RANGES: &str = "lockstep.backfill_ranges";

/// Why a backfill could not run.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("{0}")]
    Config(String),
    #[error("{location}: {message}")]
    Delta { location: String, message: String },
    #[error("the output table kept changing under the backfill: {attempts} attempts conflicted (last: {last})")]
    Conflicts { attempts: usize, last: String },
}

impl From<datafusion::error::DataFusionError> for BackfillError {
    fn from(error: datafusion::error::DataFusionError) -> Self {
        BackfillError::Batch(BatchError::from(error))
    }
}

/// A hook run after the output table is read and before the commit, once per attempt (tests use
/// it to race a concurrent writer against the backfill).
pub type BeforeCommit = Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What to backfill and how.
pub struct BackfillOptions {
    /// The history (default: the source's `history`); a Delta table unless `force` is given.
    pub history: Option<Location>,
    /// The output Delta table (default: the feature set's `output` table).
    pub output: Option<String>,
    /// Recompute windows starting in `[from, to)` (milliseconds) instead of finding them from
    /// the history's changes.
    pub force: Option<(i64, i64)>,
    /// Work out and report the ranges without writing.
    pub dry_run: bool,
    pub limits: SessionLimits,
    /// Attempts before giving up on a busy output table.
    pub max_attempts: usize,
    pub before_commit: Option<BeforeCommit>,
}

impl Default for BackfillOptions {
    fn default() -> Self {
        BackfillOptions {
            history: None,
            output: None,
            force: None,
            dry_run: false,
            limits: SessionLimits::default(),
            max_attempts: 5,
            before_commit: None,
        }
    }
}

/// The work a backfill found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackfillPlan {
    /// The history version the output reflected before this run (`None`: unknown, forced run).
    pub from_version: Option<i64>,
    /// The history version the run records as processed (a forced run keeps the old one).
    pub to_version: Option<i64>,
    /// The history version the recompute reads (the latest).
    pub read_version: Option<i64>,
    pub added_files: usize,
    pub removed_files: usize,
    /// Changed history rows that pass the filter and have an event time.
    pub changed_rows: u64,
    /// `window_start` ranges to replace, half-open, milliseconds, merged and sorted.
    pub ranges: Vec<(i64, i64)>,
    /// Output rows currently in those ranges.
    pub rows_replaced: u64,
}

/// What a backfill did.
#[derive(Debug, Clone)]
pub struct BackfillSummary {
    pub plan: BackfillPlan,
    /// Rows of recomputed windows written in the commit.
    pub rows_written: u64,
    /// Output files the commit added and removed (the rewrite `replaceWhere` needed).
    pub files_added: u64,
    pub files_removed: u64,
    /// The output version committed (`None`: nothing to do, or a dry run).
    pub committed: Option<i64>,
    pub attempts: usize,
    pub elapsed: Duration,
}

impl BackfillSummary {
    /// True when the output already reflected the latest history.
    pub fn up_to_date(&self) -> bool {
        self.plan.ranges.is_empty()
    }
}

/// The application id of a feature set's backfill commits.
pub fn app_id(feature: &str) -> String {
    format!("lockstep.backfill.{feature}")
}

/// Runs a backfill of `feature`; see the crate documentation.
pub async fn backfill(feature: &CompiledFeature, options: BackfillOptions) -> Result<BackfillSummary, BackfillError> {
    let started = Instant::now();
    let shape = match feature.window() {
        Window::Session { gap } => Shape::Sessions { gap: gap.millis() },
        window => Shape::Panes(window.panes().expect("sliding windows have panes")),
    };
    let history = options.history.clone().or_else(|| feature.source.history.clone()).ok_or_else(|| {
        BackfillError::Config(format!("source `{}` has no `history`; pass --history URL", feature.source.name))
    })?;
    let output = match (&options.output, &feature.feature.output.table) {
        (Some(url), _) => url.clone(),
        (None, Some(Location::Delta(url))) => url.clone(),
        (None, Some(Location::Parquet(url))) => {
            return Err(BackfillError::Config(format!(
                "the output of `{}` is Parquet ({url}); backfill replaces windows in a Delta table (one atomic commit)",
                feature.feature.name
            )));
        }
        (None, None) => {
            return Err(BackfillError::Config(format!(
                "feature set `{}` has no output table; pass --out URL of its Delta table",
                feature.feature.name
            )));
        }
    };
    if options.force.is_none() && !matches!(history, Location::Delta(_)) {
        return Err(BackfillError::Config(format!(
            "the history {} is Parquet: finding late rows needs a Delta history (its versions); \
             give --from and --to to recompute a range",
            history.url()
        )));
    }

    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut output_table = open_delta(&output, None).await.map_err(|e| match e {
            BatchError::Input { location, message } => BackfillError::Delta {
                location,
                message: format!("{message}; write it first with `lockstep batch --out {output} --format delta`"),
            },
            other => other.into(),
        })?;
        let plan = plan(feature, &history, &output_table, &output, shape, options.force, &options.limits).await?;
        if plan.ranges.is_empty() || options.dry_run {
            return Ok(BackfillSummary {
                plan,
                rows_written: 0,
                files_added: 0,
                files_removed: 0,
                committed: None,
                attempts,
                elapsed: started.elapsed(),
            });
        }
        if let Some(hook) = &options.before_commit {
            hook(attempts).await;
        }
        match write(feature, &history, &mut output_table, &output, shape, &plan, &options).await {
            Ok(((rows_written, files_added, files_removed), committed)) => {
                return Ok(BackfillSummary {
                    plan,
                    rows_written,
                    files_added,
                    files_removed,
                    committed: Some(committed),
                    attempts,
                    elapsed: started.elapsed(),
                });
            }
            Err(Failure::Conflict(last)) if attempts < options.max_attempts => {
                tracing::warn!(attempt = attempts, "the output table changed during the backfill ({last}); retrying");
            }
            Err(Failure::Conflict(last)) => return Err(BackfillError::Conflicts { attempts, last }),
            Err(Failure::Other(error))
                if attempts < options.max_attempts && lockstep_batch::cluster::inconsistent(&error) =>
            {
                tracing::warn!(attempt = attempts, %error, "nothing was committed; running the backfill again");
            }
            Err(Failure::Other(error)) => return Err(error),
        }
    }
}

/// The history version the output's rows reflect: the newest commit carrying
/// [`HISTORY_VERSION`].
async fn processed_version(table: &deltalake::DeltaTable) -> Result<Option<i64>, BackfillError> {
    let mut commits = table.history(None);
    let mut newest: Option<(i64, i64)> = None;
    while let Some(commit) = commits.try_next().await.map_err(|e| BackfillError::Delta {
        location: table.table_url().to_string(),
        message: format!("cannot read the commit history: {e}"),
    })? {
        let Some(version) = commit.info.get(HISTORY_VERSION).and_then(|v| v.as_i64()) else { continue };
        let at = commit.timestamp.unwrap_or(i64::MIN);
        // Commits stream newest first, but order by timestamp to be safe.
        if newest.is_none_or(|(t, _)| at > t) {
            newest = Some((at, version));
        }
    }
    Ok(newest.map(|(_, v)| v))
}

async fn plan(
    feature: &CompiledFeature,
    history: &Location,
    output_table: &deltalake::DeltaTable,
    output: &str,
    shape: Shape,
    force: Option<(i64, i64)>,
    limits: &SessionLimits,
) -> Result<BackfillPlan, BackfillError> {
    let latest = match history {
        Location::Delta(url) => Some(open_delta(url, None).await?),
        Location::Parquet(_) => None,
    };
    let to_version = latest.as_ref().and_then(|t| t.version()).map(|v| v as i64);
    let from_version = processed_version(output_table).await?;
    let mut plan = BackfillPlan { from_version, to_version, read_version: to_version, ..BackfillPlan::default() };
    if let Some((from, to)) = force {
        if from >= to {
            return Err(BackfillError::Config("--from must be before --to".into()));
        }
        match shape {
            // Every window starting in [from, to): panes from the one holding `from` (rounded up
            // to a window start) to the last start before `to`.
            Shape::Panes(panes) => {
                let first = panes.pane_of(from) + i64::from(panes.start_of(panes.pane_of(from)) < from);
                let last = panes.pane_of(to - 1);
                if first <= last {
                    plan.ranges = vec![(panes.start_of(first), panes.start_of(last + 1))];
                }
            }
            Shape::Sessions { .. } => plan.ranges = vec![(from, to)],
        }
        // A forced run does not know about other late rows: it keeps the recorded version.
        plan.to_version = from_version;
    } else {
        let latest = latest.expect("checked: the history is Delta");
        let Some(from) = from_version else {
            return Err(BackfillError::Config(format!(
                "{output} records no history version (commit metadata `{HISTORY_VERSION}`): \
                 write it with `lockstep batch` from a Delta history, or give --from and --to"
            )));
        };
        let now = to_version.expect("a loaded Delta table has a version");
        if from > now {
            return Err(BackfillError::Config(format!(
                "{output} reflects history version {from}, but {} is at version {now}: was the history replaced?",
                history.url()
            )));
        }
        if from == now {
            return Ok(plan);
        }
        if !latest.snapshot().map(|s| s.metadata().partition_columns().is_empty()).unwrap_or(true) {
            return Err(BackfillError::Config(format!(
                "{} is partitioned; backfill reads changed files directly and needs an unpartitioned history \
                 (give --from and --to to recompute a range)",
                history.url()
            )));
        }
        let before = open_delta(history.url(), Some(from as Version)).await?;
        let files = |t: &deltalake::DeltaTable| -> Result<HashSet<String>, BackfillError> {
            Ok(t.get_file_uris()
                .map_err(|e| BackfillError::Delta { location: history.url().into(), message: e.to_string() })?
                .collect())
        };
        let (old, new) = (files(&before)?, files(&latest)?);
        let mut changed: Vec<String> = new.difference(&old).cloned().collect();
        plan.added_files = changed.len();
        let removed: Vec<String> = old.difference(&new).cloned().collect();
        plan.removed_files = removed.len();
        changed.extend(removed);
        changed.sort();
        let (rows, ranges) = match shape {
            Shape::Panes(panes) => {
                let (rows, starts) = touched_panes(feature, &changed, panes, limits).await?;
                (rows, window_ranges(&starts, panes))
            }
            Shape::Sessions { gap } => touched_sessions(feature, &changed, output, gap, limits).await?,
        };
        plan.changed_rows = rows;
        plan.ranges = ranges;
    }
    plan.rows_replaced = count_rows(output, &plan.ranges, limits).await?;
    Ok(plan)
}

/// The panes holding the event times of the rows in `files` that pass the feature's filter.
async fn touched_panes(
    feature: &CompiledFeature,
    files: &[String],
    panes: Panes,
    limits: &SessionLimits,
) -> Result<(u64, BTreeSet<i64>), BackfillError> {
    let mut found = BTreeSet::new();
    if files.is_empty() {
        return Ok((0, found));
    }
    check_readable(files)?;
    let ctx = SessionContext::new_with_state(lockstep_batch::plan::session_state(limits)?);
    let mut frame = ctx.read_parquet(files.to_vec(), Default::default()).await?;
    if let Some(filter) = &feature.filter {
        frame = frame.filter(filter.clone())?;
    }
    let time = lockstep_features::compile::quoted(&feature.source.event_time);
    let frame = frame.select(vec![
        datafusion::logical_expr::cast(col(time), lockstep_features::value::timestamp_type()).alias("t"),
    ])?;
    let mut rows = 0u64;
    let mut stream = frame.execute_stream().await?;
    while let Some(batch) = stream.try_next().await? {
        let times = batch.column(0).as_primitive::<TimestampMillisecondType>();
        for i in 0..times.len() {
            if times.is_valid(i) {
                rows += 1;
                found.insert(panes.pane_of(times.value(i)));
            }
        }
    }
    Ok((rows, found))
}

/// Every changed file must still be there: a removed file's rows are read back to find the
/// windows that lost them.
fn check_readable(files: &[String]) -> Result<(), BackfillError> {
    for file in files {
        if let Some(path) = file.strip_prefix("file://")
            && !std::path::Path::new(path).exists()
        {
            return Err(BackfillError::Config(format!(
                "history file {file} was removed and vacuumed since the output was written; \
                 its rows cannot be located: recompute with `lockstep batch` or give --from and --to"
            )));
        }
    }
    Ok(())
}

/// Merges the windows holding each pane in `event_panes` into sorted, disjoint `window_start`
/// ranges (half-open, milliseconds).
pub fn window_ranges(event_panes: &BTreeSet<i64>, panes: Panes) -> Vec<(i64, i64)> {
    let mut merged: Vec<(i64, i64)> = Vec::new();
    for &pane in event_panes {
        let windows = panes.windows_of_pane(pane);
        let (first, end) = (*windows.start(), windows.end() + 1);
        match merged.last_mut() {
            Some(last) if first <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((first, end)),
        }
    }
    merged.into_iter().map(|(a, b)| (panes.start_of(a), panes.start_of(b))).collect()
}

/// How a feature set's windows are cut, as far as backfill is concerned.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Panes(Panes),
    /// Session windows with this gap in milliseconds.
    Sessions {
        gap: i64,
    },
}

/// The `window_start` ranges a set of changed events makes stale in a session feature set.
///
/// A changed event at `t` of key `k` can join (or, removed, split) any session of `k` whose
/// `[window_start − gap, window_end)` holds `t`. Every such session, and every session the
/// event could start, starts in `[min(t, their starts), t + gap)`: replacing that range (for all
/// keys) with a recompute replaces each stale session whole.
async fn touched_sessions(
    feature: &CompiledFeature,
    files: &[String],
    output: &str,
    gap: i64,
    limits: &SessionLimits,
) -> Result<(u64, Vec<(i64, i64)>), BackfillError> {
    use datafusion::functions_aggregate::expr_fn::min;
    use datafusion::logical_expr::{JoinType, Operator, binary_expr, cast, lit};
    use datafusion::scalar::ScalarValue;
    if files.is_empty() {
        return Ok((0, Vec::new()));
    }
    check_readable(files)?;
    let ctx = SessionContext::new_with_state(lockstep_batch::plan::session_state(limits)?);
    let keys = &feature.feature.key;
    let millis = lockstep_features::value::timestamp_type();
    let mut changed = ctx.read_parquet(files.to_vec(), Default::default()).await?;
    if let Some(filter) = &feature.filter {
        changed = changed.filter(filter.clone())?;
    }
    let quoted = lockstep_features::compile::quoted;
    let mut columns: Vec<_> = keys
        .iter()
        .zip(&feature.key_types)
        .enumerate()
        .map(|(i, (k, t))| cast(col(quoted(k)), t.arrow_type()).alias(format!("c{i}")))
        .collect();
    columns.push(cast(col(quoted(&feature.source.event_time)), millis.clone()).alias("t"));
    let changed = changed.select(columns)?.filter(col("t").is_not_null())?;
    let rows = changed.clone().count().await? as u64;
    let out = lockstep_batch::source::read_table(&ctx, &Location::Delta(output.into()), None).await?.frame;
    let mut columns: Vec<_> = keys.iter().enumerate().map(|(i, k)| col(quoted(k)).alias(format!("o{i}"))).collect();
    columns.push(cast(col("window_start"), millis.clone()).alias("s"));
    columns.push(cast(col("window_end"), millis.clone()).alias("e"));
    let out = out.select(columns)?;
    let gap_lit = || lit(ScalarValue::DurationMillisecond(Some(gap)));
    let mut on: Vec<_> = (0..keys.len())
        .map(|i| binary_expr(col(format!("c{i}")), Operator::IsNotDistinctFrom, col(format!("o{i}"))))
        .collect();
    on.push(col("s").lt(col("t") + gap_lit()));
    on.push(col("e").gt(col("t")));
    let mut group: Vec<_> = (0..keys.len()).map(|i| col(format!("c{i}"))).collect();
    group.push(col("t"));
    let joined = changed.join_on(out, JoinType::Left, on)?.aggregate(group, vec![min(col("s")).alias("first")])?;
    let mut spans: Vec<(i64, i64)> = Vec::new();
    let mut stream = joined.execute_stream().await?;
    while let Some(batch) = stream.try_next().await? {
        let times = batch.column_by_name("t").expect("selected").as_primitive::<TimestampMillisecondType>();
        let firsts = batch.column_by_name("first").expect("aggregated").as_primitive::<TimestampMillisecondType>();
        for i in 0..batch.num_rows() {
            let t = times.value(i);
            let first = if firsts.is_valid(i) { firsts.value(i).min(t) } else { t };
            spans.push((first, t.saturating_add(gap)));
        }
    }
    spans.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::new();
    for (from, to) in spans {
        match merged.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    Ok((rows, merged))
}

/// Recomputes the sessions starting in `ranges`. Events are read from `gap` before each range
/// (an earlier event would start the session earlier) to some time after it; a session is whole
/// when it ends (last event + gap) at or before the end of what was read. Until every session is
/// whole, the read extends fourfold.
async fn recompute_sessions(
    job: &dyn Fn(Ranges) -> Result<BatchJob, BackfillError>,
    ranges: &[(i64, i64)],
    gap: i64,
) -> Result<(SessionContext, datafusion::dataframe::DataFrame), BackfillError> {
    let mut reach = gap.max(3_600_000);
    loop {
        let mut events: Vec<(i64, i64)> = Vec::new();
        for &(from, to) in ranges {
            let span = (from.saturating_sub(gap), to.saturating_add(reach));
            match events.last_mut() {
                Some(last) if span.0 <= last.1 => last.1 = last.1.max(span.1),
                _ => events.push(span),
            }
        }
        let (ctx, frame, _) = job(Ranges { events: events.clone(), windows: ranges.to_vec() })?.dataframe(true).await?;
        let schema = Arc::new(frame.schema().as_arrow().clone());
        let batches = frame.collect().await?;
        let whole = batches.iter().all(|batch| {
            let starts =
                batch.column_by_name("window_start").expect("output column").as_primitive::<TimestampMillisecondType>();
            let ends =
                batch.column_by_name("window_end").expect("output column").as_primitive::<TimestampMillisecondType>();
            (0..batch.num_rows()).all(|i| {
                let read_to = events
                    .iter()
                    .find(|(a, b)| *a <= starts.value(i) && starts.value(i) < *b)
                    .map_or(i64::MAX, |e| e.1);
                ends.value(i) <= read_to
            })
        });
        if whole || reach >= i64::MAX / 8 {
            let table = datafusion::datasource::MemTable::try_new(schema, vec![batches])?;
            let frame = ctx.read_table(Arc::new(table))?;
            return Ok((ctx, frame));
        }
        reach = reach.saturating_mul(4);
    }
}

/// The event times that can fall into windows starting in `windows`: `[start, last start + size)`.
fn event_ranges(windows: &[(i64, i64)], panes: Panes) -> Vec<(i64, i64)> {
    let mut merged: Vec<(i64, i64)> = Vec::new();
    for &(from, to) in windows {
        let end = panes.start_of(panes.pane_of(to - 1) + panes.per_window);
        match merged.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((from, end)),
        }
    }
    merged
}

/// Output rows whose `window_start` lies in `ranges`.
async fn count_rows(output: &str, ranges: &[(i64, i64)], limits: &SessionLimits) -> Result<u64, BackfillError> {
    if ranges.is_empty() {
        return Ok(0);
    }
    let ctx = SessionContext::new_with_state(lockstep_batch::plan::session_state(limits)?);
    let table = lockstep_batch::source::read_table(&ctx, &Location::Delta(output.into()), None).await?;
    let frame = table.frame.filter(in_ranges("window_start", &lockstep_features::value::timestamp_type(), ranges)?)?;
    Ok(frame.count().await? as u64)
}

enum Failure {
    Conflict(String),
    Other(BackfillError),
}

impl<E: Into<BackfillError>> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure::Other(error.into())
    }
}

async fn write(
    feature: &CompiledFeature,
    history: &Location,
    output_table: &mut deltalake::DeltaTable,
    output: &str,
    shape: Shape,
    plan: &BackfillPlan,
    options: &BackfillOptions,
) -> Result<((u64, u64, u64), i64), Failure> {
    let job = |ranges: Ranges| -> Result<BatchJob, BackfillError> {
        let mut job = BatchJob::new(feature.clone(), Some(history.clone()))?
            .with_limits(options.limits.clone())
            .with_ranges(ranges);
        if let Some(version) = plan.read_version.filter(|_| matches!(history, Location::Delta(_))) {
            job = job.at_history_version(version as Version);
        }
        Ok(job)
    };
    let (ctx, frame) = match shape {
        Shape::Panes(panes) => {
            let ranges = Ranges { events: event_ranges(&plan.ranges, panes), windows: plan.ranges.clone() };
            let (ctx, frame, _) = job(ranges)?.dataframe(true).await?;
            (ctx, frame)
        }
        Shape::Sessions { gap } => recompute_sessions(&job, &plan.ranges, gap).await?,
    };
    let predicate = in_ranges("window_start", &lockstep_features::value::timestamp_type(), &plan.ranges)?;
    let mut metadata = serde_json::Map::new();
    metadata.insert("lockstep.feature".into(), feature.feature.name.clone().into());
    metadata.insert("lockstep.history".into(), history.url().into());
    if let Some(version) = plan.to_version {
        metadata.insert(HISTORY_VERSION.into(), version.into());
    }
    let ranges: Vec<serde_json::Value> = plan
        .ranges
        .iter()
        .map(|&(a, b)| {
            serde_json::json!([lockstep_features::rows::format_time(a), lockstep_features::rows::format_time(b)])
        })
        .collect();
    metadata.insert(BACKFILL_RANGES.into(), ranges.into());
    let mut commit = CommitProperties::default().with_metadata(metadata);
    if options.force.is_none()
        && let Some(version) = plan.to_version
    {
        commit = commit
            .with_application_transaction(deltalake::kernel::Transaction::new(app_id(&feature.feature.name), version));
    }
    let written = output_table
        .clone()
        .write(Vec::new())
        .with_input_plan(lockstep_batch::output::ordered_source(frame, None).await?)
        .with_session_state(Arc::new(ctx.state()))
        .with_save_mode(SaveMode::Overwrite)
        .with_replace_where(predicate)
        .with_target_file_size(NonZeroU64::new(lockstep_batch::output::DELTA_FILE_SIZE))
        .with_commit_properties(commit)
        .await;
    let table = match written {
        Ok(table) => table,
        Err(error) => {
            let text = error.to_string();
            let conflict = matches!(
                error,
                deltalake::DeltaTableError::Transaction { .. } | deltalake::DeltaTableError::VersionAlreadyExists(_)
            ) && (text.contains("onflict")
                || text.contains("already exists")
                || text.contains("concurrent"));
            if conflict {
                return Err(Failure::Conflict(text));
            }
            return Err(BackfillError::Delta { location: output.into(), message: text }.into());
        }
    };
    let committed = table.version().map(|v| v as i64).unwrap_or(-1);
    Ok((commit_metrics(&table).await, committed))
}

/// Rows and files the newest commit added and removed, from its operation metrics.
async fn commit_metrics(table: &deltalake::DeltaTable) -> (u64, u64, u64) {
    let mut commits = table.history(Some(1));
    let Ok(Some(commit)) = commits.try_next().await else { return (0, 0, 0) };
    let Some(metrics) = commit.info.get("operationMetrics") else { return (0, 0, 0) };
    let read = |name: &str| metrics.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
    (read("num_added_rows"), read("num_added_files"), read("num_removed_files"))
}
