//! The end-to-end run: the example workers in Python, Node and Rust bill one
//! pending set together through the real service, and every invoice is
//! billed once and completed once.
//!
//! ```text
//! cargo build --example worker && cargo test --test e2e
//! cargo test --test e2e -- --invoices 5000 --seed 7
//! ```
//!
//! It installs the clients as a user would (a fresh virtualenv with
//! `pip install clients/python`, `npm ci` in `clients/node`), creates a fresh
//! database on the test PostgreSQL (found or started as the integration
//! tests do), and starts the real `billing-coordinator serve --migrate` on a
//! free port with a short `--max-hold` (4 s). Then two Python, two Node and
//! one Rust worker (`clients/*/examples`, `examples/worker.rs`) claim, charge
//! a shared fake provider (`provider.rs`) under each invoice's idempotency
//! key, and complete. Along the way:
//!
//! - one worker is SIGKILLed right after a charge, before it hears the
//!   answer: it dies holding leases, one of them charged;
//! - another is sent SIGTERM mid-run: it must finish what it is billing,
//!   release the rest with reason SHUTDOWN and exit 0;
//! - each remaining worker has one charge stalled past the hard deadline, so
//!   the lease is taken back under it: its heartbeat must see LEASE_LOST once
//!   and stop, and the worker must carry on.
//!
//! At the end it checks, from the database and the provider's record, that
//! every invoice was completed once (one `completed` event each), that every
//! idempotency key was charged once with the invoice's terms and the repeats
//! were absorbed, that each completion carries the provider's charge id, and
//! what became of the killed, stopped and stalled workers. It prints a report
//! and exits non-zero if anything broke.

#[path = "../support/mod.rs"]
mod support;

mod provider;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use billing_coordinator::proto::{
    NewInvoice, SubmitInvoicesRequest, coordinator_service_client::CoordinatorServiceClient,
};
use clap::Parser;
use sqlx::{Connection as _, PgConnection};
use tokio::process::{Child, Command};

use provider::{Provider, Record};
use support::{postgres::PgServer, service::Service, tools};

/// End-to-end run of the example workers in every language.
#[derive(Debug, Clone, Parser)]
struct Args {
    /// Invoices to bill.
    #[arg(long, default_value_t = 2000)]
    invoices: usize,
    /// Picks which worker is killed and which is stopped; random by default.
    #[arg(long)]
    seed: Option<u64>,
    /// Give up (and fail) after this many seconds of billing.
    #[arg(long, default_value_t = 240)]
    timeout_s: u64,
}

/// Lease the workers ask for, seconds; they beat every third of it.
const LEASE_SECONDS: u64 = 2;
/// The service's hard deadline: a stalled charge outlives it.
const MAX_HOLD: &str = "4s";
/// How long a worker may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args = Args::parse_from(std::env::args().filter(|a| a != "--nocapture"));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("e2e: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    match runtime.block_on(run(&args)) {
        Ok(report) => {
            report.print(started.elapsed());
            if report.broken.is_empty() {
                println!("e2e: all invariants held");
                ExitCode::SUCCESS
            } else {
                for broken in &report.broken {
                    eprintln!("INVARIANT BROKEN: {broken}");
                }
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("e2e: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One worker process.
struct Worker {
    id: String,
    language: &'static str,
    child: Child,
    pid: u32,
    log: PathBuf,
    /// How it ended, once it has.
    exit: Option<std::process::ExitStatus>,
}

async fn run(args: &Args) -> anyhow::Result<Report> {
    let root = tools::repo_root();
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let rust_worker = rust_worker_binary(&root)?;

    // The clients, installed as a user would install them.
    let setup_started = Instant::now();
    let python = tokio::task::spawn_blocking({
        let (venv, package) = (work.join("venv"), root.join("clients/python"));
        move || tools::python_venv(&venv, &[&package.to_string_lossy()])
    });
    let node = tokio::task::spawn_blocking({
        let dir = root.join("clients/node");
        move || tools::npm_ci(&dir)
    });
    let python_bin = python.await??;
    node.await??;
    let setup = setup_started.elapsed();
    eprintln!("e2e: clients installed in {:.1}s", setup.as_secs_f64());

    let pg = tokio::task::spawn_blocking(PgServer::shared).await?;
    let database_url = pg.create_database().await?;
    let service = Service::start(
        &database_url,
        &work.join("service.log"),
        &["--max-hold", MAX_HOLD, "--backoff-base", "200ms"],
    )
    .await?;
    let provider = Provider::start(database_url.clone()).await?;

    let seed = args.seed.unwrap_or_else(rand::random);
    let (kill_id, term_id) = if seed % 2 == 0 {
        ("e2e-py-1", "e2e-node-1")
    } else {
        ("e2e-node-1", "e2e-py-1")
    };
    let mut workers = Vec::new();
    for (id, language) in [
        ("e2e-py-1", "python"),
        ("e2e-py-2", "python"),
        ("e2e-node-1", "node"),
        ("e2e-node-2", "node"),
        ("e2e-rust-1", "rust"),
    ] {
        let command = worker_command(
            language,
            id,
            &root,
            &python_bin,
            &rust_worker,
            &service,
            &provider,
        );
        workers.push(spawn_worker(command, id, language, &work)?);
    }
    for worker in &workers {
        wait_for_line(&worker.log, "claiming from", Duration::from_secs(60))
            .await
            .with_context(|| format!("worker {} did not start", worker.id))?;
    }
    eprintln!(
        "e2e: 5 workers up; seed {seed}: {kill_id} will be SIGKILLed, {term_id} stopped with SIGTERM"
    );

    let startup = setup_started.elapsed() - setup;
    let billing_started = Instant::now();
    submit(&service, args.invoices).await?;
    let mut broken = Vec::new();
    let mut events = Events::default();
    let mut phase = Phase::Warmup;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let completed = count(
            &database_url,
            "SELECT count(*) FROM invoices WHERE state = 'completed'",
        )
        .await?;
        for worker in workers.iter_mut().filter(|w| w.exit.is_none()) {
            if let Some(status) = worker.child.try_wait()? {
                worker.exit = Some(status);
                let expected = (worker.id == kill_id && phase >= Phase::KillArmed)
                    || (worker.id == term_id && phase >= Phase::Stopping);
                if !expected {
                    bail!(
                        "worker {} exited on its own ({status}); its log is {}",
                        worker.id,
                        worker.log.display()
                    );
                }
            }
        }
        match phase {
            Phase::Warmup if completed as usize >= args.invoices / 20 => {
                provider.arm_kill(kill_id, pid_of(&workers, kill_id));
                phase = Phase::KillArmed;
            }
            Phase::KillArmed if !provider.kills().is_empty() => {
                let term = workers
                    .iter()
                    .find(|w| w.id == term_id)
                    .context("term worker")?;
                support::service::signal(term.pid, "TERM")?;
                events.term_sent = Some(Instant::now());
                let live: Vec<String> = workers
                    .iter()
                    .filter(|w| w.id != kill_id && w.id != term_id)
                    .map(|w| w.id.clone())
                    .collect();
                provider.arm_stalls(&live);
                phase = Phase::Stopping;
            }
            Phase::Stopping => {
                let term = workers
                    .iter()
                    .find(|w| w.id == term_id)
                    .context("term worker")?;
                if term.exit.is_some() {
                    events.term_took = events.term_sent.map(|t| t.elapsed());
                    events.term_leases_left = count(
                        &database_url,
                        &format!(
                            "SELECT count(*) FROM invoices WHERE state = 'leased' AND leased_by = '{term_id}'"
                        ),
                    )
                    .await?;
                    phase = Phase::Running;
                } else if events.term_sent.is_some_and(|t| t.elapsed() > STOP_TIMEOUT) {
                    broken.push(format!(
                        "{term_id} did not exit within {STOP_TIMEOUT:?} of SIGTERM"
                    ));
                    phase = Phase::Running;
                }
            }
            Phase::Running
                if completed as usize >= args.invoices && provider.stalls_pending() == 0 =>
            {
                break;
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bail!(
                "gave up after {}s: {completed}/{} completed, phase {phase:?}, {} stalls pending",
                args.timeout_s,
                args.invoices,
                provider.stalls_pending()
            );
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!("e2e: {completed}/{} completed ({phase:?})", args.invoices);
            last_print = Instant::now();
        }
    }
    let billing = billing_started.elapsed();

    // The rest stop as they would in a deployment: SIGTERM, then exit 0.
    for worker in workers.iter_mut().filter(|w| w.exit.is_none()) {
        support::service::signal(worker.pid, "TERM")?;
    }
    for worker in workers.iter_mut().filter(|w| w.exit.is_none()) {
        match tokio::time::timeout(STOP_TIMEOUT, worker.child.wait()).await {
            Ok(status) => worker.exit = Some(status?),
            Err(_) => {
                broken.push(format!(
                    "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM",
                    worker.id
                ));
                let _ = worker.child.kill().await;
            }
        }
    }
    service.stop().await?;
    let record = provider.finish();

    let roles = Roles {
        kill: kill_id,
        term: term_id,
    };
    let mut report = Report::gather(&database_url, args, &workers, &roles, &events, record).await?;
    report.seed = seed;
    report.setup = setup;
    report.startup = startup;
    report.billing = billing;
    report.broken.splice(0..0, broken);
    Ok(report)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Billing; the kill is armed once 5% are completed.
    Warmup,
    /// The victim's next charge kills it.
    KillArmed,
    /// SIGTERM sent to the stopping worker; stalls armed for the others.
    Stopping,
    /// Until every invoice is completed and every stall resolved.
    Running,
}

#[derive(Default)]
struct Events {
    term_sent: Option<Instant>,
    term_took: Option<Duration>,
    term_leases_left: i64,
}

struct Roles {
    kill: &'static str,
    term: &'static str,
}

/// `target/debug/examples/worker`, which `cargo build --example worker`
/// builds (cargo cannot build a runnable example for a test target); refused
/// if older than its source.
fn rust_worker_binary(root: &Path) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("locating the target directory")?;
    let binary = profile_dir.join("examples").join("worker");
    let source = root.join("examples/worker.rs");
    let built = std::fs::metadata(&binary).and_then(|m| m.modified());
    let written = std::fs::metadata(&source)?.modified()?;
    match built {
        Ok(built) if built >= written => Ok(binary),
        _ => bail!(
            "{} is missing or older than {}: run `cargo build --example worker` first",
            binary.display(),
            source.display()
        ),
    }
}

fn worker_command(
    language: &str,
    id: &str,
    root: &Path,
    python_bin: &Path,
    rust_worker: &Path,
    service: &Service,
    provider: &Provider,
) -> Command {
    let lease = LEASE_SECONDS.to_string();
    let mut command = match language {
        "python" => {
            let mut c = Command::new(python_bin.join("python"));
            c.arg(root.join("clients/python/examples/worker.py")).args([
                "--target",
                &service.addr.to_string(),
                "--lease",
                &lease,
            ]);
            c
        }
        "node" => {
            let mut c = Command::new("node");
            c.arg(root.join("clients/node/examples/worker.js")).args([
                "--target",
                &service.addr.to_string(),
                "--lease",
                &lease,
            ]);
            c
        }
        _ => {
            let mut c = Command::new(rust_worker);
            c.args(["--target", &service.url(), "--lease", &format!("{lease}s")]);
            c.env("RUST_LOG", "info");
            c
        }
    };
    let wait = if language == "rust" { "2s" } else { "2" };
    let provider_timeout = if language == "rust" { "30s" } else { "30" };
    command
        .args(["--worker-id", id, "--provider", &provider.url()])
        .args(["--batch-size", "10", "--concurrency", "4", "--wait", wait])
        .args(["--provider-timeout", provider_timeout]);
    command
}

fn spawn_worker(
    mut command: Command,
    id: &str,
    language: &'static str,
    work: &Path,
) -> anyhow::Result<Worker> {
    let log = work.join(format!("{id}.log"));
    let out = std::fs::File::create(&log)?;
    let child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting worker {id}: {command:?}"))?;
    let pid = child.id().context("a worker's pid")?;
    Ok(Worker {
        id: id.to_owned(),
        language,
        child,
        pid,
        log,
        exit: None,
    })
}

fn pid_of(workers: &[Worker], id: &str) -> u32 {
    workers.iter().find(|w| w.id == id).map_or(0, |w| w.pid)
}

async fn wait_for_line(log: &Path, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(log).is_ok_and(|text| text.contains(needle)) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no {needle:?} in {} after {timeout:?}", log.display())
}

async fn submit(service: &Service, n: usize) -> anyhow::Result<()> {
    let mut client = CoordinatorServiceClient::connect(service.url()).await?;
    let currencies = ["EUR", "USD", "GBP"];
    let invoices: Vec<NewInvoice> = (0..n)
        .map(|i| NewInvoice {
            external_id: format!("e2e-{i}"),
            customer_id: format!("cus-{}", i % 97),
            amount_minor: 100 + (i as i64 * 7919) % 100_000,
            currency: currencies[i % currencies.len()].into(),
            ..Default::default()
        })
        .collect();
    for chunk in invoices.chunks(1000) {
        client
            .submit_invoices(SubmitInvoicesRequest {
                invoices: chunk.to_vec(),
            })
            .await
            .context("submitting invoices")?;
    }
    Ok(())
}

async fn count(database_url: &str, sql: &str) -> anyhow::Result<i64> {
    let mut conn = PgConnection::connect(database_url).await?;
    let n = sqlx::query_scalar(sql).fetch_one(&mut conn).await?;
    let _ = conn.close().await;
    Ok(n)
}

/// One row of the invoices table, as the checks need it.
#[derive(sqlx::FromRow)]
struct InvoiceRow {
    id: i64,
    customer_id: String,
    amount_minor: i64,
    currency: String,
    idempotency_key: String,
    state: String,
    provider_reference: Option<String>,
    completed_by: Option<String>,
}

/// What the run observed and what broke.
#[derive(Default)]
struct Report {
    seed: u64,
    setup: Duration,
    startup: Duration,
    billing: Duration,
    lines: Vec<(String, String)>,
    broken: Vec<String>,
}

impl Report {
    async fn gather(
        database_url: &str,
        args: &Args,
        workers: &[Worker],
        roles: &Roles,
        events: &Events,
        record: Record,
    ) -> anyhow::Result<Self> {
        let mut r = Report::default();
        let mut conn = PgConnection::connect(database_url).await?;
        let invoices: Vec<InvoiceRow> = sqlx::query_as(
            "SELECT id, customer_id, amount_minor, currency, idempotency_key::text AS idempotency_key,
                    state, provider_reference, completed_by
             FROM invoices ORDER BY id",
        )
        .fetch_all(&mut conn)
        .await?;
        let completions: HashMap<i64, i64> = sqlx::query_as::<_, (i64, i64)>(
            "SELECT invoice_id, count(*) FROM invoice_events WHERE kind = 'completed' GROUP BY invoice_id",
        )
        .fetch_all(&mut conn)
        .await?
        .into_iter()
        .collect();
        let shutdown_releases: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
            "SELECT worker_id, count(*) FROM invoice_events
             WHERE kind = 'released' AND detail = 'shutting down' GROUP BY worker_id",
        )
        .fetch_all(&mut conn)
        .await?
        .into_iter()
        .collect();
        // Refused heartbeats, by the lease (invoice, epoch) they were made with.
        let extend_refusals: HashMap<(i64, i32), i64> = sqlx::query_as::<_, (i64, i32, i64)>(
            "SELECT invoice_id, lease_epoch, count(*) FROM invoice_events
             WHERE kind = 'lease_lost' AND detail LIKE 'extend refused%' GROUP BY 1, 2",
        )
        .fetch_all(&mut conn)
        .await?
        .into_iter()
        .map(|(id, epoch, n)| ((id, epoch), n))
        .collect();
        let lease_lost_total = count(
            database_url,
            "SELECT count(*) FROM invoice_events WHERE kind = 'lease_lost'",
        )
        .await?;
        let _ = conn.close().await;

        // Every invoice completed, once.
        let completed = invoices.iter().filter(|i| i.state == "completed").count();
        r.line("invoices", args.invoices.to_string());
        r.check(
            invoices.len() == args.invoices,
            format!(
                "{} invoices in the database, {} submitted",
                invoices.len(),
                args.invoices
            ),
        );
        r.line(
            "completed",
            format!("{completed} (must be {})", args.invoices),
        );
        r.check(
            completed == args.invoices,
            format!("{} invoices not completed", args.invoices - completed),
        );
        let not_once: Vec<i64> = invoices
            .iter()
            .filter(|i| completions.get(&i.id).copied().unwrap_or(0) != 1)
            .map(|i| i.id)
            .collect();
        r.line(
            "invoices without exactly one 'completed' event",
            format!("{} (must be 0)", not_once.len()),
        );
        r.check(
            not_once.is_empty(),
            format!(
                "invoices without exactly one 'completed' event: {:?}",
                first(&not_once)
            ),
        );

        // Every key charged once, on the invoice's terms; repeats absorbed.
        let applied: HashMap<&str, &provider::Charge> = record
            .charges
            .iter()
            .filter(|c| c.applied)
            .map(|c| (c.key.as_str(), c))
            .collect();
        let applied_count = record.charges.iter().filter(|c| c.applied).count();
        let absorbed = record.charges.len() - applied_count;
        let keys: HashSet<&str> = invoices
            .iter()
            .map(|i| i.idempotency_key.as_str())
            .collect();
        r.line(
            "charge requests at the provider",
            record.charges.len().to_string(),
        );
        r.line(
            "charges applied",
            format!("{applied_count} (must be {})", args.invoices),
        );
        r.line(
            "repeats absorbed by the idempotency key",
            absorbed.to_string(),
        );
        r.check(
            applied_count == args.invoices,
            format!(
                "{applied_count} charges applied for {} invoices",
                args.invoices
            ),
        );
        r.check(
            applied.len() == applied_count,
            "a key was applied twice".to_owned(),
        );
        let mut wrong = Vec::new();
        for invoice in &invoices {
            match applied.get(invoice.idempotency_key.as_str()) {
                None => wrong.push(format!("invoice {} was never charged", invoice.id)),
                Some(c) => {
                    if (
                        c.invoice_id,
                        c.customer.as_str(),
                        c.amount,
                        c.currency.as_str(),
                    ) != (
                        invoice.id,
                        invoice.customer_id.as_str(),
                        invoice.amount_minor,
                        invoice.currency.as_str(),
                    ) {
                        wrong.push(format!(
                            "invoice {} charged on other terms: {c:?}",
                            invoice.id
                        ));
                    }
                    if invoice.provider_reference.as_deref() != Some(c.charge_id.as_str()) {
                        wrong.push(format!(
                            "invoice {} completed with reference {:?}, the provider's charge is {}",
                            invoice.id, invoice.provider_reference, c.charge_id
                        ));
                    }
                }
            }
        }
        let stray = record
            .charges
            .iter()
            .filter(|c| !keys.contains(c.key.as_str()))
            .count();
        r.check(
            stray == 0,
            format!("{stray} charges under keys no invoice has"),
        );
        r.line(
            "invoices charged on other terms or completed with another reference",
            format!("{} (must be 0)", wrong.len()),
        );
        r.check(
            wrong.is_empty(),
            format!("wrong charges: {:?}", first(&wrong)),
        );
        r.check(
            record.refused.is_empty(),
            format!(
                "the provider refused requests: {:?}",
                first(&record.refused)
            ),
        );

        // Who did the work.
        let mut by_worker: HashMap<&str, usize> = HashMap::new();
        for invoice in &invoices {
            if let Some(w) = &invoice.completed_by {
                *by_worker.entry(w.as_str()).or_default() += 1;
            }
        }
        for language in ["python", "node", "rust"] {
            let ids: Vec<&Worker> = workers.iter().filter(|w| w.language == language).collect();
            let done: Vec<String> = ids
                .iter()
                .map(|w| {
                    format!(
                        "{} {}",
                        w.id,
                        by_worker.get(w.id.as_str()).copied().unwrap_or(0)
                    )
                })
                .collect();
            r.line(
                &format!("{language} workers: completed by each"),
                done.join(", "),
            );
        }
        for worker in workers {
            r.check(
                by_worker.get(worker.id.as_str()).copied().unwrap_or(0) > 0,
                format!("{} completed no invoice", worker.id),
            );
        }

        // The SIGKILLed worker.
        let kills = &record.kills;
        r.line(
            "SIGKILLed worker",
            match kills.first() {
                Some(k) => format!(
                    "{} (right after charging invoice {})",
                    k.worker_id, k.invoice_id
                ),
                None => "none".into(),
            },
        );
        r.check(
            kills.len() == 1,
            format!("{} workers were killed, not 1", kills.len()),
        );
        if let Some(kill) = kills.first() {
            let invoice = invoices.iter().find(|i| i.id == kill.invoice_id);
            let charged = invoice.map_or(0, |i| {
                record
                    .charges
                    .iter()
                    .filter(|c| c.key == i.idempotency_key)
                    .count()
            });
            r.line(
                "  its charged invoice: charge requests under its key",
                format!("{charged} (must be 2 or more)"),
            );
            r.check(
                charged >= 2,
                format!(
                    "invoice {} was not charged again after the kill",
                    kill.invoice_id
                ),
            );
            r.check(
                invoice
                    .and_then(|i| i.completed_by.as_deref())
                    .is_some_and(|w| w != roles.kill),
                format!(
                    "invoice {} was not completed by another worker",
                    kill.invoice_id
                ),
            );
        }
        let killed = workers.iter().find(|w| w.id == roles.kill);
        r.check(
            killed
                .and_then(|w| w.exit)
                .is_some_and(|s| std::os::unix::process::ExitStatusExt::signal(&s) == Some(9)),
            format!("{} did not die of SIGKILL", roles.kill),
        );

        // The worker stopped with SIGTERM mid-run.
        let term = workers.iter().find(|w| w.id == roles.term);
        r.line(
            "SIGTERMed worker",
            format!(
                "{}: exited {} after {}, {} leases released with SHUTDOWN, {} still held (must be 0)",
                roles.term,
                term.and_then(|w| w.exit)
                    .map_or("-".into(), |s| s.code().map_or_else(|| s.to_string(), |c| c.to_string())),
                events.term_took.map_or("-".into(), |d| format!("{:.1}s", d.as_secs_f64())),
                shutdown_releases.get(roles.term).copied().unwrap_or(0),
                events.term_leases_left
            ),
        );
        r.check(
            term.and_then(|w| w.exit).is_some_and(|s| s.success()),
            format!("{} did not exit 0 after SIGTERM", roles.term),
        );
        r.check(
            events.term_leases_left == 0,
            format!(
                "{} still held {} leases after it exited",
                roles.term, events.term_leases_left
            ),
        );

        // The stalled charges: the heartbeat saw LEASE_LOST once, then stopped.
        let live: Vec<&Worker> = workers
            .iter()
            .filter(|w| w.id != roles.kill && w.id != roles.term)
            .collect();
        for worker in &live {
            let stalls: Vec<&provider::Stall> = record
                .stalls
                .iter()
                .filter(|s| s.worker_id == worker.id)
                .collect();
            let Some(stall) = stalls.first() else {
                r.broken
                    .push(format!("{} never had a charge stalled", worker.id));
                continue;
            };
            let refusals = extend_refusals
                .get(&(stall.invoice_id, stall.epoch))
                .copied()
                .unwrap_or(0);
            r.line(
                &format!("stalled charge of {}", worker.id),
                format!(
                    "invoice {}: lease taken back {}, heartbeats refused LEASE_LOST {refusals} (must be 1)",
                    stall.invoice_id, stall.lease_taken_back
                ),
            );
            r.check(
                stall.lease_taken_back,
                format!("the stalled lease of {} was never taken back", worker.id),
            );
            r.check(
                refusals == 1,
                format!(
                    "{}'s heartbeat was refused {refusals} times on its lost lease, not once",
                    worker.id
                ),
            );
        }
        r.line("LEASE_LOST refusals in all", lease_lost_total.to_string());
        for worker in &live {
            r.check(
                worker.exit.is_some_and(|s| s.success()),
                format!("{} did not exit 0 after the final SIGTERM", worker.id),
            );
        }
        Ok(r)
    }

    fn line(&mut self, what: &str, value: String) {
        self.lines.push((what.to_owned(), value));
    }

    fn check(&mut self, ok: bool, broken: String) {
        if !ok {
            self.broken.push(broken);
        }
    }

    fn print(&self, elapsed: Duration) {
        println!("\n| end-to-end run | |\n| --- | --- |");
        println!("| seed | {} |", self.seed);
        println!("| workers | 2 python, 2 node, 1 rust |");
        for (what, value) in &self.lines {
            println!("| {what} | {value} |");
        }
        println!(
            "| elapsed | {:.1}s (installing the clients {:.1}s, starting the service and workers {:.1}s, billing {:.1}s) |",
            elapsed.as_secs_f64(),
            self.setup.as_secs_f64(),
            self.startup.as_secs_f64(),
            self.billing.as_secs_f64()
        );
    }
}

fn first<T: std::fmt::Debug>(items: &[T]) -> &[T] {
    &items[..items.len().min(5)]
}
