//! Load generator: drives a running billing-coordinator over gRPC the way a
//! fleet of billing workers would, and prints what it measured.
//!
//! `burn-down` (the default): submit N invoices, then W workers each claim B
//! at a time and complete them in one CompleteInvoices call (B = 1 uses
//! CompleteInvoice), until nothing is left. Reports invoices/s and
//! claim/complete latency percentiles. With `--database-url`, the table is
//! vacuumed, analyzed and checkpointed between submitting and draining, as
//! the peer benchmarks do, and the WAL written per invoice is reported.
//!
//! `--seconds S` (steady state): a producer keeps a backlog of invoices while
//! the workers drain it for S seconds; every 10 s it prints the throughput of
//! that interval and, with `--database-url`, the dead tuples PostgreSQL
//! reports. `--hold-xmin` keeps a REPEATABLE READ transaction open for the
//! whole run, pinning the xmin horizon so that vacuum can remove nothing: the
//! bloat test. `--rate R --service-pid P` submits at a fixed rate and samples
//! the service's RSS and the claim p99 of each interval: the soak test.
//!
//! `--mode idle-pickup`: W workers long-poll a queue of the run's own; one
//! invoice at a time is submitted to it, `--tries` times, and timed from the
//! submission to the claim that returns it. With `--database-url`, also the
//! transactions the database committed per pickup: whether one submission
//! wakes one waiting claim or all of them.
//!
//! `--mode sustained --rate R [--seconds S]`: invoices arrive at R a second
//! for S seconds (default 20) while W workers long-poll claims of B; reports
//! the completion rate achieved and, after a 2 s warm-up, each invoice's
//! pickup latency (submission to claim) and the latency of claims that
//! found work already waiting (a long-poll that waited for its invoice
//! measures the arrival rate, not the claim). It also says whether the run
//! kept up with R (see `sustained::kept_up`): bench/run.sh searches for the
//! highest rate that does. With `--database-url`, the run starts right
//! after a checkpoint.
//!
//! `--mode ceiling --database-url URL`: the service's own claim and
//! completion statements run straight against the database, with C
//! connections and one worker on each, claiming B at a time: the raw-SQL
//! ceiling, without gRPC or the service's merging of claims. Settled and
//! reported like a burn-down with `--database-url`.
//!
//! Every mode ends with a human line and one `RESULT {json}` line for
//! scripts (`"mode"`, `"label"`, `"workers"`, `"batch"` and the mode's own
//! figures, latencies as `{"p50","p99","p999"}` in milliseconds); with
//! `--service-pid` it also holds the service's peak resident memory and the
//! CPU cores it kept busy on average over the measured part of the run.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use billing_coordinator::proto::{
    ClaimInvoicesRequest, ClaimedInvoice, CompleteInvoiceRequest, CompleteInvoicesRequest,
    NewInvoice, SubmitInvoicesRequest, coordinator_service_client::CoordinatorServiceClient,
};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// What the run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Submit `--invoices`, then drain them as fast as the workers can.
    BurnDown,
    /// Keep a backlog (or `--rate`) for `--seconds` and report each interval.
    Steady,
    /// With every worker long-polling, submit one invoice at a time and time
    /// how long it takes to be claimed.
    IdlePickup,
    /// Submit at `--rate` for `--seconds` and time each invoice from its
    /// submission to its claim.
    Sustained,
    /// Run the service's claim and completion statements straight against
    /// `--database-url`, on `--connections` connections: the raw-SQL ceiling.
    Ceiling,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::BurnDown => "burn-down",
            Self::Steady => "steady",
            Self::IdlePickup => "idle-pickup",
            Self::Sustained => "sustained",
            Self::Ceiling => "ceiling",
        }
    }
}

/// Drives a billing-coordinator with a fleet of simulated billing workers.
#[derive(Debug, Parser)]
struct Args {
    /// What to measure. Without it, `--seconds` above zero means steady and
    /// anything else a burn-down, as before the flag existed.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
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
    /// gRPC connections shared by the workers; in a ceiling run, database
    /// connections, each with a worker of its own.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// A label for the output line.
    #[arg(long, default_value = "service")]
    label: String,
    /// Steady state for this many seconds instead of a burn-down; the length
    /// of a sustained run (default 20).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Steady state: invoices kept waiting.
    #[arg(long, default_value_t = 20_000)]
    backlog: usize,
    /// The service's database: for dead-tuple samples and --hold-xmin, the
    /// transactions of an idle pickup, and the statements of a ceiling run.
    #[arg(long)]
    database_url: Option<String>,
    /// Steady state: hold a transaction open for the whole run.
    #[arg(long)]
    hold_xmin: bool,
    /// Steady state: submit at this many invoices/s instead of keeping a
    /// backlog. Sustained: the rate, required.
    #[arg(long)]
    rate: Option<u64>,
    /// Idle pickup: invoices submitted, one at a time.
    #[arg(long, default_value_t = 200)]
    tries: usize,
    /// The service's process id, to sample its resident memory and CPU time.
    #[arg(long)]
    service_pid: Option<u32>,
    /// Drains and sustained runs: wait up to this many seconds for a quiet
    /// machine (under 0.3 cores busy for 2 s) before measuring, as the peer
    /// scripts do. With `--database-url` on a local server, the result also
    /// says how much CPU processes other than the server, the service and
    /// loadgen used meanwhile.
    #[arg(long, default_value_t = 0)]
    quiet_wait: u64,
    /// Mark the result `"discarded"` if processes other than the server,
    /// the service and loadgen kept more than this many cores busy (the
    /// peer scripts discard theirs above 0.35).
    #[arg(long)]
    max_foreign_cores: Option<f64>,
}

impl Args {
    fn mode(&self) -> Mode {
        self.mode.unwrap_or(if self.seconds > 0 {
            Mode::Steady
        } else {
            Mode::BurnDown
        })
    }
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

/// Rounds to `places` decimals, so that the JSON carries no false precision.
fn round(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

/// One completion request per claimed invoice, as a worker that billed them
/// all would send.
fn completions_of(claimed: &[ClaimedInvoice]) -> Vec<CompleteInvoiceRequest> {
    claimed
        .iter()
        .map(|c| CompleteInvoiceRequest {
            invoice_id: c.invoice.as_ref().map_or(0, |i| i.invoice_id),
            lease_token: c.lease_token.clone(),
            provider_reference: String::new(),
        })
        .collect()
}

/// Completes what a claim returned: CompleteInvoice for one invoice,
/// CompleteInvoices for more. A refused completion is an error, since in a
/// benchmark no lease should be lost.
async fn complete_claimed(
    client: &mut CoordinatorServiceClient<Channel>,
    claimed: &[ClaimedInvoice],
) -> anyhow::Result<()> {
    match <[CompleteInvoiceRequest; 1]>::try_from(completions_of(claimed)) {
        Ok([one]) => {
            client.complete_invoice(one).await?;
        }
        Err(completions) => {
            let results = client
                .complete_invoices(CompleteInvoicesRequest { completions })
                .await?
                .into_inner()
                .results;
            if results.iter().any(|r| r.code != 0) {
                bail!("a completion was refused: {results:?}");
            }
        }
    }
    Ok(())
}

/// Readies the table for a drain the way the peer benchmarks do, so that
/// every system starts from the same state: statistics fresh, dead rows
/// gone, dirty pages written. Then waits for a quiet machine (`--quiet-wait`)
/// and notes where the WAL stands.
async fn settle(url: &str, args: &Args) -> anyhow::Result<Settled> {
    let mut conn = PgConnection::connect(url).await?;
    for statement in [
        "VACUUM ANALYZE invoices",
        "VACUUM ANALYZE invoice_events",
        "CHECKPOINT",
    ] {
        sqlx::raw_sql(statement)
            .execute(&mut conn)
            .await
            .with_context(|| format!("settling the table before the drain: {statement}"))?;
    }
    let cluster = machine::cluster_pid(&mut conn).await;
    let quiet = machine::wait_quiet(Duration::from_secs(args.quiet_wait)).await;
    let meter = machine::Meter::start(quiet, [cluster, args.service_pid]);
    let at = Wal::position(&mut conn).await?;
    Ok(Settled {
        wal: Wal { conn, at },
        meter,
    })
}

/// A database and machine ready for a drain, measured from then on.
struct Settled {
    wal: Wal,
    meter: machine::Meter,
}

impl Settled {
    /// What the drain of `invoices` wrote, and what else ran meanwhile.
    async fn finish(self, invoices: usize) -> anyhow::Result<(WalSpan, machine::Noise)> {
        let noise = self.meter.finish();
        Ok((self.wal.span(invoices).await?, noise))
    }
}

/// The WAL a drain wrote: with fsync on, flushing it is most of what a
/// commit waits for, so bytes per invoice explain throughput across systems.
struct Wal {
    conn: PgConnection,
    at: Lsn,
}

/// A WAL position: as a byte count, and as PostgreSQL writes it, the form
/// `pg_waldump --start/--end` takes (`bench/walprofile.sh`).
struct Lsn {
    bytes: i64,
    text: String,
}

/// What a drain wrote to the WAL.
struct WalSpan {
    per_invoice: f64,
    from: String,
    to: String,
}

impl Wal {
    async fn position(conn: &mut PgConnection) -> anyhow::Result<Lsn> {
        let (bytes, text) = sqlx::query_as(
            "SELECT pg_wal_lsn_diff(lsn, '0/0')::bigint, lsn::text
             FROM pg_current_wal_lsn() AS lsn",
        )
        .fetch_one(conn)
        .await?;
        Ok(Lsn { bytes, text })
    }

    /// What was written since [`settle`], and the bytes per invoice.
    async fn span(mut self, invoices: usize) -> anyhow::Result<WalSpan> {
        let now = Self::position(&mut self.conn).await?;
        Ok(WalSpan {
            per_invoice: (now.bytes - self.at.bytes) as f64 / invoices.max(1) as f64,
            from: self.at.text,
            to: now.text,
        })
    }
}

/// `{"p50", "p99", "p999"}` of sorted latencies, in milliseconds.
fn percentiles(sorted: &[Duration]) -> Value {
    json!({
        "p50": round(percentile(sorted, 0.5), 3),
        "p99": round(percentile(sorted, 0.99), 3),
        "p999": round(percentile(sorted, 0.999), 3),
    })
}

/// Prints the one `RESULT {json}` line of a run: the keys every mode shares,
/// then the mode's own `fields` (an object).
fn report(args: &Args, workers: usize, service: Option<service::Usage>, fields: Value) {
    let mut line = with(
        json!({
            "mode": args.mode().name(),
            "label": args.label,
            "workers": workers,
            "batch": args.batch,
        }),
        fields,
    );
    if let Some(usage) = service {
        line["service"] = json!({
            "peak_rss_mib": round(usage.peak_rss_mib, 1),
            "cpu_cores": round(usage.cpu_cores, 3),
        });
    }
    println!("RESULT {line}");
}

/// `fields`, an object, with the keys of the object `more` added.
fn with(mut fields: Value, more: Value) -> Value {
    if let (Some(fields), Value::Object(more)) = (fields.as_object_mut(), more) {
        fields.extend(more);
    }
    fields
}

/// The human line and the `RESULT` line of a drain (burn-down or ceiling):
/// `workers` are the concurrent claimers, connections in a ceiling run.
fn report_drain(
    args: &Args,
    workers: usize,
    usage: Option<service::Usage>,
    drained: usize,
    elapsed: Duration,
    all: &mut Latencies,
    settled: Option<(WalSpan, machine::Noise)>,
) {
    all.claim.sort();
    all.complete.sort();
    let mode = args.mode();
    let rate = drained as f64 / elapsed.as_secs_f64();
    let claimers = if mode == Mode::Ceiling {
        "connections"
    } else {
        "workers"
    };
    println!(
        "{label}: {mode} invoices={drained} {claimers}={workers} batch={b} seconds={s:.2} \
         invoices_per_s={rate:.0} claim_ms p50={c50:.2} p99={c99:.2} p999={c999:.2} \
         complete_ms p50={k50:.2} p99={k99:.2} p999={k999:.2}",
        label = args.label,
        mode = mode.name(),
        b = args.batch,
        s = elapsed.as_secs_f64(),
        c50 = percentile(&all.claim, 0.5),
        c99 = percentile(&all.claim, 0.99),
        c999 = percentile(&all.claim, 0.999),
        k50 = percentile(&all.complete, 0.5),
        k99 = percentile(&all.complete, 0.99),
        k999 = percentile(&all.complete, 0.999),
    );
    let (wal, noise) = settled.unzip();
    let mut fields = json!({
        "invoices": drained,
        "seconds": round(elapsed.as_secs_f64(), 3),
        "invoices_per_s": round(rate, 1),
        "claim_ms": percentiles(&all.claim),
        "complete_ms": percentiles(&all.complete),
        "wal_bytes_per_invoice": wal.as_ref().map(|w| round(w.per_invoice, 0)),
        "wal_lsn": wal.map(|w| json!({"from": w.from, "to": w.to})),
    });
    if mode == Mode::Ceiling {
        fields["connections"] = json!(workers);
    }
    if let Some(noise) = noise {
        fields = with(fields, noise.fields(args.max_foreign_cores));
    }
    report(args, workers, usage, fields);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.batch < 1 || args.workers == 0 || args.connections == 0 {
        bail!("--batch, --workers and --connections must be at least 1");
    }
    match args.mode() {
        Mode::BurnDown => burn_down(args).await,
        Mode::Steady if args.seconds == 0 => bail!("--mode steady needs --seconds"),
        Mode::Steady => steady::run(args).await,
        Mode::IdlePickup => idle_pickup::run(args).await,
        Mode::Sustained => sustained::run(args).await,
        Mode::Ceiling => ceiling::run(args).await,
    }
}

/// The `--connections` gRPC connections the workers share.
async fn connect(args: &Args) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        channels.push(
            Channel::from_shared(args.addr.clone())?
                .connect()
                .await
                .with_context(|| format!("connecting to {}", args.addr))?,
        );
    }
    Ok(channels)
}

/// Submits `--invoices`, then drains them with `--workers` workers.
async fn burn_down(args: Args) -> anyhow::Result<()> {
    let channels = connect(&args).await?;
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

    let settled = match &args.database_url {
        Some(url) => Some(settle(url, &args).await?),
        None => None,
    };

    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let monitor = service::Monitor::start(args.service_pid)?;
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
                let t = Instant::now();
                complete_claimed(&mut client, &claimed).await?;
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
    let usage = monitor.map(service::Monitor::finish);
    let settled = match settled {
        Some(settled) => Some(settled.finish(drained).await?),
        None => None,
    };
    let mut all = latencies.lock().await;
    report_drain(
        &args,
        args.workers,
        usage,
        drained,
        elapsed,
        &mut all,
        settled,
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
        ClaimInvoicesRequest, CompleteInvoicesRequest, NewInvoice, SubmitInvoicesRequest,
        coordinator_service_client::CoordinatorServiceClient,
    };
    use serde_json::json;
    use sqlx::{Connection, PgConnection};
    use tonic::transport::Channel;

    use super::{Args, completions_of, percentile, report, round, service};

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
            let completions = completions_of(&claimed);
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

        let monitor = service::Monitor::start(args.service_pid)?;
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
            let rss = args.service_pid.and_then(service::rss_mib);
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
        let usage = monitor.map(service::Monitor::finish);
        if let Some(usage) = &usage {
            rss_peak = rss_peak.max(usage.peak_rss_mib);
        }
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
        report(
            &args,
            args.workers,
            usage,
            json!({
                "seconds": args.seconds,
                "hold_xmin": args.hold_xmin,
                "rate": args.rate,
                "mean_invoices_per_s": round(mean, 1),
                "last_interval_invoices_per_s": round(rates.last().copied().unwrap_or(0.0), 1),
                "worst_interval_claim_p99_ms": round(p99s.last().copied().unwrap_or(0.0), 3),
            }),
        );
        Ok(())
    }
}

/// Idle pickup: the latency of one invoice arriving at an idle fleet, which
/// a backlog hides, and what it costs the database to hand it out.
mod idle_pickup {
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use billing_coordinator::proto::{
        ClaimInvoicesRequest, CompleteInvoiceRequest, NewInvoice, SubmitInvoicesRequest,
        coordinator_service_client::CoordinatorServiceClient,
    };
    use serde_json::json;
    use sqlx::{Connection, PgConnection};
    use tokio::sync::mpsc;
    use tonic::transport::Channel;

    use super::{Args, percentile, percentiles, report, round, service};

    /// How long each claim long-polls.
    const WAIT: Duration = Duration::from_secs(20);
    /// Time for every worker's first claim to reach the service and wait.
    const SETTLE: Duration = Duration::from_millis(300);
    /// Pause after a completion, so that its worker is long-polling again
    /// before the next invoice arrives.
    const BETWEEN: Duration = Duration::from_millis(20);
    /// A try fails if its invoice is not claimed and completed by then.
    const GIVE_UP: Duration = Duration::from_secs(30);
    /// A PostgreSQL backend publishes its statistics at most once a second,
    /// and within a second of going idle: waited before each reading, so
    /// that the counters include everything done until then.
    const STATS_FLUSH: Duration = Duration::from_millis(1500);

    /// What a worker tells the driver.
    enum Event {
        /// A claim returned this invoice at this instant.
        Claimed(i64, Instant),
        /// The invoice's completion returned.
        Completed(i64),
        /// The worker stopped on this error.
        Failed(String),
    }

    /// Long-polls `queue` for one invoice at a time and completes it.
    async fn work(
        mut client: CoordinatorServiceClient<Channel>,
        name: String,
        queue: String,
        events: &mpsc::UnboundedSender<Event>,
    ) -> anyhow::Result<()> {
        loop {
            let claimed = client
                .claim_invoices(ClaimInvoicesRequest {
                    worker_id: name.clone(),
                    max_count: 1,
                    queues: vec![queue.clone()],
                    wait: Some(prost_types::Duration {
                        seconds: WAIT.as_secs() as i64,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .invoices;
            let at = Instant::now();
            let Some(claimed) = claimed.into_iter().next() else {
                continue;
            };
            let id = claimed.invoice.as_ref().map_or(0, |i| i.invoice_id);
            // A closed channel means the driver is done.
            if events.send(Event::Claimed(id, at)).is_err() {
                return Ok(());
            }
            client
                .complete_invoice(CompleteInvoiceRequest {
                    invoice_id: id,
                    lease_token: claimed.lease_token,
                    provider_reference: String::new(),
                })
                .await?;
            if events.send(Event::Completed(id)).is_err() {
                return Ok(());
            }
        }
    }

    /// Waits for invoice `id` to be claimed (`claim`) or completed, and says
    /// when that happened.
    async fn expect(
        events: &mut mpsc::UnboundedReceiver<Event>,
        id: i64,
        claim: bool,
    ) -> anyhow::Result<Instant> {
        let deadline = tokio::time::Instant::now() + GIVE_UP;
        loop {
            let event = tokio::time::timeout_at(deadline, events.recv())
                .await
                .with_context(|| format!("invoice {id} was not picked up within {GIVE_UP:?}"))?
                .context("every worker stopped")?;
            match event {
                Event::Claimed(got, at) if got == id && claim => return Ok(at),
                Event::Completed(got) if got == id && !claim => return Ok(Instant::now()),
                Event::Claimed(got, _) | Event::Completed(got) if got != id => {
                    bail!("invoice {got} turned up while waiting for {id}")
                }
                Event::Claimed(..) | Event::Completed(_) => {}
                Event::Failed(error) => bail!("a worker failed: {error}"),
            }
        }
    }

    /// Transactions committed in the current database so far.
    async fn xact_commits(conn: &mut PgConnection) -> anyhow::Result<i64> {
        tokio::time::sleep(STATS_FLUSH).await;
        Ok(sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(conn)
        .await?)
    }

    pub async fn run(args: Args) -> anyhow::Result<()> {
        if args.tries == 0 {
            bail!("--tries must be at least 1");
        }
        let channel = Channel::from_shared(args.addr.clone())?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.addr))?;
        // A queue of this run's own, so that nothing else is claimed or
        // claims what this run submits.
        let queue = format!("idle-pickup-{:x}", rand::random::<u64>());
        let (events, mut heard) = mpsc::unbounded_channel();
        let workers: Vec<_> = (0..args.workers)
            .map(|w| {
                let client = CoordinatorServiceClient::new(channel.clone());
                let (queue, events) = (queue.clone(), events.clone());
                tokio::spawn(async move {
                    if let Err(error) = work(client, format!("idle-{w}"), queue, &events).await {
                        let _ = events.send(Event::Failed(format!("{error:#}")));
                    }
                })
            })
            .collect();
        drop(events);
        tokio::time::sleep(SETTLE).await;

        let mut stats = match &args.database_url {
            Some(url) => Some(PgConnection::connect(url).await?),
            None => None,
        };
        let before = match stats.as_mut() {
            Some(conn) => Some(xact_commits(conn).await?),
            None => None,
        };
        let mut submitter = CoordinatorServiceClient::new(channel.clone());
        let monitor = service::Monitor::start(args.service_pid)?;
        let started = Instant::now();
        let mut pickups = Vec::with_capacity(args.tries);
        // Part of each pickup: the submission's own commit.
        let mut submits = Vec::with_capacity(args.tries);
        for n in 0..args.tries {
            let invoice = NewInvoice {
                external_id: format!("{queue}-{n}"),
                queue: queue.clone(),
                customer_id: format!("cus-{n}"),
                amount_minor: 1000,
                currency: "EUR".into(),
                ..Default::default()
            };
            let t0 = Instant::now();
            let id = submitter
                .submit_invoices(SubmitInvoicesRequest {
                    invoices: vec![invoice],
                })
                .await
                .context("submitting")?
                .into_inner()
                .results
                .first()
                .context("a submit without a result")?
                .invoice_id;
            submits.push(t0.elapsed());
            let claimed = expect(&mut heard, id, true).await?;
            pickups.push(claimed.saturating_duration_since(t0));
            expect(&mut heard, id, false).await?;
            tokio::time::sleep(BETWEEN).await;
        }
        let elapsed = started.elapsed();
        let usage = monitor.map(service::Monitor::finish);
        // The reading before the tries committed a transaction of its own,
        // which the reading after them counts.
        let transactions = match (stats.as_mut(), before) {
            (Some(conn), Some(before)) => Some(xact_commits(conn).await? - before - 1),
            _ => None,
        };
        for worker in &workers {
            worker.abort();
        }

        pickups.sort();
        submits.sort();
        let max = pickups.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let per_pickup = transactions.map(|t| t as f64 / args.tries as f64);
        println!(
            "{label}: idle-pickup tries={tries} workers={w} seconds={s:.2} \
             pickup_ms p50={p50:.2} p99={p99:.2} p999={p999:.2} max={max:.2} \
             submit_ms p50={s50:.2}{db}",
            label = args.label,
            tries = args.tries,
            w = args.workers,
            s = elapsed.as_secs_f64(),
            p50 = percentile(&pickups, 0.5),
            p99 = percentile(&pickups, 0.99),
            p999 = percentile(&pickups, 0.999),
            s50 = percentile(&submits, 0.5),
            db = per_pickup.map_or(String::new(), |t| format!(
                " db_transactions_per_pickup={t:.2}"
            )),
        );
        report(
            &args,
            args.workers,
            usage,
            json!({
                "tries": args.tries,
                "pickup_ms": percentiles(&pickups),
                "max_ms": round(max, 3),
                "submit_ms": percentiles(&submits),
                "db_transactions_per_pickup": per_pickup.map(|t| round(t, 2)),
            }),
        );
        Ok(())
    }
}

/// Sustained: invoices arrive at a fixed rate, as in production, and each is
/// timed from its submission to the claim that picked it up.
mod sustained {
    use std::{
        sync::{
            Arc, Mutex,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        time::{Duration, Instant},
    };

    use anyhow::{Context, bail};
    use billing_coordinator::proto::{
        ClaimInvoicesRequest, NewInvoice, SubmitInvoicesRequest,
        coordinator_service_client::CoordinatorServiceClient,
    };
    use serde_json::{Value, json};
    use tonic::transport::Channel;

    use sqlx::{Connection, PgConnection};

    use super::{Args, complete_claimed, machine, percentile, percentiles, report, round, service};

    /// The run length when `--seconds` is not given.
    pub const DEFAULT_SECONDS: u64 = 20;
    /// The start of a run, left out of the statistics: connections opening,
    /// the service's caches filling.
    const WARM_UP: Duration = Duration::from_secs(2);
    /// The producer submits what is due this often.
    const TICK: Duration = Duration::from_millis(10);
    /// The most invoices one SubmitInvoices may carry.
    const MAX_SUBMIT: u64 = 1000;
    /// How long each claim long-polls.
    const WAIT: Duration = Duration::from_secs(1);
    /// Kept up: completed at least this share of the offered rate over the
    /// measured window...
    const KEPT_UP_SHARE: f64 = 0.99;
    /// ...and picked up half the invoices within this of their submission.
    const KEPT_UP_PICKUP_P50: Duration = Duration::from_millis(100);

    /// Whether a run kept up with its offered rate. A service that falls
    /// behind completes less than it is offered, and its backlog, so the
    /// median pickup, grows for as long as the run lasts; one that keeps up
    /// completes what arrives (within the window's edges) and picks it up in
    /// a few tens of milliseconds. A run that falls behind by less than 1%
    /// still piles up a backlog, which the pickup bound catches.
    pub fn kept_up(rate: u64, achieved: f64, pickup_p50: Duration) -> bool {
        achieved >= KEPT_UP_SHARE * rate as f64 && pickup_p50 < KEPT_UP_PICKUP_P50
    }

    struct Shared {
        /// Submission times are carried in external ids as nanoseconds
        /// since this instant.
        run_start: Instant,
        /// The measured window, from `run_start`.
        window: std::ops::Range<Duration>,
        /// The producer has finished: workers stop at their first empty claim.
        stop: AtomicBool,
        /// Invoices of this run completed: invoices other runs left behind
        /// are drained too, but not counted.
        completed: AtomicU64,
        /// Invoices (by sequence number) whose SubmitInvoices has returned,
        /// and so were committed and claimable.
        committed: AtomicU64,
        pickups: Mutex<Vec<Duration>>,
        claims: Mutex<Vec<Duration>>,
    }

    /// The sequence number and submission time (from `run_start`) an
    /// external id carries; `None` for an invoice another run submitted.
    fn sequence_and_time(external_id: &str, run: &str) -> Option<(u64, Duration)> {
        let mut parts = external_id.rsplitn(3, '-');
        let nanos = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        parts
            .next()
            .filter(|prefix| *prefix == run)
            .map(|_| (seq, Duration::from_nanos(nanos)))
    }

    /// Submits `rate` invoices a second until the window closes, as many as
    /// the clock says are due at each tick, so that a slow submission is
    /// caught up with instead of lowering the rate.
    async fn produce(
        mut client: CoordinatorServiceClient<Channel>,
        shared: Arc<Shared>,
        run: String,
        rate: u64,
    ) -> anyhow::Result<u64> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sent = 0u64;
        loop {
            tick.tick().await;
            let elapsed = shared.run_start.elapsed();
            if elapsed >= shared.window.end {
                return Ok(sent);
            }
            let due = (elapsed.as_secs_f64() * rate as f64) as u64;
            while sent < due {
                let n = (due - sent).min(MAX_SUBMIT);
                let at = shared.run_start.elapsed().as_nanos();
                let invoices: Vec<NewInvoice> = (sent..sent + n)
                    .map(|i| NewInvoice {
                        external_id: format!("{run}-{i}-{at}"),
                        customer_id: format!("cus-{}", i % 10_000),
                        amount_minor: 1000,
                        currency: "EUR".into(),
                        ..Default::default()
                    })
                    .collect();
                client
                    .submit_invoices(SubmitInvoicesRequest { invoices })
                    .await
                    .context("submitting")?;
                sent += n;
                shared.committed.store(sent, Ordering::SeqCst);
            }
        }
    }

    /// Long-polls for up to `batch` invoices and completes them, until the
    /// producer has finished and nothing is left.
    async fn work(
        mut client: CoordinatorServiceClient<Channel>,
        shared: Arc<Shared>,
        run: String,
        name: String,
        batch: i32,
    ) -> anyhow::Result<()> {
        loop {
            let visible = shared.committed.load(Ordering::SeqCst);
            let t = Instant::now();
            let claimed = client
                .claim_invoices(ClaimInvoicesRequest {
                    worker_id: name.clone(),
                    max_count: batch,
                    wait: Some(prost_types::Duration {
                        seconds: WAIT.as_secs() as i64,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .invoices;
            let at = Instant::now();
            if claimed.is_empty() {
                if shared.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                continue;
            }
            let now = at.duration_since(shared.run_start);
            let submitted: Vec<(u64, Duration)> = claimed
                .iter()
                .filter_map(|c| sequence_and_time(&c.invoice.as_ref()?.external_id, &run))
                .collect();
            // A long-poll that waited for its invoices measures the arrival
            // rate, not the claim: only a claim that found work already
            // committed when it was sent is timed. An invoice whose submit
            // was still in flight when the claim was sent does not count:
            // the claim waited for that commit, which is the producer's time.
            let found_at_once = submitted.iter().any(|(seq, _)| *seq < visible);
            if shared.window.contains(&now) && found_at_once {
                shared.claims.lock().expect("latencies").push(at - t);
            }
            let ours = submitted.len() as u64;
            shared.pickups.lock().expect("latencies").extend(
                submitted
                    .into_iter()
                    .filter(|(_, submitted)| shared.window.contains(submitted))
                    .map(|(_, submitted)| now.saturating_sub(submitted)),
            );

            complete_claimed(&mut client, &claimed).await?;
            shared.completed.fetch_add(ours, Ordering::SeqCst);
        }
    }

    pub async fn run(args: Args) -> anyhow::Result<()> {
        let rate = args.rate.context("--mode sustained needs --rate")?;
        let seconds = match args.seconds {
            0 => DEFAULT_SECONDS,
            s => s,
        };
        if rate == 0 || Duration::from_secs(seconds) <= WARM_UP {
            bail!(
                "--mode sustained needs --rate above 0 and --seconds above {}",
                WARM_UP.as_secs()
            );
        }
        let channels = super::connect(&args).await?;
        // Every run starts right after a checkpoint, as a drain does after
        // settling: near the top rate, a checkpoint that happens to start
        // inside the window costs a second of capacity and can tip the run
        // into a backlog, and with a WAL-driven one that is a matter of
        // what the runs before wrote.
        let cluster = match &args.database_url {
            Some(url) => {
                let mut conn = PgConnection::connect(url).await?;
                sqlx::raw_sql("CHECKPOINT")
                    .execute(&mut conn)
                    .await
                    .context("a checkpoint before the run")?;
                machine::cluster_pid(&mut conn).await
            }
            None => None,
        };
        let quiet = machine::wait_quiet(Duration::from_secs(args.quiet_wait)).await;
        let run = format!("sustained-{:x}", rand::random::<u64>());
        let shared = Arc::new(Shared {
            run_start: Instant::now(),
            window: WARM_UP..Duration::from_secs(seconds),
            stop: AtomicBool::new(false),
            completed: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            pickups: Mutex::new(Vec::new()),
            claims: Mutex::new(Vec::new()),
        });
        let workers: Vec<_> = (0..args.workers)
            .map(|w| {
                tokio::spawn(work(
                    CoordinatorServiceClient::new(channels[w % channels.len()].clone()),
                    shared.clone(),
                    run.clone(),
                    format!("sustained-{w}"),
                    args.batch,
                ))
            })
            .collect();
        let producer = tokio::spawn(produce(
            CoordinatorServiceClient::new(channels[0].clone()),
            shared.clone(),
            run,
            rate,
        ));

        let start = tokio::time::Instant::from_std(shared.run_start);
        tokio::time::sleep_until(start + shared.window.start).await;
        let monitor = service::Monitor::start(args.service_pid)?;
        let meter = machine::Meter::start(quiet, [cluster, args.service_pid]);
        let completed_before = shared.completed.load(Ordering::SeqCst);
        tokio::time::sleep_until(start + shared.window.end).await;
        let completed = shared.completed.load(Ordering::SeqCst) - completed_before;
        let usage = monitor.map(service::Monitor::finish);
        let noise = meter.finish();

        let submitted = producer.await.context("the producer panicked")??;
        shared.stop.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.await.context("a worker panicked")??;
        }

        let measured = (shared.window.end - shared.window.start).as_secs_f64();
        let achieved = completed as f64 / measured;
        let mut pickups = std::mem::take(&mut *shared.pickups.lock().expect("latencies"));
        let mut claims = std::mem::take(&mut *shared.claims.lock().expect("latencies"));
        pickups.sort();
        claims.sort();
        let p50 = percentile(&pickups, 0.5);
        let kept_up = kept_up(rate, achieved, Duration::from_secs_f64(p50 / 1e3));
        println!(
            "{label}: sustained rate={rate} seconds={seconds} workers={w} batch={b} \
             submitted={submitted} achieved_per_s={achieved:.0} kept_up={kept_up} \
             pickup_ms p50={p50:.2} p99={p99:.2} p999={p999:.2} \
             claim_ms p50={c50:.2} p99={c99:.2} p999={c999:.2} claims_timed={timed}",
            label = args.label,
            w = args.workers,
            b = args.batch,
            timed = claims.len(),
            p99 = percentile(&pickups, 0.99),
            p999 = percentile(&pickups, 0.999),
            c50 = percentile(&claims, 0.5),
            c99 = percentile(&claims, 0.99),
            c999 = percentile(&claims, 0.999),
        );
        let fields = json!({
            "rate": rate,
            "seconds": seconds,
            "achieved_per_s": round(achieved, 1),
            "kept_up": kept_up,
            "pickup_ms": percentiles(&pickups),
            // At low rates the woken long-polls take every invoice, and
            // no claim may find work waiting: then there is no figure.
            "claim_ms": if claims.is_empty() { Value::Null } else { percentiles(&claims) },
            "claims_timed": claims.len(),
        });
        report(
            &args,
            args.workers,
            usage,
            super::with(fields, noise.fields(args.max_foreign_cores)),
        );
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use std::time::Duration;

        use super::kept_up;

        const MS: Duration = Duration::from_millis(1);

        #[test]
        fn a_run_that_completes_what_arrives_and_picks_it_up_quickly_kept_up() {
            assert!(kept_up(10_000, 10_000.0, 20 * MS));
            assert!(kept_up(10_000, 9_900.0, 99 * MS));
        }

        #[test]
        fn a_run_that_completes_less_than_offered_fell_behind() {
            assert!(!kept_up(10_000, 9_899.0, 20 * MS));
        }

        #[test]
        fn a_run_whose_backlog_delays_the_median_pickup_fell_behind() {
            assert!(!kept_up(10_000, 10_000.0, 100 * MS));
        }
    }
}

/// Ceiling: the service's own claim and completion statements run straight
/// against the database, without gRPC, the merging of concurrent claims or
/// long-polling: the most the service could do on this database.
mod ceiling {
    use std::{
        collections::BTreeMap,
        time::{Duration, Instant},
    };

    use anyhow::{Context, bail};
    use billing_coordinator::{
        config::{DEFAULT_LEASE, DEFAULT_MAX_ATTEMPTS},
        fairness,
        grpc::convert::DEFAULT_QUEUE,
        lease::{Completion, NewInvoice},
        store::{ClaimParams, DEFAULT_FULL_SCAN_INTERVAL, PoolSettings, Store},
    };

    use super::{Args, Latencies};

    /// The service's default `--max-hold`.
    const MAX_HOLD: Duration = Duration::from_secs(4 * 60 * 60);
    /// Invoices per submission, the most the service accepts in one.
    const SUBMIT_CHUNK: usize = 1000;

    /// Claims `batch` at a time as `name` and completes each batch in one
    /// statement, until a claim finds nothing. Says how many it completed.
    async fn work(
        store: Store,
        name: String,
        batch: u32,
        lease: Duration,
    ) -> anyhow::Result<(usize, Latencies)> {
        let mut latencies = Latencies::default();
        let mut done = 0;
        loop {
            // What the coordinator's claim_group does for a claim that names
            // no queues: every queue with pending invoices, shared by weight.
            let t = Instant::now();
            let queues = store.queue_list_claimable(&[]).await?;
            if queues.is_empty() {
                latencies.claim.push(t.elapsed());
                break;
            }
            let shares = fairness::shares(batch, &queues, &mut rand::rng());
            let claimed = store
                .invoice_claim_many(&ClaimParams {
                    holders: vec![(name.as_str(), batch)],
                    lease_duration: lease,
                    max_hold: MAX_HOLD,
                    shares,
                })
                .await?
                .into_iter()
                .next()
                .unwrap_or_default();
            latencies.claim.push(t.elapsed());
            if claimed.is_empty() {
                break;
            }
            let completions: Vec<Completion> = claimed
                .iter()
                .map(|c| Completion {
                    token: c.token,
                    provider_reference: None,
                })
                .collect();
            let t = Instant::now();
            let outcomes = store.invoice_complete_many(&completions).await?;
            latencies.complete.push(t.elapsed());
            if let Some(refused) = outcomes.iter().find_map(|o| o.as_ref().err()) {
                bail!("a completion was refused: {refused}");
            }
            done += claimed.len();
        }
        Ok((done, latencies))
    }

    pub async fn run(args: Args) -> anyhow::Result<()> {
        let url = args
            .database_url
            .as_deref()
            .context("--mode ceiling needs --database-url")?;
        let batch = u32::try_from(args.batch).context("--batch")?;
        let lease = humantime::parse_duration(DEFAULT_LEASE)?;
        // One connection per worker, as in the service each concurrent
        // statement holds one; submitting and migrating come first and use
        // them too.
        let store = Store::connect_lazy(
            url,
            &PoolSettings {
                max_connections: u32::try_from(args.connections).context("--connections")?,
                acquire_timeout: Duration::from_secs(30),
                full_scan_interval: DEFAULT_FULL_SCAN_INTERVAL,
                // The claim statement, on connections set up as the
                // service's are.
                funnel_connections: u32::try_from(args.connections).context("--connections")?,
            },
        )?;
        store.migrate().await.context("migrating the database")?;

        let run = format!("{:x}", rand::random::<u64>());
        let invoices: Vec<NewInvoice> = (0..args.invoices)
            .map(|i| NewInvoice {
                external_id: format!("ceiling-{run}-{i}"),
                queue: DEFAULT_QUEUE.into(),
                customer_id: format!("cus-{}", i % 10_000),
                amount_minor: 1000,
                currency: "EUR".into(),
                available_at: None,
                priority: 0,
                max_attempts: None,
                metadata: BTreeMap::new(),
                serialization_key: None,
            })
            .collect();
        for chunk in invoices.chunks(SUBMIT_CHUNK) {
            store
                .invoice_submit_many(chunk, DEFAULT_MAX_ATTEMPTS)
                .await
                .context("submitting")?;
        }

        let settled = super::settle(url, &args).await?;
        let monitor = super::service::Monitor::start(args.service_pid)?;
        let started = Instant::now();
        let workers: Vec<_> = (0..args.connections)
            .map(|n| tokio::spawn(work(store.clone(), format!("ceiling-{n}"), batch, lease)))
            .collect();
        let mut drained = 0;
        let mut all = Latencies::default();
        for worker in futures::future::join_all(workers).await {
            let (done, latencies) = worker.context("a worker panicked")??;
            drained += done;
            all.claim.extend(latencies.claim);
            all.complete.extend(latencies.complete);
        }
        let elapsed = started.elapsed();
        let usage = monitor.map(super::service::Monitor::finish);
        let settled = settled.finish(drained).await?;
        store.close().await;

        super::report_drain(
            &args,
            args.connections,
            usage,
            drained,
            elapsed,
            &mut all,
            Some(settled),
        );
        if drained < args.invoices {
            bail!("drained {drained} of {} invoices", args.invoices);
        }
        Ok(())
    }
}

/// The service's resources over the measured part of a run, read from
/// `/proc`: its peak resident memory, sampled every [`service::SAMPLE`], and
/// the CPU it used, as the average number of cores kept busy.
mod service {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
        time::{Duration, Instant},
    };

    use anyhow::Context;

    /// How often the resident memory is read.
    pub const SAMPLE: Duration = Duration::from_millis(100);
    /// Clock ticks per second in `/proc/<pid>/stat`: USER_HZ, which Linux
    /// fixes at 100 on every architecture we run on (libc is not a
    /// dependency, so sysconf(_SC_CLK_TCK) is not asked).
    const TICKS_PER_S: f64 = 100.0;

    /// What the service used.
    #[derive(Clone, Copy, Debug)]
    pub struct Usage {
        /// Peak resident memory, in MiB.
        pub peak_rss_mib: f64,
        /// CPU time over wall time: the average number of cores busy.
        pub cpu_cores: f64,
    }

    /// Samples a process from [`Monitor::start`] to [`Monitor::finish`].
    pub struct Monitor {
        pid: u32,
        started: Instant,
        ticks: u64,
        peak_kib: Arc<AtomicU64>,
        sampler: tokio::task::JoinHandle<()>,
    }

    impl Monitor {
        /// Starts sampling `pid`, if given. Fails if there is no such process.
        pub fn start(pid: Option<u32>) -> anyhow::Result<Option<Self>> {
            let Some(pid) = pid else { return Ok(None) };
            let ticks = cpu_ticks(pid)
                .with_context(|| format!("reading /proc/{pid}/stat for --service-pid"))?;
            let peak_kib = Arc::new(AtomicU64::new(0));
            let sampler = tokio::spawn({
                let peak_kib = peak_kib.clone();
                async move {
                    let mut every = tokio::time::interval(SAMPLE);
                    loop {
                        every.tick().await;
                        if let Some(kib) = rss_kib(pid) {
                            peak_kib.fetch_max(kib, Ordering::Relaxed);
                        }
                    }
                }
            });
            Ok(Some(Self {
                pid,
                started: Instant::now(),
                ticks,
                peak_kib,
                sampler,
            }))
        }

        /// Stops sampling and says what the process used since the start.
        pub fn finish(self) -> Usage {
            let wall = self.started.elapsed().as_secs_f64();
            self.sampler.abort();
            // A last sample, so that a run shorter than one interval has one.
            if let Some(kib) = rss_kib(self.pid) {
                self.peak_kib.fetch_max(kib, Ordering::Relaxed);
            }
            // A process that has gone has used nothing we can still read.
            let used = cpu_ticks(self.pid).map_or(0, |now| now.saturating_sub(self.ticks));
            Usage {
                peak_rss_mib: self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0,
                cpu_cores: used as f64 / TICKS_PER_S / wall.max(f64::MIN_POSITIVE),
            }
        }
    }

    fn rss_kib(pid: u32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    /// The resident memory of process `pid`, in MiB.
    pub fn rss_mib(pid: u32) -> Option<f64> {
        rss_kib(pid).map(|kib| kib as f64 / 1024.0)
    }

    /// utime + stime of process `pid`, in clock ticks.
    fn cpu_ticks(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses; the
        // fields after its closing parenthesis start with the state (field 3),
        // so utime and stime (fields 14 and 15) are the 12th and 13th there.
        let mut after = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .skip(11);
        let utime: u64 = after.next()?.parse().ok()?;
        let stime: u64 = after.next()?.parse().ok()?;
        Some(utime + stime)
    }
}

/// The rest of the machine. The benchmarks share it with other work, so a
/// measured part waits for a quiet moment first and then says how much CPU
/// went to processes other than its own: the rule the peers' scripts
/// (`noise.py` in ../shared/bench/peers) apply to theirs, so that the
/// service's cells and theirs are measured alike.
mod machine {
    use std::time::{Duration, Instant};

    use serde_json::{Value, json};
    use sqlx::PgConnection;

    use super::round;

    /// The machine counts as quiet while fewer cores than this are busy...
    const QUIET_CORES: f64 = 0.3;
    /// ...in this many one-second samples in a row.
    const QUIET_SAMPLES: u32 = 2;
    /// Clock ticks per second in `/proc` (USER_HZ, see `service`).
    const TICKS_PER_S: f64 = 100.0;

    /// The process tree of the PostgreSQL server `conn` is connected to:
    /// its backend's parent, the postmaster, if it runs on this machine.
    pub async fn cluster_pid(conn: &mut PgConnection) -> Option<u32> {
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(conn)
            .await
            .ok()?;
        let status = std::fs::read_to_string(format!("/proc/{backend}/status")).ok()?;
        let parent: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()?;
        // A server elsewhere has the same backend pid as some process here.
        let name = std::fs::read_to_string(format!("/proc/{parent}/comm")).ok()?;
        matches!(name.trim(), "postgres" | "postmaster").then_some(parent)
    }

    /// How the wait for a quiet machine went.
    #[derive(Clone, Copy)]
    pub struct Quiet {
        /// A quiet moment came (false when none was waited for).
        found: bool,
        waited: Duration,
    }

    /// Measures the machine from [`Meter::start`] to [`Meter::finish`].
    pub struct Meter {
        /// The processes whose CPU is the run's own, with their children.
        ours: Vec<u32>,
        quiet: Quiet,
        started: Instant,
        busy: u64,
        own: u64,
    }

    /// What the machine did while a part was measured.
    pub struct Noise {
        quiet: Quiet,
        busy_cores: f64,
        foreign_cores: f64,
    }

    impl Meter {
        /// Starts measuring. `ours` are the PostgreSQL server and the
        /// service, if known; this process always counts as ours.
        pub fn start(quiet: Quiet, ours: impl IntoIterator<Item = Option<u32>>) -> Self {
            let ours: Vec<u32> = ours
                .into_iter()
                .flatten()
                .chain([std::process::id()])
                .collect();
            Self {
                busy: busy_ticks(),
                own: tree_ticks(&ours),
                ours,
                quiet,
                started: Instant::now(),
            }
        }

        pub fn finish(self) -> Noise {
            let wall = self.started.elapsed().as_secs_f64().max(1e-3) * TICKS_PER_S;
            let busy = busy_ticks().saturating_sub(self.busy) as f64;
            let own = tree_ticks(&self.ours).saturating_sub(self.own) as f64;
            Noise {
                quiet: self.quiet,
                busy_cores: busy / wall,
                foreign_cores: (busy - own).max(0.0) / wall,
            }
        }
    }

    impl Noise {
        /// The `RESULT` fields: `"machine"`, and `"discarded"` when the
        /// foreign CPU passed `max_foreign` cores.
        pub fn fields(&self, max_foreign: Option<f64>) -> Value {
            let mut fields = json!({
                "machine": {
                    "quiet_wait_s": round(self.quiet.waited.as_secs_f64(), 1),
                    "quiet": self.quiet.found,
                    "busy_cores": round(self.busy_cores, 3),
                    "foreign_cores": round(self.foreign_cores, 3),
                }
            });
            if let Some(max) = max_foreign {
                fields["discarded"] = json!(self.foreign_cores > max);
            }
            fields
        }
    }

    /// Waits until the machine has been quiet for [`QUIET_SAMPLES`] seconds
    /// in a row, for at most `limit`.
    pub async fn wait_quiet(limit: Duration) -> Quiet {
        let started = Instant::now();
        let mut in_a_row = 0;
        let mut before = busy_ticks();
        while started.elapsed() < limit {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = busy_ticks();
            let cores = now.saturating_sub(before) as f64 / TICKS_PER_S;
            before = now;
            in_a_row = if cores < QUIET_CORES { in_a_row + 1 } else { 0 };
            if in_a_row >= QUIET_SAMPLES {
                return Quiet {
                    found: true,
                    waited: started.elapsed(),
                };
            }
        }
        Quiet {
            found: false,
            waited: started.elapsed(),
        }
    }

    /// Ticks every core spent in user and system code, from `/proc/stat`.
    fn busy_ticks() -> u64 {
        let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
            return 0;
        };
        // cpu user nice system idle ...
        stat.lines()
            .next()
            .map(|cpu| {
                cpu.split_whitespace()
                    .skip(1)
                    .take(3)
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// CPU ticks of `roots` and all their live descendants, with what their
    /// finished children used (a backend that exits is counted in its
    /// postmaster's children's time).
    fn tree_ticks(roots: &[u32]) -> u64 {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return 0;
        };
        // pid -> (parent, utime + stime + cutime + cstime)
        let processes: Vec<(u32, u32, u64)> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                // Fields after the command's closing parenthesis: state (3),
                // ppid (4), ..., utime (14), stime, cutime, cstime (17).
                let after: Vec<&str> = stat
                    .get(stat.rfind(')')? + 1..)?
                    .split_whitespace()
                    .collect();
                let parent = after.get(1)?.parse().ok()?;
                let ticks = after
                    .get(11..15)?
                    .iter()
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum();
                Some((pid, parent, ticks))
            })
            .collect();
        let mut total = 0;
        let mut todo: Vec<u32> = roots.to_vec();
        let mut seen = std::collections::HashSet::new();
        while let Some(pid) = todo.pop() {
            if !seen.insert(pid) {
                continue;
            }
            for &(p, parent, ticks) in &processes {
                if p == pid {
                    total += ticks;
                }
                if parent == pid {
                    todo.push(p);
                }
            }
        }
        total
    }
}
