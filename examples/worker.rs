//! An example billing worker: claims invoices from billing-coordinator and
//! charges them at a payment provider, with the loop the lease contract asks
//! for.
//!
//! ```text
//! cargo run --example worker -- --target http://127.0.0.1:50051 --provider http://127.0.0.1:8080
//! ```
//!
//! - Claims a batch with a long-poll (`wait`), so an idle worker makes one
//!   call every `wait` instead of spinning.
//! - From claim to settlement, a heartbeat task per lease extends it every
//!   third of the lease duration. When the service answers `LEASE_LOST`, the
//!   provider call in flight is dropped: the invoice is someone else's now,
//!   and their attempt sends the same idempotency key. When an operator asked
//!   to cancel the invoice, a charge not yet started is not made.
//! - A charge completes the invoice; a refused or failed charge releases it
//!   as `FAILED` (the next attempt sends the same idempotency key, so a charge
//!   whose outcome was unknown is not made twice); a cancellation releases it
//!   as `SHUTDOWN`. Completions and releases are retried on `UNAVAILABLE`,
//!   `ABORTED` and `DEADLINE_EXCEEDED` with the same token, which the service
//!   makes safe.
//! - SIGTERM or Ctrl-C stops claiming, lets the invoices being charged
//!   finish, and releases the ones not yet started with reason `SHUTDOWN`. A
//!   long-poll in flight gets two seconds to answer before it is dropped.
//!
//! The provider speaks a small HTTP API in the style of real ones
//! (`POST /v1/charges` with an `Idempotency-Key` header);
//! `clients/fake_provider.py` serves it.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use billing_coordinator::proto::{
    ClaimInvoicesRequest, ClaimedInvoice, CompleteInvoiceRequest, ExtendLeaseRequest,
    ReleaseClaimRequest, ReleaseReason, coordinator_service_client::CoordinatorServiceClient,
};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Full};
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Request, Status,
    transport::{Channel, Endpoint},
};
use tonic_types::StatusExt as _;

/// The `google.rpc.ErrorInfo` reason of a write made with a lease that is not live.
const REASON_LEASE_LOST: &str = "LEASE_LOST";
/// How long completions and releases are retried before the worker gives up
/// (the lease then expires, and the invoice is billed again under its key).
const RETRY_FOR: Duration = Duration::from_secs(120);
/// Deadline of every call but the long-poll, which gets `wait` on top.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claim in flight may still answer after SIGTERM. A claim that
/// found work answers within milliseconds, and its leases are then released;
/// one still open after this is long-polling an empty queue, and dropping it
/// loses nothing (dropping a claim the service has just granted would strand
/// its leases until they expire).
const CLAIM_STOP_GRACE: Duration = Duration::from_secs(2);

/// An example billing worker for billing-coordinator.
#[derive(Debug, Parser)]
struct Args {
    /// The coordinator's URL.
    #[arg(long, env = "BC_TARGET", default_value = "http://127.0.0.1:50051")]
    target: String,
    /// The payment provider's base URL.
    #[arg(long, env = "BC_PROVIDER_URL", default_value = "http://127.0.0.1:8080")]
    provider: String,
    /// Recorded as the lease holder; `<host>/pid-<pid>` by default.
    #[arg(long)]
    worker_id: Option<String>,
    /// Claim only from this queue (repeatable).
    #[arg(long)]
    queue: Vec<String>,
    /// Invoices per claim.
    #[arg(long, default_value_t = 10)]
    batch_size: i32,
    /// Invoices charged at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Lease duration, such as `30s`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Long-poll wait of a claim.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// Deadline of a provider call.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    provider_timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let channel = Endpoint::from_shared(args.target.clone())
        .with_context(|| format!("--target {}", args.target))?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let worker = Arc::new(Worker {
        client: CoordinatorServiceClient::new(channel),
        provider: Provider {
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
            charges_url: format!("{}/v1/charges", args.provider.trim_end_matches('/'))
                .parse()
                .with_context(|| format!("--provider {}", args.provider))?,
            worker_id: worker_id.clone(),
            timeout: args.provider_timeout,
        },
        worker_id,
        args,
        stats: Stats::default(),
    });

    let shutdown = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            shutdown.cancel();
        }
    });

    tracing::info!(
        "worker {} claiming from {}",
        worker.worker_id,
        worker.args.target
    );
    worker.clone().run(shutdown).await?;
    let s = &worker.stats;
    tracing::info!(
        "worker {} stopped: {} claimed, {} completed, {} released failed, {} released on shutdown, {} lost, {} given up",
        worker.worker_id,
        s.claimed.load(Ordering::Relaxed),
        s.completed.load(Ordering::Relaxed),
        s.released_failed.load(Ordering::Relaxed),
        s.released_shutdown.load(Ordering::Relaxed),
        s.lease_lost.load(Ordering::Relaxed),
        s.gave_up.load(Ordering::Relaxed),
    );
    Ok(())
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}/pid-{}", std::process::id())
}

/// What happened to each lease.
#[derive(Default)]
struct Stats {
    claimed: AtomicUsize,
    completed: AtomicUsize,
    released_failed: AtomicUsize,
    released_shutdown: AtomicUsize,
    lease_lost: AtomicUsize,
    gave_up: AtomicUsize,
}

fn count(counter: &AtomicUsize) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One claimed invoice, shared by its heartbeat and its billing.
struct Lease {
    claimed: ClaimedInvoice,
    invoice_id: i64,
    /// Fires when the service answers `LEASE_LOST`: the invoice is someone else's.
    lost: CancellationToken,
    /// An operator asked to cancel the invoice: do not start the charge.
    cancel_requested: AtomicBool,
    /// Fires when the lease is settled: the heartbeat ends after its call in flight.
    settled: CancellationToken,
    heartbeat: Mutex<Option<JoinHandle<()>>>,
}

impl Lease {
    /// Ends the heartbeat, waiting for its call in flight, so that no
    /// extension reaches the service after the completion or release.
    async fn stop_heartbeat(&self) {
        self.settled.cancel();
        let heartbeat = self
            .heartbeat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(heartbeat) = heartbeat {
            let _ = heartbeat.await;
        }
    }
}

struct Worker {
    client: CoordinatorServiceClient<Channel>,
    provider: Provider,
    worker_id: String,
    args: Args,
    stats: Stats,
}

impl Worker {
    /// Claims and bills until `shutdown`; fails only on a claim that retrying cannot fix.
    async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut failures = 0;
        while !shutdown.is_cancelled() {
            let cut_short = async {
                shutdown.cancelled().await;
                tokio::time::sleep(CLAIM_STOP_GRACE).await;
            };
            let claimed = tokio::select! {
                () = cut_short => return Ok(()),
                claimed = self.claim() => claimed,
            };
            let claimed = match claimed {
                Ok(claimed) => claimed,
                Err(status) if retryable(&status) => {
                    failures += 1;
                    let delay = backoff(failures);
                    tracing::warn!(code = ?status.code(), "claiming failed; trying again in {delay:?}");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
                Err(status) => return Err(status).context("claiming invoices"),
            };
            failures = 0;
            self.stats
                .claimed
                .fetch_add(claimed.len(), Ordering::Relaxed);
            // Every lease gets its heartbeat at once: the ones waiting their
            // turn must stay alive too.
            let leases: Vec<_> = claimed
                .into_iter()
                .map(|claimed| {
                    let lease = Arc::new(Lease {
                        invoice_id: claimed.invoice.as_ref().map_or(0, |i| i.invoice_id),
                        claimed,
                        lost: CancellationToken::new(),
                        cancel_requested: AtomicBool::new(false),
                        settled: CancellationToken::new(),
                        heartbeat: Mutex::new(None),
                    });
                    let heartbeat = tokio::spawn(self.clone().heartbeat(lease.clone()));
                    *lease.heartbeat.lock().unwrap_or_else(|e| e.into_inner()) = Some(heartbeat);
                    lease
                })
                .collect();
            futures::stream::iter(leases)
                .map(|lease| {
                    let (worker, shutdown) = (self.clone(), shutdown.clone());
                    async move {
                        worker.process(&lease, &shutdown).await;
                        lease.stop_heartbeat().await;
                    }
                })
                .buffer_unordered(self.args.concurrency.max(1))
                .collect::<Vec<()>>()
                .await;
        }
        Ok(())
    }

    async fn claim(&self) -> Result<Vec<ClaimedInvoice>, Status> {
        let mut request = Request::new(ClaimInvoicesRequest {
            worker_id: self.worker_id.clone(),
            max_count: self.args.batch_size,
            lease_duration: Some(to_proto(self.args.lease)),
            queues: self.args.queue.clone(),
            wait: Some(to_proto(self.args.wait)),
        });
        request.set_timeout(self.args.wait + RPC_TIMEOUT);
        Ok(self
            .client
            .clone()
            .claim_invoices(request)
            .await?
            .into_inner()
            .invoices)
    }

    async fn process(&self, lease: &Lease, shutdown: &CancellationToken) {
        if lease.lost.is_cancelled() {
            return count(&self.stats.lease_lost);
        }
        // The last moment to stop is before the charge. A cancelled invoice
        // released this way becomes CANCELLED; on shutdown it goes to
        // another worker at once, without counting the attempt.
        if shutdown.is_cancelled() || lease.cancel_requested.load(Ordering::SeqCst) {
            return self.release(lease, ReleaseReason::Shutdown, None).await;
        }
        // Once started, a charge is only dropped if the lease is lost: then
        // the next holder's attempt sends the same idempotency key. After a
        // cancellation it runs on, and a charge made is completed.
        let charged = tokio::select! {
            charged = self.provider.charge(lease) => charged,
            () = lease.lost.cancelled() => {
                tracing::info!(invoice = lease.invoice_id, "lease lost, charge dropped");
                return count(&self.stats.lease_lost);
            }
        };
        match charged {
            Ok(reference) => self.complete(lease, reference).await,
            Err(failure) => {
                tracing::info!(
                    invoice = lease.invoice_id,
                    "charge failed: {}",
                    failure.message
                );
                self.release(lease, ReleaseReason::Failed, Some(failure))
                    .await;
            }
        }
    }

    async fn complete(&self, lease: &Lease, provider_reference: String) {
        lease.stop_heartbeat().await;
        let request = CompleteInvoiceRequest {
            invoice_id: lease.invoice_id,
            lease_token: lease.claimed.lease_token.clone(),
            provider_reference,
        };
        let answer = retrying(|| {
            let (mut client, request) = (self.client.clone(), request.clone());
            async move { client.complete_invoice(timed(request)).await }
        })
        .await;
        match answer {
            Ok(_) => count(&self.stats.completed),
            Err(status) => self.settle_failed(lease, "completing", &status),
        }
    }

    async fn release(&self, lease: &Lease, reason: ReleaseReason, failure: Option<ChargeFailed>) {
        lease.stop_heartbeat().await;
        let (error, retry_after) = match failure {
            Some(f) => (clean_error(&f.message), f.retry_after.map(to_proto)),
            None => (String::new(), None),
        };
        let request = ReleaseClaimRequest {
            invoice_id: lease.invoice_id,
            lease_token: lease.claimed.lease_token.clone(),
            reason: reason as i32,
            error,
            retry_after,
        };
        let answer = retrying(|| {
            let (mut client, request) = (self.client.clone(), request.clone());
            async move { client.release_claim(timed(request)).await }
        })
        .await;
        match (answer, reason) {
            (Ok(_), ReleaseReason::Failed) => count(&self.stats.released_failed),
            (Ok(_), _) => count(&self.stats.released_shutdown),
            (Err(status), _) => self.settle_failed(lease, "releasing", &status),
        }
    }

    fn settle_failed(&self, lease: &Lease, doing: &str, status: &Status) {
        if lease_lost(status) {
            tracing::warn!(
                invoice = lease.invoice_id,
                "lease lost before {doing} it; it belongs to another worker now"
            );
            count(&self.stats.lease_lost);
        } else {
            tracing::error!(invoice = lease.invoice_id, code = ?status.code(), "{doing} failed: {}", status.message());
            count(&self.stats.gave_up);
        }
    }

    /// Extends `lease` every third of its duration until it is settled or lost.
    async fn heartbeat(self: Arc<Self>, lease: Arc<Lease>) {
        let every = self.args.lease / 3;
        loop {
            tokio::select! {
                () = lease.settled.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            // Not raced against `settled`: settlement waits for this call, so
            // a heartbeat never lands after a completion.
            let mut request = Request::new(ExtendLeaseRequest {
                invoice_id: lease.invoice_id,
                lease_token: lease.claimed.lease_token.clone(),
                lease_duration: Some(to_proto(self.args.lease)),
            });
            request.set_timeout(every.min(RPC_TIMEOUT));
            match self.client.clone().extend_lease(request).await {
                Ok(answer) => {
                    if answer.into_inner().cancel_requested
                        && !lease.cancel_requested.swap(true, Ordering::SeqCst)
                    {
                        tracing::info!(invoice = lease.invoice_id, "cancellation requested");
                    }
                }
                Err(status) if lease_lost(&status) || status.code() == Code::NotFound => {
                    tracing::warn!(
                        invoice = lease.invoice_id,
                        "lease lost: {}",
                        status.message()
                    );
                    lease.lost.cancel();
                    return;
                }
                // The next beat tries again; the lease has two more beats' worth of time.
                Err(status) => {
                    tracing::warn!(invoice = lease.invoice_id, code = ?status.code(), "heartbeat failed");
                }
            }
        }
    }
}

/// A refused or failed charge.
struct ChargeFailed {
    message: String,
    /// The provider's Retry-After, if it gave one.
    retry_after: Option<Duration>,
}

/// A client for the provider's charge endpoint.
struct Provider {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    charges_url: hyper::Uri,
    worker_id: String,
    timeout: Duration,
}

impl Provider {
    /// Charges the invoice under its idempotency key; returns the provider's charge id.
    async fn charge(&self, lease: &Lease) -> Result<String, ChargeFailed> {
        let unknown = |e: &dyn std::fmt::Display| ChargeFailed {
            // Timed out or cut off: the charge may or may not have been made.
            // The next attempt sends the same idempotency key, so the
            // provider will not make it twice.
            message: format!("provider call failed, outcome unknown: {e}"),
            retry_after: None,
        };
        let invoice = lease.claimed.invoice.clone().unwrap_or_default();
        let body = serde_json::json!({
            "customer": invoice.customer_id,
            "amount": invoice.amount_minor,
            "currency": invoice.currency,
            "metadata": {"invoice_id": invoice.invoice_id.to_string(), "worker_id": self.worker_id},
        });
        let request = hyper::Request::post(self.charges_url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &lease.claimed.idempotency_key)
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| unknown(&e))?;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| unknown(&e))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
                .and_then(|s| Duration::try_from_secs_f64(s).ok());
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unknown(&e))?
                .to_bytes();
            Ok((status, retry_after, body))
        };
        let (status, retry_after, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|e| unknown(&e))??;
        if !status.is_success() {
            // Refused (a declined card, a rate limit): try again later, when
            // the provider says so if it does.
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(ChargeFailed {
                message: format!("provider answered {status}: {text}"),
                retry_after,
            });
        }
        let charge: serde_json::Value = serde_json::from_slice(&body).map_err(|e| unknown(&e))?;
        charge["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| unknown(&"the answer has no charge id"))
    }
}

/// Calls `call` until it succeeds, fails for good, or `RETRY_FOR` has passed.
async fn retrying<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let give_up_at = tokio::time::Instant::now() + RETRY_FOR;
    let mut failures = 0;
    loop {
        match call().await {
            Err(status) if retryable(&status) => {
                failures += 1;
                let delay = backoff(failures);
                if tokio::time::Instant::now() + delay > give_up_at {
                    return Err(status);
                }
                tracing::warn!(code = ?status.code(), "retrying in {delay:?} with the same token");
                tokio::time::sleep(delay).await;
            }
            answer => return answer,
        }
    }
}

/// Failures after which the same call may simply be sent again: the call may
/// or may not have taken effect, and the same token makes a repeat harmless.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted
    )
}

fn lease_lost(status: &Status) -> bool {
    status.code() == Code::FailedPrecondition
        && status
            .get_details_error_info()
            .is_some_and(|info| info.reason == REASON_LEASE_LOST)
}

/// Exponential from 100 ms up to 5 s, with equal jitter.
fn backoff(failures: u32) -> Duration {
    let ceiling = Duration::from_millis(100)
        .saturating_mul(1 << failures.clamp(1, 11).saturating_sub(1))
        .min(Duration::from_secs(5));
    ceiling / 2 + ceiling.mul_f64(rand::random::<f64>() / 2.0)
}

fn timed<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(RPC_TIMEOUT);
    request
}

fn to_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The service refuses NUL and keeps at most 4096 bytes of a release's error.
fn clean_error(error: &str) -> String {
    let mut error = error.replace('\0', "");
    let mut end = error.len().min(4096);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    error.truncate(end);
    error
}
