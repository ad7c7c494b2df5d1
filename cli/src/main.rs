//! The `lockstep` command line: parses arguments, calls the library crates, reports.

mod cluster;
mod demo;
mod progress;
mod repair;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use lockstep_batch::{BatchJob, OutputFormat, OutputTarget, SessionLimits};
use lockstep_features::{CompiledFeature, Definitions, FeatureSet, Location, compile_all, compile_feature};

/// Window stages allocate many small partial states from several threads at once; mimalloc's
/// per-thread heaps take that without the lock contention and fragmentation of the system
/// allocator (measured in BENCHMARKS.md). The crate's `override` feature makes it the C
/// allocator too: librdkafka allocates each record on the worker thread and frees it on its
/// broker thread, where glibc's malloc spent a tenth of a streaming run's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    /// mimalloc's `mi_option_set` (mimalloc.h), linked in with the allocator.
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the same in mimalloc 2 and 3).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Keeps freed memory for reuse instead of returning it to the system (mimalloc returns it after
/// 10 ms by default). A batch job frees and reallocates its output batches continually; returned,
/// every reuse faults fresh pages in and the kernel zeroes them: 2.4 s of system time in a 7 s
/// job, 1.0 s with purging off. Memory then stays at its peak until the process exits.
fn keep_freed_memory() {
    // SAFETY: sets one of mimalloc's process-wide options, a plain integer it reads when it
    // decides whether to purge (-1: never); the option exists in every mimalloc version the crate builds.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// lockstep: define windowed ML features once; compute them in batch and streaming with
/// bit-identical results.
#[derive(Parser)]
#[command(name = "lockstep", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Hide progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a definitions file: syntax, schema, expressions, windows. Exit 1 on any error.
    Validate {
        /// The definitions file (YAML).
        file: PathBuf,
    },
    /// Show the batch job's DataFusion plan for one or every feature set.
    Plan {
        file: PathBuf,
        /// Only this feature set.
        #[arg(long)]
        feature: Option<String>,
        /// Plan over this history instead of the source's `history`.
        #[arg(long)]
        history: Option<String>,
    },
    /// Generate deterministic synthetic transactions (same seed, same bytes).
    Generate {
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        #[arg(long, default_value_t = 1_000)]
        users: u32,
        #[arg(long, default_value_t = 1)]
        days: u32,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Share of events that arrive minutes to hours late.
        #[arg(long, default_value_t = 0.01)]
        late_rate: f64,
        /// Output path: a `.parquet` file, a folder, a Delta table or a `.jsonl` file.
        #[arg(long)]
        out: String,
        #[arg(long, value_enum)]
        format: Option<GenerateFormat>,
    },
    /// Compute a feature set over its source's history and write one row per key and window.
    Batch {
        file: PathBuf,
        /// The feature set to compute.
        #[arg(long)]
        feature: String,
        /// Read this history (Parquet file, folder or glob, or Delta table) instead of the source's.
        #[arg(long)]
        history: Option<String>,
        /// The history at --history is a Delta table (default: Parquet unless it has a _delta_log).
        #[arg(long, value_enum)]
        history_format: Option<TableFormat>,
        /// Write here instead of the feature's `output` (a URL ending in .parquet is one file).
        #[arg(long)]
        out: Option<String>,
        /// Force the output format.
        #[arg(long, value_enum)]
        format: Option<TableFormat>,
        #[command(flatten)]
        resources: Resources,
    },
    /// Send a JSON-lines file to a Kafka topic, one message per line, keyed by a field.
    Produce {
        /// The JSON-lines file (e.g. from `lockstep generate --format jsonl`).
        file: PathBuf,
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        /// The field whose value keys each message (the feature key).
        #[arg(long, default_value = "user_id")]
        key: String,
        /// Messages per second (default: as fast as possible).
        #[arg(long)]
        rate: Option<u64>,
        /// Create the topic with this many partitions if it does not exist.
        #[arg(long, default_value_t = 1)]
        partitions: i32,
    },
    /// Match two feature outputs on key and window_start; report missing and differing rows,
    /// explained by too-late events or not. Exit 1 on any unexplained difference.
    Compare {
        /// A Delta table, Parquet file or folder, or kafka://HOST:PORT/TOPIC.
        left: String,
        /// The same kinds as LEFT.
        right: String,
        /// Key columns, comma-separated (default: the columns before window_start).
        #[arg(long)]
        keys: Option<String>,
        /// Too-late events: a stream run's --late-out table, or kafka://HOST:PORT/TOPIC.late.
        #[arg(long)]
        late: Option<String>,
        /// Floats within this distance (absolute or relative) count as equal (default: bit-exact).
        #[arg(long)]
        tolerance: Option<f64>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<String>,
        /// Examples shown per column and per kind of missing row.
        #[arg(long, default_value_t = 5)]
        examples: usize,
        /// Memory for the join's sorts before spilling to disk.
        #[arg(long, default_value = "1GiB")]
        memory_limit: String,
    },
    /// Recompute exactly the windows that history rows landed since the last run touch, and
    /// replace them in the output Delta table in one commit.
    Backfill {
        file: PathBuf,
        /// The feature set to repair.
        #[arg(long)]
        feature: String,
        /// The history (default: the source's `history`).
        #[arg(long)]
        history: Option<String>,
        /// The output Delta table (default: the feature set's `output`).
        #[arg(long)]
        out: Option<String>,
        /// Recompute windows starting at or after this time (RFC 3339 or epoch ms), with --to.
        #[arg(long)]
        from: Option<String>,
        /// Recompute windows starting before this time, with --from.
        #[arg(long)]
        to: Option<String>,
        /// Print the ranges and row counts it would replace, and write nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        resources: Resources,
    },
    /// Build a point-in-time training set: the labels' columns plus, per feature set, the
    /// values the online store would have served at each label's time.
    TrainingSet {
        file: PathBuf,
        /// Labels: a Parquet file or folder, a Delta table, or a .csv file with a header.
        #[arg(long)]
        labels: String,
        /// Feature sets, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        features: Vec<String>,
        /// Write the training set here (a URL ending in .parquet is one file).
        #[arg(long)]
        out: String,
        /// Force the output format.
        #[arg(long, value_enum)]
        format: Option<TableFormat>,
        /// The labels' time column (default: their only timestamp column).
        #[arg(long)]
        label_time: Option<String>,
        /// Read this history instead of the sources' `history`.
        #[arg(long)]
        history: Option<String>,
        #[command(flatten)]
        resources: Resources,
    },
    /// Serve feature reads over HTTP from the online store the streaming job fills.
    Serve {
        file: PathBuf,
        /// Address to listen on, e.g. 127.0.0.1:8080.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The online store (default: the feature sets' `output.online`).
        #[arg(long)]
        online: Option<String>,
        /// Log every answer (for `lockstep skew`): a file (JSON lines, appended) or
        /// kafka://HOST:PORT/TOPIC (one JSON record per answer). May be given more than once.
        #[arg(long)]
        log: Vec<String>,
    },
    /// The training/serving skew check: recompute offline every answer `serve` logged and
    /// report differences per feature set and aggregate. Exit 1 above --max-rate.
    Skew {
        file: PathBuf,
        /// The answers `lockstep serve --log` wrote: a JSON-lines file or kafka://HOST:PORT/TOPIC.
        #[arg(long)]
        served: String,
        /// Highest tolerated share of skewed answers per feature set.
        #[arg(long, default_value_t = 0.0)]
        max_rate: f64,
        /// Read this history instead of the sources' `history`.
        #[arg(long)]
        history: Option<String>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<String>,
    },
    /// Run a Ballista scheduler that knows lockstep's plans; `--cluster df://HOST:PORT` sends
    /// batch, backfill and training-set jobs to it.
    Scheduler(cluster::SchedulerArgs),
    /// Run a Ballista executor with lockstep's window stage, registered with a scheduler.
    Executor(cluster::ExecutorArgs),
    /// The whole story on embedded defaults, in a local folder, without a broker: generate,
    /// batch, stream (replay), compare, late data lands, backfill, compare again.
    Demo {
        /// The folder to work in (emptied first if it holds an earlier demo).
        #[arg(long, default_value = "lockstep-demo")]
        dir: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        #[arg(long, default_value_t = 500)]
        users: u32,
        #[arg(long, default_value_t = 2)]
        days: u32,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Run a feature set as a streaming job: from Kafka, or replaying a history in arrival order.
    Stream {
        file: PathBuf,
        /// The feature set to run.
        #[arg(long)]
        feature: String,
        /// Replay this history (Parquet or Delta) through the streaming engine instead of Kafka.
        #[arg(long)]
        replay: Option<String>,
        /// The history at --replay is a Delta table (default: Parquet unless it has a _delta_log).
        #[arg(long, value_enum)]
        replay_format: Option<TableFormat>,
        /// Write the final value of every fired window here at the end of a bounded run.
        #[arg(long)]
        out: Option<String>,
        /// Write too-late events here (replay runs; Kafka runs use the `<topic>.late` topic).
        #[arg(long)]
        late_out: Option<String>,
        /// Force the format of --out and --late-out.
        #[arg(long, value_enum)]
        format: Option<TableFormat>,
        /// Kafka bootstrap servers (host:port,...).
        #[arg(long)]
        brokers: Option<String>,
        #[command(flatten)]
        kafka: KafkaRun,
    },
}

/// Where and with what a batch, backfill or training-set job runs.
#[derive(clap::Args)]
struct Resources {
    /// Memory for sorting before spilling to disk, e.g. 512MiB or 2GiB.
    #[arg(long, default_value = "1GiB")]
    memory_limit: String,
    /// Partitions to spread keys over: threads here, tasks per stage on a cluster (default: the
    /// number of cores; on a cluster, 2 per executor core is a good start).
    #[arg(long)]
    partitions: Option<usize>,
    /// Run on this Ballista cluster (a `lockstep scheduler`) instead of in this process.
    #[arg(long, value_name = "df://HOST:PORT")]
    cluster: Option<String>,
}

impl Resources {
    fn limits(self) -> Result<SessionLimits> {
        Ok(SessionLimits {
            memory_limit: parse_bytes(&self.memory_limit)?,
            partitions: self.partitions.unwrap_or(SessionLimits::default().partitions),
            cluster: self.cluster,
            ..SessionLimits::default()
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum GenerateFormat {
    Parquet,
    Delta,
    Jsonl,
}

#[derive(Clone, Copy, ValueEnum)]
enum TableFormat {
    Parquet,
    Delta,
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOCKSTEP_LOG").unwrap_or_else(|_| {
            // Creating a Delta table logs an expected "no files in log segment" as an error.
            "warn,buoyant_kernel::snapshot::builder=off".into()
        }))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Validate { file } => validate(&file),
        Command::Plan { file, feature, history } => plan(&file, feature.as_deref(), history).await,
        Command::Generate { events, users, days, seed, late_rate, out, format } => {
            generate(events, users, days, seed, late_rate, &out, format, cli.quiet).await
        }
        Command::Batch { file, feature, history, history_format, out, format, resources } => {
            let limits = resources.limits()?;
            batch(&file, &feature, history, history_format, out, format, limits, cli.quiet).await
        }
        Command::Compare { left, right, keys, late, tolerance, json, examples, memory_limit } => {
            let limits = SessionLimits { memory_limit: parse_bytes(&memory_limit)?, ..SessionLimits::default() };
            let args = repair::CompareArgs { left, right, keys, late, tolerance, json, examples, limits };
            repair::compare(args, cli.quiet).await
        }
        Command::Backfill { file, feature, history, out, from, to, dry_run, resources } => {
            let limits = resources.limits()?;
            let args = repair::BackfillArgs { history, out, from, to, dry_run, limits };
            repair::backfill(&file, &feature, args, cli.quiet).await
        }
        Command::TrainingSet { file, labels, features, out, format, label_time, history, resources } => {
            let limits = resources.limits()?;
            let options = lockstep_batch::training::TrainingOptions {
                labels,
                label_time,
                history: history.map(|h| lockstep_batch::source::locate(&h, None)),
                limits,
            };
            training_set(&file, &features, options, &out, format, cli.quiet).await
        }
        Command::Serve { file, listen, online, log } => serve(&file, listen, online, &log).await,
        Command::Skew { file, served, max_rate, history, json } => {
            skew(&file, &served, max_rate, history, json.as_deref()).await
        }
        Command::Scheduler(args) => cluster::scheduler(args).await,
        Command::Executor(args) => cluster::executor(args).await,
        Command::Demo { dir, events, users, days, seed } => {
            demo::run(&demo::DemoOptions { dir, events, users, days, seed }, cli.quiet).await
        }
        Command::Produce { file, brokers, topic, key, rate, partitions } => {
            produce(&file, &brokers, &topic, &key, rate, partitions, cli.quiet).await
        }
        Command::Stream { file, feature, replay, replay_format, out, late_out, format, brokers, kafka } => {
            match (replay, brokers) {
                (Some(replay), None) => {
                    let history = history_location(Some(replay), replay_format).expect("a replay URL was given");
                    stream_replay(&file, &feature, history, out, late_out, format, cli.quiet).await
                }
                (None, Some(brokers)) => {
                    if out.is_some() || late_out.is_some() {
                        bail!("--out and --late-out go with --replay; a Kafka run writes the output and late topics");
                    }
                    stream_kafka(&file, &feature, &brokers, kafka).await
                }
                (Some(_), Some(_)) => bail!("give either --replay URL or --brokers HOST:PORT, not both"),
                (None, None) => bail!(
                    "give --brokers HOST:PORT to consume the source topic, or --replay URL to replay a history without a broker"
                ),
            }
        }
    }
}

fn load(file: &Path) -> Result<Definitions> {
    Ok(Definitions::load(file)?)
}

/// One feature set of a definitions file, and its compiled form.
fn load_feature(file: &Path, name: &str) -> Result<(FeatureSet, CompiledFeature)> {
    let definitions = load(file)?;
    let feature = definitions.feature(name).map_err(anyhow::Error::msg)?.clone();
    let compiled = compile_feature(&definitions, &feature)?;
    Ok((feature, compiled))
}

fn validate(file: &Path) -> Result<ExitCode> {
    let definitions = match Definitions::load(file) {
        Ok(d) => d,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s); no job will start from this file", file.display(), errors.0.len());
            return Ok(ExitCode::FAILURE);
        }
    };
    let compiled = match compile_all(&definitions) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s); no job will start from this file", file.display(), errors.0.len());
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("{}: ok — {} source(s), {} feature set(s)", file.display(), definitions.sources.len(), compiled.len());
    for feature in &compiled {
        let names: Vec<&str> = feature.aggregates.iter().map(|a| a.spec.name.as_str()).collect();
        println!(
            "  {} ← {} by [{}], {}: {}",
            feature.feature.name,
            feature.source.name,
            feature.feature.key.join(", "),
            feature.window(),
            names.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The history location from `--history`, or the source's.
fn history_location(history: Option<String>, format: Option<TableFormat>) -> Option<Location> {
    let url = history?;
    let delta = match format {
        Some(TableFormat::Delta) => true,
        Some(TableFormat::Parquet) => false,
        None => !url.contains("://") && Path::new(&url).join("_delta_log").is_dir(),
    };
    Some(if delta { Location::Delta(url) } else { Location::Parquet(url) })
}

async fn plan(file: &Path, only: Option<&str>, history: Option<String>) -> Result<ExitCode> {
    let definitions = load(file)?;
    let features: Vec<_> = match only {
        Some(name) => vec![definitions.feature(name).map_err(anyhow::Error::msg)?.clone()],
        None => definitions.features.clone(),
    };
    for feature in features {
        let compiled = compile_feature(&definitions, &feature)?;
        let topology = lockstep_stream::kafka::topology(&compiled, &format!("lockstep.{}", feature.name));
        match BatchJob::new(compiled, history_location(history.clone(), None)) {
            Ok(job) => {
                println!("== feature set `{}` (batch, over {}) ==", feature.name, job.history().url());
                println!("{}\n", job.explain().await?);
            }
            Err(error) => println!("== feature set `{}` (batch) ==\n{error}\n", feature.name),
        }
        println!("== feature set `{}` (stream) ==\n{topology}", feature.name);
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
async fn batch(
    file: &Path,
    feature: &str,
    history: Option<String>,
    history_format: Option<TableFormat>,
    out: Option<String>,
    format: Option<TableFormat>,
    limits: SessionLimits,
    quiet: bool,
) -> Result<ExitCode> {
    let (feature_set, compiled) = load_feature(file, feature)?;
    let format = output_format(format);
    let target = OutputTarget::resolve(out.as_deref(), format, feature_set.output.table.as_ref())?;
    let job = BatchJob::new(compiled, history_location(history, history_format))?.with_limits(limits);
    let bar = progress::Progress::start(quiet, job.counters());
    let result = job.run(&target).await;
    bar.finish();
    let summary = result.with_context(|| format!("feature set `{feature}`"))?;
    if job.on_cluster() {
        println!(
            "{feature}: {} windows in {:.2}s on the cluster (events are counted on its executors) → {}",
            summary.windows,
            summary.elapsed.as_secs_f64(),
            summary.output
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{feature}: {} events → {} windows in {:.2}s ({:.0} events/s) → {}",
        summary.events,
        summary.windows,
        summary.elapsed.as_secs_f64(),
        summary.events as f64 / summary.elapsed.as_secs_f64().max(1e-9),
        summary.output
    );
    if summary.null_times > 0 {
        eprintln!("warning: {} events had no event time and were skipped", summary.null_times);
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(file: &Path, listen: std::net::SocketAddr, online: Option<String>, logs: &[String]) -> Result<ExitCode> {
    let definitions = load(file)?;
    let features = compile_all(&definitions)?;
    let online = online
        .or_else(|| features.iter().find_map(|f| f.feature.output.online.clone()))
        .context("no online store: pass --online redis://HOST:PORT or give a feature set `output.online`")?;
    println!("serving {} feature set(s) from {online} on http://{listen}", features.len());
    lockstep_stream::serve::serve(features, &online, listen, logs).await?;
    Ok(ExitCode::SUCCESS)
}

async fn skew(
    file: &Path,
    served: &str,
    max_rate: f64,
    history: Option<String>,
    json: Option<&str>,
) -> Result<ExitCode> {
    let definitions = load(file)?;
    let features = compile_all(&definitions)?;
    let history = history.map(|h| lockstep_batch::source::locate(&h, None));
    let report = lockstep_stream::skew::skew(&features, served, history, SessionLimits::default()).await?;
    let mut over = false;
    for feature in &report {
        println!(
            "{}: {} of {} served answers differ from the offline values ({:.4}%)",
            feature.feature_set,
            feature.skewed,
            feature.answers,
            100.0 * feature.rate
        );
        for (aggregate, count) in &feature.by_aggregate {
            println!("  {aggregate:<20} {count} answers");
        }
        for example in &feature.examples {
            println!(
                "  e.g. key {} at {}: {} served {}, offline {}",
                example.key,
                lockstep_features::rows::format_time(example.request_time),
                example.aggregate,
                example.served,
                example.offline
            );
        }
        over |= feature.rate > max_rate;
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {path}"))?;
    }
    if over {
        eprintln!("skew above --max-rate {max_rate}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn training_set(
    file: &Path,
    features: &[String],
    options: lockstep_batch::training::TrainingOptions,
    out: &str,
    format: Option<TableFormat>,
    quiet: bool,
) -> Result<ExitCode> {
    let definitions = load(file)?;
    let mut compiled = Vec::new();
    for name in features {
        let feature = definitions.feature(name).map_err(anyhow::Error::msg)?;
        compiled.push(compile_feature(&definitions, feature)?);
    }
    let target = OutputTarget::resolve(Some(out), output_format(format), None)?;
    let bar = progress::Progress::follow(quiet, || "building the training set".to_string());
    let result = lockstep_batch::training::training_set(&compiled, &options, &target).await;
    bar.finish();
    let summary = result?;
    let found: Vec<String> = summary.found.iter().map(|(name, n)| format!("{name}: {n} with a window")).collect();
    println!(
        "training set: {} labels ({}) in {:.2}s → {}",
        summary.labels,
        found.join(", "),
        summary.elapsed.as_secs_f64(),
        summary.output
    );
    Ok(ExitCode::SUCCESS)
}

async fn produce(
    file: &Path,
    brokers: &str,
    topic: &str,
    key: &str,
    rate: Option<u64>,
    partitions: i32,
    quiet: bool,
) -> Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let bar = progress::bar(quiet, lines.len() as u64, "producing");
    let (brokers, topic, key) = (brokers.to_string(), topic.to_string(), key.to_string());
    let started = std::time::Instant::now();
    let lines: Vec<String> = lines.into_iter().map(str::to_string).collect();
    let count = lines.len();
    let ticking = bar.clone();
    tokio::task::spawn_blocking(move || {
        lockstep_stream::produce::produce_lines(&brokers, &topic, &key, partitions, &lines, rate, |n| {
            ticking.set_position(n as u64)
        })
    })
    .await
    .context("the producer panicked")??;
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    println!("produced {count} messages in {elapsed:.2}s ({:.0}/s)", count as f64 / elapsed.max(1e-9));
    Ok(ExitCode::SUCCESS)
}

/// How a Kafka run of `lockstep stream` works.
#[derive(clap::Args)]
struct KafkaRun {
    /// Consumer group (default: lockstep.<feature set>).
    #[arg(long)]
    group: Option<String>,
    /// This worker's stable name in the group (default: the host name). Give each worker of
    /// a group its own, and keep it across restarts.
    #[arg(long)]
    instance: Option<String>,
    /// End the run once nothing new arrives for this long (e.g. 30s): every open window fires.
    #[arg(long)]
    until_idle: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// The online store (redis://host:port), overriding the feature's `output.online`.
    #[arg(long)]
    online: Option<String>,
    /// Do not write the online store.
    #[arg(long)]
    no_online: bool,
    /// Most messages per transaction (cycles start at 5000 and grow while a commit outlasts the
    /// work it overlaps).
    #[arg(long, default_value_t = 50_000)]
    max_batch: usize,
    /// A librdkafka setting for every Kafka client of the job, as KEY=VALUE (repeatable),
    /// e.g. security.protocol=SASL_SSL.
    #[arg(long, value_name = "KEY=VALUE")]
    kafka_config: Vec<String>,
    /// A librdkafka setting for the job's transactional producer only (repeatable), e.g.
    /// linger.ms=20.
    #[arg(long, value_name = "KEY=VALUE")]
    producer_config: Vec<String>,
}

async fn stream_kafka(file: &Path, feature: &str, brokers: &str, run: KafkaRun) -> Result<ExitCode> {
    use lockstep_stream::kafka::{KafkaOptions, Worker};
    use lockstep_stream::metrics::{Metrics, serve};
    use lockstep_stream::online::OnlineStore;
    let (feature_set, compiled) = load_feature(file, feature)?;
    let group = run.group.unwrap_or_else(|| format!("lockstep.{feature}"));
    let instance = run.instance.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "worker".into())
    });
    let mut options = KafkaOptions::new(brokers, &group, &instance);
    options.max_batch = run.max_batch.max(1);
    for setting in &run.kafka_config {
        options.add_setting(setting, false).context("--kafka-config")?;
    }
    for setting in &run.producer_config {
        options.add_setting(setting, true).context("--producer-config")?;
    }
    options.until_idle = run
        .until_idle
        .map(|d| lockstep_features::Duration::parse(&d).map(|d| std::time::Duration::from_millis(d.millis() as u64)))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--until-idle: {e}"))?;
    let online_url = if run.no_online { None } else { run.online.or_else(|| feature_set.output.online.clone()) };
    let metrics = Metrics::new();
    if let Some(addr) = run.metrics {
        let (served, name) = (metrics.clone(), feature.to_string());
        tokio::spawn(async move {
            if let Err(error) = serve(addr, name, served).await {
                eprintln!("error: metrics at {addr}: {error}");
            }
        });
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stopping.store(true, Ordering::Relaxed);
        }
    });
    let started = std::time::Instant::now();
    let worker_metrics = metrics.clone();
    let summary = tokio::task::spawn_blocking(move || {
        let online = online_url.as_deref().map(|url| OnlineStore::connect(url, &compiled)).transpose()?;
        let worker = Worker::start(compiled, options, online, worker_metrics)?;
        let topics = worker.topics().clone();
        worker.run(stop).map(|summary| (summary, topics))
    })
    .await
    .context("the streaming worker panicked")?
    .with_context(|| format!("feature set `{feature}`"))?;
    let (summary, topics) = summary;
    let busy = summary.busy.as_secs_f64();
    if busy > 0.0 {
        let latency = metrics
            .output_latency_percentiles(&[50.0, 99.0])
            .map_or(String::new(), |q| format!("; produce → output p50 {} ms, p99 {} ms", q[0], q[1]));
        let cpu = summary.cpu.as_secs_f64();
        let per_core = if cpu > 0.0 {
            format!(", {:.0} events per CPU-second", summary.events as f64 / cpu)
        } else {
            String::new()
        };
        let span = summary.span.as_secs_f64();
        let end_to_end = if span > 0.0 {
            format!(
                "end to end {:.0} events/s over {span:.2}s (first read to last commit); ",
                summary.events as f64 / span
            )
        } else {
            String::new()
        };
        println!(
            "{feature}: {end_to_end}sustained {:.0} events/s over {:.2}s of processing ({cpu:.2} CPU-s{per_core}){latency}",
            summary.events as f64 / busy,
            busy
        );
    }
    println!(
        "{feature}: {} events in {:.1}s, {} window changes → {}, {} too late → {}, {} dead-lettered → {}, {} transactions",
        summary.events,
        started.elapsed().as_secs_f64(),
        summary.windows,
        topics.output,
        summary.too_late,
        topics.late,
        summary.dead_lettered,
        topics.dlq,
        summary.transactions
    );
    Ok(ExitCode::SUCCESS)
}

fn output_format(format: Option<TableFormat>) -> Option<OutputFormat> {
    format.map(|f| match f {
        TableFormat::Parquet => OutputFormat::Parquet,
        TableFormat::Delta => OutputFormat::Delta,
    })
}

async fn stream_replay(
    file: &Path,
    feature: &str,
    history: Location,
    out: Option<String>,
    late_out: Option<String>,
    format: Option<TableFormat>,
    quiet: bool,
) -> Result<ExitCode> {
    use lockstep_stream::collect::write_table;
    let (feature_set, compiled) = load_feature(file, feature)?;
    let format = output_format(format);
    let target = out
        .as_deref()
        .map(|o| OutputTarget::resolve(Some(o), format, feature_set.output.table.as_ref()))
        .transpose()?;
    let late_target = late_out.as_deref().map(|o| OutputTarget::resolve(Some(o), format, None)).transpose()?;
    let events = Arc::new(AtomicU64::new(0));
    let counted = events.clone();
    let bar = progress::Progress::follow(quiet, move || format!("{} events replayed", counted.load(Ordering::Relaxed)));
    let limits = SessionLimits::default();
    let result = lockstep_stream::replay::replay(&compiled, &history, &limits, target.is_some(), events).await;
    bar.finish();
    let output = result.with_context(|| format!("feature set `{feature}`"))?;
    let late_rows: usize = output.late.iter().map(|b| b.num_rows()).sum();
    let c = output.counters;
    let mut metadata = serde_json::Map::new();
    metadata.insert("lockstep.feature".into(), feature.into());
    metadata.insert("lockstep.replay".into(), history.url().into());
    let final_windows: usize = output.windows.iter().map(|b| b.num_rows()).sum();
    if let Some(target) = &target {
        let mut order = feature_set.key.clone();
        order.push("window_start".into());
        write_table(target, output.window_schema.clone(), output.windows, &order, &feature_set.key, metadata.clone())
            .await
            .with_context(|| format!("writing {}", target.url()))?;
    }
    if let Some(late_target) = &late_target {
        write_table(late_target, output.late_schema.clone(), output.late, &[], &[], metadata)
            .await
            .with_context(|| format!("writing {}", late_target.url()))?;
    }
    println!(
        "{feature}: replayed {} events in {:.2}s: {} windows fired ({} refired, {} retracted), {} too-late events{}{}",
        c.events,
        output.elapsed.as_secs_f64(),
        c.fired,
        c.refired,
        c.retracted,
        c.too_late,
        target.as_ref().map_or(String::new(), |t| format!("; {final_windows} final windows → {}", t.url())),
        late_target.as_ref().map_or(String::new(), |t| format!("; {late_rows} late rows → {}", t.url())),
    );
    if c.too_late > 0 && late_target.is_none() {
        eprintln!("note: {} too-late events were counted; pass --late-out URL to keep them", c.too_late);
    }
    if c.null_times > 0 {
        eprintln!("warning: {} events had no event time and were skipped", c.null_times);
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
async fn generate(
    events: u64,
    users: u32,
    days: u32,
    seed: u64,
    late_rate: f64,
    out: &str,
    format: Option<GenerateFormat>,
    quiet: bool,
) -> Result<ExitCode> {
    use lockstep_fixtures::{GenerateOptions, OutputFormat as Fmt};
    if !(0.0..=1.0).contains(&late_rate) {
        bail!("--late-rate must be between 0 and 1, got {late_rate}");
    }
    if users == 0 || days == 0 {
        bail!("--users and --days must be at least 1");
    }
    let format = match format {
        Some(GenerateFormat::Parquet) => Fmt::Parquet,
        Some(GenerateFormat::Delta) => Fmt::Delta,
        Some(GenerateFormat::Jsonl) => Fmt::Jsonl,
        None if out.ends_with(".jsonl") || out.ends_with(".json") => Fmt::Jsonl,
        None if out.ends_with(".parquet") => Fmt::Parquet,
        None => Fmt::Delta,
    };
    let options = GenerateOptions { events, users, days, seed, late_rate, ..GenerateOptions::default() };
    let started = std::time::Instant::now();
    let bar = progress::bar(quiet, events, "generating");
    let summary = lockstep_fixtures::write_events(&options, out, format, |done| bar.set_position(done))
        .await
        .with_context(|| format!("generating {out}"))?;
    bar.finish_and_clear();
    println!(
        "generated {} events ({} late, {} duplicates) in {:.2}s → {out}",
        summary.events,
        summary.late_events,
        summary.duplicates,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads `512MiB`, `2GiB`, `1GB`, `1000000` (bytes).
fn parse_bytes(text: &str) -> Result<usize> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().with_context(|| format!("`{text}` is not a size such as 512MiB or 2GiB"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "kib" | "k" => 1024.0,
        "mb" => 1e6,
        "mib" | "m" => 1024.0 * 1024.0,
        "gb" => 1e9,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("unknown size unit `{other}` in `{text}`; use MiB or GiB"),
    };
    Ok((number * scale) as usize)
}
