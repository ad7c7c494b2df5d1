//! `lockstep compare` and `lockstep backfill`: find skew, explain it, repair it.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use lockstep_backfill::{BackfillOptions, BackfillSummary};
use lockstep_batch::SessionLimits;
use lockstep_compare::{CompareOptions, Input, Report};
use lockstep_features::rows::{format_time, parse_time};

/// Flags of `lockstep compare`.
pub struct CompareArgs {
    pub left: String,
    pub right: String,
    pub keys: Option<String>,
    pub late: Option<String>,
    pub tolerance: Option<f64>,
    pub json: Option<String>,
    pub examples: usize,
    pub limits: SessionLimits,
}

pub async fn compare(args: CompareArgs, quiet: bool) -> Result<ExitCode> {
    if let Some(t) = args.tolerance
        && !(t >= 0.0 && t.is_finite())
    {
        bail!("--tolerance must be a finite number ≥ 0, got {t}");
    }
    let left = Input::parse(&args.left)?;
    let right = Input::parse(&args.right)?;
    let options = CompareOptions {
        keys: args.keys.map(|k| k.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()),
        late: args.late,
        tolerance: args.tolerance,
        examples: args.examples,
        limits: args.limits,
    };
    let bar = crate::progress::Progress::follow(quiet, || "comparing".to_string());
    let result = lockstep_compare::compare(&left, &right, &options).await;
    bar.finish();
    let report = result?;
    print!("{}", report.render());
    println!("compared in {:.2}s", report.elapsed.as_secs_f64());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {path}"))?;
    }
    Ok(verdict(&report))
}

/// Exit status 1 on any unexplained difference.
pub fn verdict(report: &Report) -> ExitCode {
    if report.unexplained > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

/// Flags of `lockstep backfill`.
pub struct BackfillArgs {
    pub history: Option<String>,
    pub out: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub dry_run: bool,
    pub limits: SessionLimits,
}

pub async fn backfill(file: &Path, feature: &str, args: BackfillArgs, quiet: bool) -> Result<ExitCode> {
    let (_, compiled) = crate::load_feature(file, feature)?;
    let force = match (&args.from, &args.to) {
        (Some(from), Some(to)) => {
            Some((parse_time(from).map_err(anyhow::Error::msg)?, parse_time(to).map_err(anyhow::Error::msg)?))
        }
        (None, None) => None,
        _ => bail!("give both --from and --to to force a range"),
    };
    let options = BackfillOptions {
        history: args.history.map(|h| lockstep_batch::source::locate(&h, None)),
        output: args.out,
        force,
        dry_run: args.dry_run,
        limits: args.limits,
        ..BackfillOptions::default()
    };
    let bar = crate::progress::Progress::follow(quiet, || "backfilling".to_string());
    let result = lockstep_backfill::backfill(&compiled, options).await;
    bar.finish();
    let summary = result.with_context(|| format!("feature set `{feature}`"))?;
    print!("{}", describe(feature, &summary, args.dry_run));
    Ok(ExitCode::SUCCESS)
}

/// The backfill summary as the terminal shows it.
pub fn describe(feature: &str, summary: &BackfillSummary, dry_run: bool) -> String {
    let plan = &summary.plan;
    let version = |v: Option<i64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    let mut out = String::new();
    if summary.up_to_date() {
        out.push_str(&format!(
            "{feature}: up to date — the output reflects history version {}; nothing to replace\n",
            version(plan.from_version)
        ));
        return out;
    }
    out.push_str(&format!(
        "{feature}: history version {} → {}: {} files added, {} removed, {} changed rows\n",
        version(plan.from_version),
        version(plan.to_version),
        plan.added_files,
        plan.removed_files,
        plan.changed_rows
    ));
    let ranges = crate::demo::plural(plan.ranges.len(), "window_start range");
    out.push_str(&format!("  {ranges}, {} output rows in them:\n", plan.rows_replaced));
    for (from, to) in plan.ranges.iter().take(8) {
        out.push_str(&format!("    [{}, {})\n", format_time(*from), format_time(*to)));
    }
    if plan.ranges.len() > 8 {
        out.push_str(&format!("    … and {} more\n", plan.ranges.len() - 8));
    }
    if dry_run {
        out.push_str("  dry run: nothing written\n");
    } else {
        out.push_str(&format!(
            "  replaced them with {} recomputed rows in one commit (output version {}, {} file(s) added, {} removed{}) in {:.2}s\n",
            summary.rows_written,
            version(summary.committed),
            summary.files_added,
            summary.files_removed,
            if summary.attempts > 1 { format!(", after {} attempts", summary.attempts) } else { String::new() },
            summary.elapsed.as_secs_f64()
        ));
    }
    out
}
