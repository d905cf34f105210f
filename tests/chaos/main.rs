//! The chaos run: proves "never twice, never lost" under crashes.
//!
//! ```text
//! cargo test --release --test chaos            # 100,000 invoices (the default profile)
//! cargo test --test chaos -- --quick           # 10,000 invoices, in CI
//! cargo test --test chaos -- --help            # every knob
//! ```
//!
//! It starts a private PostgreSQL, several replicas of the real
//! `billing-coordinator` binary against it, and many worker processes (this
//! same executable, with `--worker`). Workers claim invoices, charge them
//! through a fake billing provider (the "referee", in this process, which
//! records every charge with its idempotency key), then complete them. Some
//! workers SIGKILL themselves mid-lease, some stall past their lease before
//! charging and completing, some release with an error. Meanwhile replicas
//! are SIGKILLed and restarted on a schedule, and PostgreSQL is crash-
//! restarted (immediate mode) at least twice.
//!
//! At the end it checks, from the database, the audit trail and the
//! referee's record, that every invoice was completed exactly once and none
//! was lost or stuck, that every completion made with a superseded token was
//! refused with LEASE_LOST, how often the provider saw the same idempotency
//! key (and so absorbed a second charge), and how long a crashed worker's
//! invoices took to become claimable again. It prints a report and exits
//! non-zero if an invariant broke.

#[path = "../support/mod.rs"]
mod support;

mod referee;
mod report;
mod worker;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use billing_coordinator::proto::{
    NewInvoice, SubmitInvoicesRequest, coordinator_service_client::CoordinatorServiceClient,
};
use clap::Parser;
use rand::Rng;
use sqlx::{Connection, PgConnection};
use tokio::{process::Child, sync::Mutex};

use support::postgres::PgServer;

/// Chaos run for billing-coordinator.
#[derive(Debug, Clone, Parser)]
pub struct Args {
    /// Run as one worker process (used by the run itself).
    #[arg(long, hide = true)]
    worker: bool,
    /// The quick profile for CI: 10,000 invoices, same chaos, under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// Invoices to bill.
    #[arg(long, default_value_t = 100_000)]
    invoices: usize,
    /// Concurrent worker processes.
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Service replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Invoices per claim.
    #[arg(long, default_value_t = 5)]
    batch: i32,
    /// Lease duration (the TTL), in milliseconds.
    #[arg(long, default_value_t = 2000)]
    lease_ms: u64,
    /// Percent of leases whose worker is SIGKILLed mid-lease.
    #[arg(long, default_value_t = 10.0)]
    kill_pct: f64,
    /// Percent of leases whose worker stalls past the lease, then charges and completes.
    #[arg(long, default_value_t = 5.0)]
    stall_pct: f64,
    /// Percent of leases released as failed (a provider error).
    #[arg(long, default_value_t = 5.0)]
    fail_pct: f64,
    /// Seconds between SIGKILLs of a random replica (which is restarted).
    #[arg(long, default_value_t = 5)]
    replica_kill_every: u64,
    /// PostgreSQL crash-restarts, spread over the run.
    #[arg(long, default_value_t = 2)]
    pg_restarts: usize,
    /// Give up (and fail) after this many seconds.
    #[arg(long, default_value_t = 1200)]
    timeout_s: u64,
    /// Worker mode: the replicas' addresses.
    #[arg(long, hide = true, value_delimiter = ',')]
    addrs: Vec<String>,
    /// Worker mode: the referee's address.
    #[arg(long, hide = true)]
    referee: Option<SocketAddr>,
    /// Worker mode: this worker's name.
    #[arg(long, hide = true, default_value = "worker")]
    name: String,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse_from(std::env::args().filter(|a| a != "--nocapture"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.worker {
        return runtime.block_on(worker::run(args));
    }
    if args.quick {
        args.invoices = 10_000;
        args.timeout_s = 170;
    }
    let started = Instant::now();
    let report = runtime.block_on(run(args.clone()))?;
    report.print(&args, started.elapsed());
    if !report.broken().is_empty() {
        for broken in report.broken() {
            eprintln!("INVARIANT BROKEN: {broken}");
        }
        std::process::exit(1);
    }
    println!("chaos: all invariants held");
    Ok(())
}

/// A replica process and how to start it again.
struct Replica {
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_replica(database_url: &str, replica: &mut Replica) -> anyhow::Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&replica.log)?;
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_billing-coordinator"))
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("BC_LISTEN_ADDR", format!("127.0.0.1:{}", replica.port))
        .env("BC_METRICS_ADDR", "off")
        .env("BC_MIGRATE", "true")
        .env("BC_DB_MAX_CONNECTIONS", "8")
        .env("BC_DB_ACQUIRE_TIMEOUT", "2s")
        .env("BC_DEFAULT_MAX_ATTEMPTS", "100")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting a replica")?;
    replica.child = Some(child);
    Ok(())
}

async fn wait_serving(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut client) =
            CoordinatorServiceClient::connect(format!("http://127.0.0.1:{port}")).await
            && client
                .get_queue_stats(billing_coordinator::proto::GetQueueStatsRequest {
                    queue: "none".into(),
                })
                .await
                .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("replica on port {port} did not start serving")
}

/// What the run observed, for the report.
pub struct Observed {
    pub replica_kills: usize,
    pub pg_restarts: Vec<(SystemTime, SystemTime)>,
    pub worker_processes: usize,
    pub drained: bool,
}

async fn run(args: Args) -> anyhow::Result<report::Report> {
    let pg = Arc::new(PgServer::start_private().context("starting a private PostgreSQL")?);
    let database_url = pg.create_database().await?;
    let dir = std::env::temp_dir().join(format!("bc-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let mut replicas = Vec::with_capacity(args.replicas);
    for n in 0..args.replicas {
        let mut replica = Replica {
            port: free_port()?,
            child: None,
            log: dir.join(format!("replica-{n}.log")),
        };
        start_replica(&database_url, &mut replica).await?;
        replicas.push(replica);
    }
    for replica in &replicas {
        wait_serving(replica.port).await?;
    }
    let addrs: Vec<String> = replicas
        .iter()
        .map(|r| format!("http://127.0.0.1:{}", r.port))
        .collect();

    let mut client = CoordinatorServiceClient::connect(addrs[0].clone()).await?;
    let all: Vec<NewInvoice> = (0..args.invoices)
        .map(|i| NewInvoice {
            external_id: format!("chaos-{i}"),
            customer_id: format!("cus-{}", i % 5000),
            amount_minor: 100 + i as i64,
            currency: "EUR".into(),
            max_attempts: 100,
            ..Default::default()
        })
        .collect();
    for chunk in all.chunks(1000) {
        client
            .submit_invoices(SubmitInvoicesRequest {
                invoices: chunk.to_vec(),
            })
            .await
            .context("submitting")?;
    }
    eprintln!(
        "chaos: {} invoices submitted; {} replicas, {} workers, lease {} ms",
        args.invoices, args.replicas, args.workers, args.lease_ms
    );

    let referee = referee::Referee::start().await?;
    let done = Arc::new(AtomicBool::new(false));
    let spawned = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    // Workers: a supervisor per slot starts a new process whenever one dies.
    let mut supervisors = Vec::new();
    for slot in 0..args.workers {
        let (args, addrs, referee_addr, done, spawned) = (
            args.clone(),
            addrs.clone(),
            referee.addr,
            done.clone(),
            spawned.clone(),
        );
        supervisors.push(tokio::spawn(async move {
            let mut generation = 0;
            while !done.load(Ordering::SeqCst) {
                generation += 1;
                spawned.fetch_add(1, Ordering::SeqCst);
                let child = tokio::process::Command::new(std::env::current_exe()?)
                    .arg("--worker")
                    .arg("--addrs")
                    .arg(addrs.join(","))
                    .arg("--referee")
                    .arg(referee_addr.to_string())
                    .arg("--name")
                    .arg(format!("w{slot}.{generation}"))
                    .arg("--batch")
                    .arg(args.batch.to_string())
                    .arg("--lease-ms")
                    .arg(args.lease_ms.to_string())
                    .arg("--kill-pct")
                    .arg(args.kill_pct.to_string())
                    .arg("--stall-pct")
                    .arg(args.stall_pct.to_string())
                    .arg("--fail-pct")
                    .arg(args.fail_pct.to_string())
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .spawn();
                let mut child = child.context("starting a worker")?;
                loop {
                    tokio::select! {
                        _ = child.wait() => break,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {
                            if done.load(Ordering::SeqCst) {
                                let _ = child.kill().await;
                                return anyhow::Ok(());
                            }
                        }
                    }
                }
            }
            anyhow::Ok(())
        }));
    }

    // Replica chaos: SIGKILL one at random, restart it half a second later.
    let replicas = Arc::new(Mutex::new(replicas));
    let replica_kills = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let chaos = {
        let (replicas, done, kills, url, every) = (
            replicas.clone(),
            done.clone(),
            replica_kills.clone(),
            database_url.clone(),
            Duration::from_secs(args.replica_kill_every),
        );
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                tokio::time::sleep(every).await;
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let mut replicas = replicas.lock().await;
                let n = rand::rng().random_range(0..replicas.len());
                if let Some(mut child) = replicas[n].child.take() {
                    let _ = child.kill().await; // SIGKILL
                    kills.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                start_replica(&url, &mut replicas[n]).await?;
            }
            anyhow::Ok(())
        })
    };

    // Progress, and PostgreSQL crash-restarts spread over it.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let restart_at: Vec<i64> = (1..=args.pg_restarts)
        .map(|k| (args.invoices * k / (args.pg_restarts + 1)) as i64)
        .collect();
    let mut pg_restarts = Vec::new();
    let mut drained = false;
    let mut last_print = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(completed) = count_completed(&database_url).await else {
            continue;
        };
        if completed as usize >= args.invoices {
            drained = true;
            break;
        }
        if pg_restarts.len() < restart_at.len() && completed >= restart_at[pg_restarts.len()] {
            let pg = pg.clone();
            let down = SystemTime::now();
            eprintln!("chaos: crash-restarting PostgreSQL at {completed} completed");
            tokio::task::spawn_blocking(move || pg.restart_immediate()).await??;
            pg_restarts.push((down, SystemTime::now()));
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            eprintln!("chaos: {completed}/{} completed", args.invoices);
            last_print = Instant::now();
        }
    }
    done.store(true, Ordering::SeqCst);
    for supervisor in supervisors {
        supervisor.await??;
    }
    chaos.await??;
    // Drain the replicas with SIGTERM, as Kubernetes would.
    for replica in replicas.lock().await.iter_mut() {
        if let Some(child) = replica.child.as_mut()
            && let Some(pid) = child.id()
        {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    let observed = Observed {
        replica_kills: replica_kills.load(Ordering::SeqCst),
        pg_restarts,
        worker_processes: spawned.load(Ordering::SeqCst),
        drained,
    };
    let record = referee.finish().await;
    let report = report::Report::gather(&database_url, &args, observed, record).await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

async fn count_completed(database_url: &str) -> anyhow::Result<i64> {
    let mut conn = PgConnection::connect(database_url).await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM invoices WHERE state = 'completed'")
        .fetch_one(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(n)
}
