//! Load generator: drives a running billing-coordinator over gRPC the way a
//! fleet of billing workers would, and prints what it measured.
//!
//! `burn-down` (the default): submit N invoices, then W workers each claim B
//! at a time and complete them in one CompleteInvoices call (B = 1 uses
//! CompleteInvoice), until nothing is left. Reports invoices/s and
//! claim/complete latency percentiles.
//!
//! `--seconds S` (steady state): a producer keeps a backlog of invoices while
//! the workers drain it for S seconds; every 10 s it prints the throughput of
//! that interval and, with `--database-url`, the dead tuples PostgreSQL
//! reports. `--hold-xmin` keeps a REPEATABLE READ transaction open for the
//! whole run, pinning the xmin horizon so that vacuum can remove nothing: the
//! bloat test. `--rate R --service-pid P` submits at a fixed rate and samples
//! the service's RSS and the claim p99 of each interval: the soak test.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use billing_coordinator::proto::{
    ClaimInvoicesRequest, CompleteInvoiceRequest, CompleteInvoicesRequest, NewInvoice,
    SubmitInvoicesRequest, coordinator_service_client::CoordinatorServiceClient,
};
use clap::Parser;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// Drives a billing-coordinator with a fleet of simulated billing workers.
#[derive(Debug, Parser)]
struct Args {
    /// The service's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Invoices to submit and drain.
    #[arg(long, default_value_t = 100_000)]
    invoices: usize,
    /// Concurrent workers.
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Invoices per claim.
    #[arg(long, default_value_t = 100)]
    batch: i32,
    /// gRPC connections shared by the workers.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// A label for the output line.
    #[arg(long, default_value = "service")]
    label: String,
    /// Steady state for this many seconds instead of a burn-down.
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Steady state: invoices kept waiting.
    #[arg(long, default_value_t = 20_000)]
    backlog: usize,
    /// The service's database, for dead-tuple samples and --hold-xmin.
    #[arg(long)]
    database_url: Option<String>,
    /// Steady state: hold a transaction open for the whole run.
    #[arg(long)]
    hold_xmin: bool,
    /// Steady state: submit at this many invoices/s instead of keeping a backlog.
    #[arg(long)]
    rate: Option<u64>,
    /// Steady state: the service's process id, to sample its resident memory.
    #[arg(long)]
    service_pid: Option<u32>,
}

#[derive(Default)]
struct Latencies {
    claim: Vec<Duration>,
    complete: Vec<Duration>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.batch < 1 || args.workers == 0 || args.connections == 0 {
        bail!("--batch, --workers and --connections must be at least 1");
    }
    if args.seconds > 0 {
        return steady::run(args).await;
    }
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        channels.push(
            Channel::from_shared(args.addr.clone())?
                .connect()
                .await
                .with_context(|| format!("connecting to {}", args.addr))?,
        );
    }

    let run = format!("{:x}", rand::random::<u64>());
    let mut submitter = CoordinatorServiceClient::new(channels[0].clone());
    let invoices: Vec<NewInvoice> = (0..args.invoices)
        .map(|i| NewInvoice {
            external_id: format!("load-{run}-{i}"),
            customer_id: format!("cus-{}", i % 10_000),
            amount_minor: 1000,
            currency: "EUR".into(),
            ..Default::default()
        })
        .collect();
    for chunk in invoices.chunks(1000) {
        submitter
            .submit_invoices(SubmitInvoicesRequest {
                invoices: chunk.to_vec(),
            })
            .await
            .context("submitting")?;
    }

    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let started = Instant::now();
    let workers = (0..args.workers).map(|n| {
        let mut client = CoordinatorServiceClient::new(channels[n % channels.len()].clone());
        let latencies = latencies.clone();
        let batch = args.batch;
        tokio::spawn(async move {
            let mut mine = Latencies::default();
            let mut done = 0usize;
            loop {
                let t = Instant::now();
                let claimed = client
                    .claim_invoices(ClaimInvoicesRequest {
                        worker_id: format!("loadgen-{n}"),
                        max_count: batch,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .invoices;
                mine.claim.push(t.elapsed());
                if claimed.is_empty() {
                    break;
                }
                let completions: Vec<CompleteInvoiceRequest> = claimed
                    .iter()
                    .map(|c| CompleteInvoiceRequest {
                        invoice_id: c.invoice.as_ref().map_or(0, |i| i.invoice_id),
                        lease_token: c.lease_token.clone(),
                        provider_reference: String::new(),
                    })
                    .collect();
                let t = Instant::now();
                if completions.len() == 1 {
                    client
                        .complete_invoice(completions.into_iter().next().expect("one completion"))
                        .await?;
                } else {
                    let results = client
                        .complete_invoices(CompleteInvoicesRequest { completions })
                        .await?
                        .into_inner()
                        .results;
                    if results.iter().any(|r| r.code != 0) {
                        anyhow::bail!("a completion was refused: {results:?}");
                    }
                }
                mine.complete.push(t.elapsed());
                done += claimed.len();
            }
            let mut all = latencies.lock().await;
            all.claim.extend(mine.claim);
            all.complete.extend(mine.complete);
            anyhow::Ok(done)
        })
    });
    let mut drained = 0;
    for worker in futures::future::join_all(workers).await {
        drained += worker.context("a worker panicked")??;
    }
    let elapsed = started.elapsed();
    let mut all = latencies.lock().await;
    all.claim.sort();
    all.complete.sort();
    println!(
        "{label}: burn-down invoices={drained} workers={w} batch={b} seconds={s:.2} \
         invoices_per_s={rate:.0} claim_ms p50={c50:.2} p99={c99:.2} p999={c999:.2} \
         complete_ms p50={k50:.2} p99={k99:.2} p999={k999:.2}",
        label = args.label,
        w = args.workers,
        b = args.batch,
        s = elapsed.as_secs_f64(),
        rate = drained as f64 / elapsed.as_secs_f64(),
        c50 = percentile(&all.claim, 0.5),
        c99 = percentile(&all.claim, 0.99),
        c999 = percentile(&all.claim, 0.999),
        k50 = percentile(&all.complete, 0.5),
        k99 = percentile(&all.complete, 0.99),
        k999 = percentile(&all.complete, 0.999),
    );
    if drained != args.invoices {
        bail!("drained {drained} of {} invoices", args.invoices);
    }
    Ok(())
}

/// The steady-state mode, and the bloat and soak tests built on it.
mod steady {
    use std::{
        sync::{
            Arc, Mutex,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        time::{Duration, Instant},
    };

    use anyhow::Context;
    use billing_coordinator::proto::{
        ClaimInvoicesRequest, CompleteInvoiceRequest, CompleteInvoicesRequest, NewInvoice,
        SubmitInvoicesRequest, coordinator_service_client::CoordinatorServiceClient,
    };
    use sqlx::{Connection, PgConnection};
    use tonic::transport::Channel;

    use super::{Args, percentile};

    const SAMPLE: Duration = Duration::from_secs(10);
    /// Invoices per submission: smaller at a fixed rate, to keep it smooth;
    /// large when keeping a backlog, so that producing is never the limit.
    const RATE_CHUNK: u64 = 500;
    const BACKLOG_CHUNK: u64 = 1000;
    /// Producers, sharing the rate or keeping the backlog together.
    const PRODUCERS: usize = 4;

    async fn dead_tuples(conn: &mut PgConnection) -> anyhow::Result<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT coalesce(sum(n_dead_tup) FILTER (WHERE relname = 'invoices'), 0)::bigint,
                    coalesce(sum(n_dead_tup) FILTER (WHERE relname = 'invoice_events'), 0)::bigint
             FROM pg_stat_user_tables",
        )
        .fetch_one(conn)
        .await?)
    }

    /// The resident memory of process `pid`, in MiB.
    fn rss_mib(pid: u32) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    struct Shared {
        submitted: AtomicU64,
        completed: AtomicU64,
        stop: AtomicBool,
        claims: Mutex<Vec<Duration>>,
    }

    /// Keeps the backlog topped up, or submits at a fixed rate.
    async fn produce(
        mut client: CoordinatorServiceClient<Channel>,
        shared: Arc<Shared>,
        rate: Option<u64>,
        backlog: u64,
    ) -> anyhow::Result<()> {
        let run = format!("{:x}", rand::random::<u64>());
        let chunk = if rate.is_some() {
            RATE_CHUNK
        } else {
            BACKLOG_CHUNK
        };
        let started = Instant::now();
        let mut n = 0u64;
        while !shared.stop.load(Ordering::SeqCst) {
            let due = match rate {
                Some(rate) => (started.elapsed().as_secs_f64() * rate as f64) as u64 >= n + chunk,
                None => {
                    shared.submitted.load(Ordering::SeqCst)
                        - shared.completed.load(Ordering::SeqCst)
                        < backlog
                }
            };
            if !due {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let invoices: Vec<NewInvoice> = (0..chunk)
                .map(|i| NewInvoice {
                    external_id: format!("steady-{run}-{}", n + i),
                    customer_id: format!("cus-{}", (n + i) % 10_000),
                    amount_minor: 1000,
                    currency: "EUR".into(),
                    ..Default::default()
                })
                .collect();
            n += chunk;
            client
                .submit_invoices(SubmitInvoicesRequest { invoices })
                .await?;
            shared.submitted.fetch_add(chunk, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Claims and completes until told to stop.
    async fn work(
        mut client: CoordinatorServiceClient<Channel>,
        shared: Arc<Shared>,
        name: String,
        batch: i32,
        measure_claims_alone: bool,
    ) -> anyhow::Result<()> {
        while !shared.stop.load(Ordering::SeqCst) {
            let t = Instant::now();
            let claimed = client
                .claim_invoices(ClaimInvoicesRequest {
                    worker_id: name.clone(),
                    max_count: batch,
                    wait: (!measure_claims_alone).then_some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await;
            let claimed = match claimed {
                Ok(answer) => answer.into_inner().invoices,
                // A worker rides out an overloaded or restarting service.
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(status) => return Err(status.into()),
            };
            let took = t.elapsed();
            if claimed.is_empty() {
                if measure_claims_alone {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                continue;
            }
            shared.claims.lock().expect("latencies").push(took);
            let completions: Vec<CompleteInvoiceRequest> = claimed
                .iter()
                .map(|c| CompleteInvoiceRequest {
                    invoice_id: c.invoice.as_ref().map_or(0, |i| i.invoice_id),
                    lease_token: c.lease_token.clone(),
                    provider_reference: String::new(),
                })
                .collect();
            let n = completions.len() as u64;
            client
                .complete_invoices(CompleteInvoicesRequest { completions })
                .await?;
            shared.completed.fetch_add(n, Ordering::SeqCst);
        }
        Ok(())
    }

    pub async fn run(args: Args) -> anyhow::Result<()> {
        let channel = Channel::from_shared(args.addr.clone())?.connect().await?;
        let shared = Arc::new(Shared {
            submitted: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            claims: Mutex::new(Vec::new()),
        });

        // Pin the xmin horizon: a snapshot held open for the whole run.
        let mut pin = None;
        if args.hold_xmin {
            let url = args
                .database_url
                .as_deref()
                .context("--hold-xmin needs --database-url")?;
            let mut conn = PgConnection::connect(url).await?;
            sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM invoices;")
                .execute(&mut conn)
                .await?;
            pin = Some(conn);
        }
        let mut stats = match &args.database_url {
            Some(url) => Some(PgConnection::connect(url).await?),
            None => None,
        };

        let producers: Vec<_> = (0..PRODUCERS)
            .map(|_| {
                tokio::spawn(produce(
                    CoordinatorServiceClient::new(channel.clone()),
                    shared.clone(),
                    args.rate.map(|rate| rate / PRODUCERS as u64),
                    args.backlog as u64,
                ))
            })
            .collect();
        let workers: Vec<_> = (0..args.workers)
            .map(|w| {
                tokio::spawn(work(
                    CoordinatorServiceClient::new(channel.clone()),
                    shared.clone(),
                    format!("steady-{w}"),
                    args.batch,
                    // At a fixed rate workers are often idle, and a long-poll's
                    // wait for work is not claim latency.
                    args.rate.is_some(),
                ))
            })
            .collect();

        let started = Instant::now();
        let (mut last, mut rates, mut p99s, mut rss_peak) = (0, Vec::new(), Vec::new(), 0f64);
        while started.elapsed() < Duration::from_secs(args.seconds) {
            tokio::time::sleep(SAMPLE).await;
            let now = shared.completed.load(Ordering::SeqCst);
            let rate = (now - last) as f64 / SAMPLE.as_secs_f64();
            last = now;
            rates.push(rate);
            let dead = match stats.as_mut() {
                Some(conn) => dead_tuples(conn).await?,
                None => (0, 0),
            };
            let mut interval = std::mem::take(&mut *shared.claims.lock().expect("latencies"));
            interval.sort();
            let p99 = percentile(&interval, 0.99);
            p99s.push(p99);
            let rss = args.service_pid.and_then(rss_mib);
            rss_peak = rss_peak.max(rss.unwrap_or(0.0));
            println!(
                "{label}: t={t:>4}s invoices_per_s={rate:.0} claim_p99_ms={p99:.2}{rss} \
                 dead_tuples invoices={d1} invoice_events={d2}",
                label = args.label,
                t = started.elapsed().as_secs(),
                rss = rss.map_or(String::new(), |m| format!(" service_rss_mib={m:.1}")),
                d1 = dead.0,
                d2 = dead.1,
            );
        }
        shared.stop.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.await??;
        }
        for producer in producers {
            producer.await??;
        }
        drop(pin);
        let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
        p99s.sort_by(f64::total_cmp);
        println!(
            "{label}: steady seconds={s} hold_xmin={h} mean_invoices_per_s={mean:.0} \
             last_interval={last:.0} worst_interval_claim_p99_ms={worst:.2} peak_rss_mib={rss_peak:.1}",
            label = args.label,
            s = args.seconds,
            h = args.hold_xmin,
            last = rates.last().copied().unwrap_or(0.0),
            worst = p99s.last().copied().unwrap_or(0.0),
        );
        Ok(())
    }
}
