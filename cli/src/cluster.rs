//! `lockstep scheduler` and `lockstep executor`: a Ballista cluster started from this binary,
//! with lockstep's window stage, codecs and query planner registered, so `--cluster` jobs run
//! the same kernels as in-process ones.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use lockstep_batch::SessionLimits;
use lockstep_batch::cluster::{GRPC_MESSAGE_LIMIT, LockstepLogicalCodec, LockstepPhysicalCodec};

#[derive(clap::Args)]
pub struct SchedulerArgs {
    /// Address to listen on for clients and executors.
    #[arg(long, default_value = "127.0.0.1:50050")]
    listen: std::net::SocketAddr,
    /// The host name clients and executors reach this scheduler at (default: the listen address).
    #[arg(long)]
    external_host: Option<String>,
    /// Seconds without a heartbeat after which an executor counts as lost and its tasks, and the
    /// shuffle output it held, are computed again elsewhere.
    #[arg(long, default_value_t = 30)]
    executor_timeout: u64,
}

#[derive(clap::Args)]
pub struct ExecutorArgs {
    /// The scheduler, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:50050")]
    scheduler: String,
    /// Address to bind the executor's services to.
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// The host name other executors and clients reach this one at (default: --bind).
    #[arg(long)]
    external_host: Option<String>,
    /// Arrow Flight port (shuffle data and results are fetched from it).
    #[arg(long, default_value_t = 50051)]
    port: u16,
    /// gRPC port the scheduler talks to.
    #[arg(long, default_value_t = 50052)]
    grpc_port: u16,
    /// Tasks run at once (default: the number of cores).
    #[arg(long)]
    slots: Option<usize>,
    /// Folder for shuffle files (default: a temporary folder).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Memory for sorts across all running tasks before they spill to disk, e.g. 2GiB.
    #[arg(long, default_value = "2GiB")]
    memory_limit: String,
    /// Seconds between heartbeats to the scheduler.
    #[arg(long, default_value_t = 5)]
    heartbeat: u64,
}

pub async fn scheduler(args: SchedulerArgs) -> Result<ExitCode> {
    let config = SchedulerConfig {
        bind_host: args.listen.ip().to_string(),
        bind_port: args.listen.port(),
        external_host: args.external_host.unwrap_or_else(|| args.listen.ip().to_string()),
        executor_timeout_seconds: args.executor_timeout,
        expire_dead_executor_interval_seconds: args.executor_timeout.clamp(1, 15),
        no_executors_grace_period_seconds: args.executor_timeout,
        grpc_server_max_decoding_message_size: GRPC_MESSAGE_LIMIT as u32,
        grpc_server_max_encoding_message_size: GRPC_MESSAGE_LIMIT as u32,
        grpc_client_max_message_size: GRPC_MESSAGE_LIMIT as u32,
        override_session_builder: Some(Arc::new(lockstep_batch::cluster::scheduler_session)),
        override_config_producer: Some(Arc::new(|| lockstep_batch::cluster::cluster_config(&SessionLimits::default()))),
        override_logical_codec: Some(Arc::new(LockstepLogicalCodec::default())),
        override_physical_codec: Some(Arc::new(LockstepPhysicalCodec::default())),
        ..SchedulerConfig::default()
    };
    let cluster = BallistaCluster::new_from_config(&config).await.context("cannot set up the scheduler")?;
    println!("lockstep scheduler listening on df://{}", args.listen);
    ballista_scheduler::scheduler_process::start_server(cluster, args.listen, Arc::new(config))
        .await
        .context("the scheduler stopped")?;
    Ok(ExitCode::SUCCESS)
}

pub async fn executor(args: ExecutorArgs) -> Result<ExitCode> {
    let (scheduler_host, scheduler_port) = args
        .scheduler
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)))
        .with_context(|| format!("--scheduler takes HOST:PORT, not `{}`", args.scheduler))?;
    let memory = crate::parse_bytes(&args.memory_limit)? as u64;
    let defaults = ballista_executor::executor_process::ExecutorProcessConfig::default();
    let config = ballista_executor::executor_process::ExecutorProcessConfig {
        bind_host: args.bind.clone(),
        external_host: Some(args.external_host.unwrap_or(args.bind)),
        port: args.port,
        grpc_port: args.grpc_port,
        scheduler_host,
        scheduler_port,
        scheduler_connect_timeout_seconds: 30,
        vcores: args.slots.unwrap_or(defaults.vcores),
        work_dir: args.work_dir.map(|p| p.display().to_string()),
        memory_pool_size: Some(memory),
        executor_heartbeat_interval_seconds: args.heartbeat,
        grpc_max_decoding_message_size: GRPC_MESSAGE_LIMIT as u32,
        grpc_max_encoding_message_size: GRPC_MESSAGE_LIMIT as u32,
        override_config_producer: Some(Arc::new(|| lockstep_batch::cluster::cluster_config(&SessionLimits::default()))),
        override_logical_codec: Some(Arc::new(LockstepLogicalCodec::default())),
        override_physical_codec: Some(Arc::new(LockstepPhysicalCodec::default())),
        ..defaults
    };
    println!(
        "lockstep executor on {}:{} (flight) / {} (grpc), scheduler {}",
        config.bind_host, config.port, config.grpc_port, args.scheduler
    );
    ballista_executor::executor_process::start_executor_process(Arc::new(config))
        .await
        .context("the executor stopped")?;
    Ok(ExitCode::SUCCESS)
}
