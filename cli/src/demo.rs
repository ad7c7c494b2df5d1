//! `lockstep demo`: the whole story on embedded defaults, in a local folder, without a broker.
//!
//! 1. generate transactions (some arrive minutes to hours late);
//! 2. an upstream outage delays half an hour of events by three hours: the stream sees them too
//!    late, and the nightly load of the history Delta table misses them;
//! 3. batch: the offline features from the history;
//! 4. stream: every event replayed in arrival order through the streaming engine; the windows it
//!    fired and the events it found too late;
//! 5. compare offline vs online: every difference is explained by a too-late event;
//! 6. the delayed events land in the history;
//! 7. backfill replaces exactly the windows they touch, in one commit;
//! 8. compare the backfilled table with a full recompute: identical;
//! 9. compare offline vs online again: still every difference explained.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use datafusion::prelude::SessionContext;
use deltalake::protocol::SaveMode;
use lockstep_backfill::BackfillOptions;
use lockstep_batch::{BatchJob, OutputTarget, SessionLimits};
use lockstep_compare::{CompareOptions, Input, Report};
use lockstep_features::rows::format_time;
use lockstep_features::{Definitions, Location, compile_feature};

/// The definitions the demo runs: the SPEC example feature set, with paths in the demo folder.
const DEFINITIONS: &str = r#"# Written by `lockstep demo`: the SPEC example feature set over the demo's folder.
sources:
  transactions:
    schema:
      user_id: string
      merchant_id: string
      amount: float64
      event_type: string
      event_time: timestamp
      ingest_time: timestamp
    event_time: event_time
    arrival_time: ingest_time
    history:
      delta: lake/history
    watermark: 30s
    allowed_lateness: 10m

features:
  user_velocity:
    source: transactions
    key: [user_id]
    filter: "amount > 0"
    window: { sliding: 1h, every: 1m }
    aggregations:
      tx_count: count(*)
      total_amount: sum(amount)
      avg_amount: avg(amount)
      max_amount: max(amount)
      unique_merchants: count(distinct merchant_id)
      purchases: count(*) FILTER (WHERE event_type = 'purchase')
    output:
      delta: lake/offline/user_velocity
"#;

const FEATURE: &str = "user_velocity";
const MARKER: &str = ".lockstep-demo";

pub struct DemoOptions {
    pub dir: PathBuf,
    pub events: u64,
    pub users: u32,
    pub days: u32,
    pub seed: u64,
}

/// Prepares the folder: creates it, or empties it when it holds an earlier demo. A non-empty
/// folder that is not a demo's is left alone.
fn prepare(dir: &Path) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if !empty && !dir.join(MARKER).exists() {
            bail!("{} exists and is not a lockstep demo folder; pass --dir to choose another", dir.display());
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(MARKER), "written by `lockstep demo`; the folder is emptied by the next demo run\n")?;
    Ok(())
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}

fn step(number: u32, name: &str, text: String, started: Instant) {
    println!("{number}. {name:<9} {text}  [{:.1}s]", started.elapsed().as_secs_f64());
}

pub async fn run(options: &DemoOptions, quiet: bool) -> Result<ExitCode> {
    let total = Instant::now();
    let dir = std::path::absolute(&options.dir)?;
    prepare(&dir)?;
    let definitions_path = dir.join("features.yaml");
    std::fs::write(&definitions_path, DEFINITIONS)?;
    let definitions = Definitions::parse(&path_text(&definitions_path), DEFINITIONS, &dir)?;
    let feature = definitions.feature(FEATURE).map_err(anyhow::Error::msg)?.clone();
    let compiled = compile_feature(&definitions, &feature)?;
    let history = compiled.source.history.clone().expect("the demo source has a history");
    let offline = match &feature.output.table {
        Some(Location::Delta(url)) => url.clone(),
        _ => unreachable!("the demo feature set writes a Delta table"),
    };
    let events_path = path_text(&dir.join("events.parquet"));
    let online = path_text(&dir.join("online.parquet"));
    let late = path_text(&dir.join("late.parquet"));
    let stragglers = path_text(&dir.join("stragglers.parquet"));
    let recomputed = path_text(&dir.join("lake/recomputed/user_velocity"));
    let limits = SessionLimits::default();
    println!(
        "lockstep demo in {}: feature set `{FEATURE}` ({} by user_id; {} aggregates), definitions in features.yaml\n",
        dir.display(),
        compiled.window(),
        compiled.aggregates.len()
    );

    // 1. Generate.
    let started = Instant::now();
    let generate = lockstep_fixtures::GenerateOptions {
        events: options.events,
        users: options.users,
        days: options.days,
        seed: options.seed,
        late_rate: 0.01,
        ..lockstep_fixtures::GenerateOptions::default()
    };
    let bar = crate::progress::bar(quiet, options.events, "generating");
    let generated =
        lockstep_fixtures::write_events(&generate, &events_path, lockstep_fixtures::OutputFormat::Parquet, |n| {
            bar.set_position(n)
        })
        .await?;
    bar.finish_and_clear();
    step(
        1,
        "generate",
        format!(
            "{} transactions, {} users, {} days: {} arrived over a minute late, {} duplicates → events.parquet",
            generated.events, options.users, options.days, generated.late_events, generated.duplicates
        ),
        started,
    );

    // 2. An upstream outage delays half an hour of events by three hours: the stream sees them
    //    too late, and the nightly history load misses them.
    let started = Instant::now();
    let day = 24 * 3_600_000;
    let outage_start = generate.start_ms + i64::from(options.days - 1) * day + 14 * 3_600_000;
    let outage = (outage_start, outage_start + 30 * 60_000);
    let (loaded, held) = split_history(&events_path, history.url(), &stragglers, outage).await?;
    step(
        2,
        "history",
        format!(
            "an upstream outage delays the {held} events of [{}, {}) by 3h; the other {loaded} events are \
             loaded into the Delta history lake/history (version 0)",
            format_time(outage.0),
            format_time(outage.1)
        ),
        started,
    );

    // 3. Batch.
    let started = Instant::now();
    let job = BatchJob::new(compiled.clone(), None)?.with_limits(limits.clone());
    let summary = job.run(&OutputTarget::Delta(offline.clone())).await?;
    step(
        3,
        "batch",
        format!(
            "offline features: {} events → {} windows → lake/offline/user_velocity",
            summary.events, summary.windows
        ),
        started,
    );

    // 4. Stream (replay every event in arrival order).
    let started = Instant::now();
    let events = Location::Parquet(events_path.clone());
    let replayed =
        lockstep_stream::replay::replay(&compiled, &events, &limits, true, Arc::new(AtomicU64::new(0))).await?;
    let fired: usize = replayed.windows.iter().map(|b| b.num_rows()).sum();
    let counters = replayed.counters;
    let mut order = feature.key.clone();
    order.push("window_start".into());
    let metadata = serde_json::Map::new();
    lockstep_stream::collect::write_table(
        &OutputTarget::ParquetFile(online.clone()),
        replayed.window_schema.clone(),
        replayed.windows,
        &order,
        &feature.key,
        metadata.clone(),
    )
    .await?;
    lockstep_stream::collect::write_table(
        &OutputTarget::ParquetFile(late.clone()),
        replayed.late_schema.clone(),
        replayed.late,
        &[],
        &[],
        metadata,
    )
    .await?;
    step(
        4,
        "stream",
        format!(
            "{} events replayed in arrival order: {fired} windows ({} refired by late events within the 10m lateness), \
             {} events too late → online.parquet, late.parquet",
            counters.events, counters.refired, counters.too_late
        ),
        started,
    );

    // 5. Compare offline and online.
    let started = Instant::now();
    let with_late = CompareOptions { late: Some(late.clone()), ..CompareOptions::default() };
    let first = lockstep_compare::compare(
        &Input::Table(Location::Delta(offline.clone())),
        &Input::Table(events_parquet(&online)),
        &with_late,
    )
    .await?;
    step(5, "compare", format!("offline vs online: {}", differences(&first)), started);

    // 6. The stragglers land.
    let started = Instant::now();
    let version = append_delta(&stragglers, history.url()).await?;
    step(6, "late data", format!("the {held} delayed events land in the history (version {version})"), started);

    // 7. Backfill.
    let started = Instant::now();
    let repaired = lockstep_backfill::backfill(
        &compiled,
        BackfillOptions { limits: limits.clone(), ..BackfillOptions::default() },
    )
    .await?;
    let plan = &repaired.plan;
    let share = 100.0 * plan.rows_replaced as f64 / summary.windows.max(1) as f64;
    step(
        7,
        "backfill",
        format!(
            "{} changed rows touch {} holding {} rows ({share:.2}% of the table): \
             replaced by {} recomputed rows in one replaceWhere commit (output version {})",
            plan.changed_rows,
            plural(plan.ranges.len(), "window_start range"),
            plan.rows_replaced,
            repaired.rows_written,
            repaired.committed.unwrap_or(-1)
        ),
        started,
    );

    // 8. Backfilled vs a full recompute.
    let started = Instant::now();
    let full = BatchJob::new(compiled.clone(), None)?.with_limits(limits.clone());
    full.run(&OutputTarget::Delta(recomputed.clone())).await?;
    let exact = CompareOptions::default();
    let clean = lockstep_compare::compare(
        &Input::Table(Location::Delta(offline.clone())),
        &Input::Table(Location::Delta(recomputed.clone())),
        &exact,
    )
    .await?;
    let verdict = if clean.identical() {
        format!("identical, {} rows bit for bit", clean.matched)
    } else {
        format!("NOT identical: {}", differences(&clean))
    };
    step(8, "compare", format!("backfilled offline vs a full recompute: {verdict}"), started);

    // 9. Offline (now with the stragglers) vs online.
    let started = Instant::now();
    let last = lockstep_compare::compare(
        &Input::Table(Location::Delta(offline.clone())),
        &Input::Table(events_parquet(&online)),
        &with_late,
    )
    .await?;
    step(9, "compare", format!("offline vs online: {}", differences(&last)), started);

    println!("\ndone in {:.1}s. Look closer:", total.elapsed().as_secs_f64());
    let file = path_text(&definitions_path);
    println!("  lockstep compare {offline} {online} --late {late}");
    println!("  lockstep backfill {file} --feature {FEATURE} --dry-run");
    println!("  lockstep plan {file} --feature {FEATURE}");
    let ok = first.unexplained == 0 && clean.identical() && last.unexplained == 0;
    if !ok {
        eprintln!("error: the demo found unexplained differences (see above)");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn events_parquet(path: &str) -> Location {
    Location::Parquet(path.to_string())
}

/// `1 range`, `3 ranges`.
pub fn plural(n: usize, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}

fn differences(report: &Report) -> String {
    if report.identical() {
        return format!("identical, {} rows", report.matched);
    }
    let total = report.explained + report.unexplained;
    let what = format!(
        "{total} of {} rows differ ({} changed, {} only offline, {} only online)",
        report.matched + report.only_left.rows + report.only_right.rows,
        report.changed_rows,
        report.only_left.rows,
        report.only_right.rows
    );
    if report.unexplained == 0 {
        format!("{what}; all {total} explained by too-late events")
    } else {
        format!("{what}; {} UNEXPLAINED", report.unexplained)
    }
}

/// Delays the events of `outage` by three hours in `events`, loads every other event into the
/// Delta history and writes the delayed ones to `stragglers`. Returns both counts.
async fn split_history(events: &str, history: &str, stragglers: &str, outage: (i64, i64)) -> Result<(usize, usize)> {
    use datafusion::logical_expr::{cast, col, lit, when};
    use datafusion::scalar::ScalarValue;
    let ctx = SessionContext::new();
    let frame = ctx.read_parquet(events, Default::default()).await?;
    let time_type = frame.schema().field_with_unqualified_name("event_time")?.data_type().clone();
    let arrival_type = frame.schema().field_with_unqualified_name("ingest_time")?.data_type().clone();
    let inside = lockstep_batch::in_ranges("event_time", &time_type, &[outage])?;
    let three_hours = lit(ScalarValue::new_interval_mdn(0, 0, 3 * 3_600_000_000_000));
    let arrival = when(inside.clone(), cast(col("event_time") + three_hours, arrival_type.clone()))
        .otherwise(col("ingest_time"))?;
    let delayed = ctx.read_batches(frame.with_column("ingest_time", arrival)?.collect().await?)?;
    let target = OutputTarget::ParquetFile(events.to_string());
    target.write(&ctx.state(), delayed.clone(), &[], serde_json::Map::new()).await?;
    let on_time = delayed.clone().filter(datafusion::logical_expr::not(inside.clone()))?.collect().await?;
    let loaded = on_time.iter().map(|b| b.num_rows()).sum();
    write_delta(on_time, history, SaveMode::Overwrite).await?;
    let late = delayed.filter(inside)?;
    let held = late.clone().count().await?;
    OutputTarget::ParquetFile(stragglers.to_string()).write(&ctx.state(), late, &[], serde_json::Map::new()).await?;
    Ok((loaded, held))
}

/// Appends the rows of a Parquet file to a Delta table; returns the new version.
async fn append_delta(parquet: &str, table: &str) -> Result<i64> {
    let ctx = SessionContext::new();
    let rows = ctx.read_parquet(parquet, Default::default()).await?.collect().await?;
    write_delta(rows, table, SaveMode::Append).await
}

async fn write_delta(batches: Vec<arrow::array::RecordBatch>, table: &str, mode: SaveMode) -> Result<i64> {
    let url = lockstep_batch::source::to_url(table)?;
    std::fs::create_dir_all(url.path())?;
    let delta = deltalake::DeltaTable::try_from_url(url).await?;
    let written = delta.write(batches).with_save_mode(mode).await?;
    Ok(written.version().map_or(-1, |v| v as i64))
}
