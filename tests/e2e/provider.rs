//! The fake billing provider all workers charge, which keeps the record the
//! checks need.
//!
//! It speaks the API the example workers call (the same as
//! `clients/fake_provider.py`): `POST /v1/charges` with an `Idempotency-Key`
//! header and a JSON body `{customer, amount, currency, metadata: {invoice_id,
//! worker_id}}`. The first charge under a key is applied; a repeat is absorbed
//! and answered with the first charge, as a real provider does. Every request
//! is recorded before it is answered.
//!
//! Two faults can be armed per worker, each for its next charge:
//! - kill: the charge is applied, then the worker is SIGKILLed before it hears
//!   the answer, so it dies holding leases, one of them charged;
//! - stall: the charge is applied, and the answer is held until the rescuer
//!   has taken the lease back (the service runs with a short `--max-hold`, so
//!   the heartbeat cannot keep it) and then `STALL_AFTER_LOSS` longer.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use sqlx::{Connection as _, PgConnection};
use tokio::net::TcpListener;

/// How long a stalled answer is held after the lease was taken back: long
/// enough for two more heartbeats, which must not come.
pub const STALL_AFTER_LOSS: Duration = Duration::from_millis(1500);
/// A stall whose lease is never taken back gives up after this.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// Every charge takes at least this long, like a real provider call.
const LATENCY: Duration = Duration::from_millis(5);

/// One charge request as the provider received it.
#[derive(Clone, Debug)]
pub struct Charge {
    pub key: String,
    pub invoice_id: i64,
    pub worker_id: String,
    pub customer: String,
    pub amount: i64,
    pub currency: String,
    /// The charge id answered (the first charge's, for a repeat).
    pub charge_id: String,
    /// False when a charge under this key had already been applied.
    pub applied: bool,
}

/// A stalled charge: whose, and what became of its lease.
#[derive(Clone, Debug)]
pub struct Stall {
    pub worker_id: String,
    pub invoice_id: i64,
    /// The lease epoch the stalled worker held.
    pub epoch: i32,
    /// The lease was taken back while the answer was held.
    pub lease_taken_back: bool,
}

/// A worker killed during its charge.
#[derive(Clone, Debug)]
pub struct Kill {
    pub worker_id: String,
    pub invoice_id: i64,
}

/// Everything the provider saw.
#[derive(Default, Debug)]
pub struct Record {
    pub charges: Vec<Charge>,
    pub stalls: Vec<Stall>,
    pub kills: Vec<Kill>,
    /// Requests refused as malformed, or reusing a key with other terms.
    pub refused: Vec<String>,
}

#[derive(Default)]
struct State {
    record: Record,
    /// Charge id by idempotency key, with the terms it was made on.
    applied: HashMap<String, (String, String, i64, String)>,
    /// Workers whose next charge stalls.
    stall_armed: HashSet<String>,
    /// Worker whose next charge kills it, and its pid.
    kill_armed: Option<(String, u32)>,
    /// Stalls holding their answer now.
    stalling: usize,
}

pub struct Provider {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Provider {
    /// Serves on a free loopback port. `database_url` is read to see when a
    /// stalled lease has been taken back.
    pub async fn start(database_url: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (state, database_url) = (state.clone(), database_url.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |request| {
                            handle(request, state.clone(), database_url.clone())
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Ok(Self { addr, state, task })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next charge of each of `workers` stalls.
    pub fn arm_stalls(&self, workers: &[String]) {
        lock(&self.state)
            .stall_armed
            .extend(workers.iter().cloned());
    }

    /// The next charge of `worker` (process `pid`) kills it.
    pub fn arm_kill(&self, worker: &str, pid: u32) {
        lock(&self.state).kill_armed = Some((worker.to_owned(), pid));
    }

    /// Stalls still holding their answer.
    pub fn stalls_pending(&self) -> usize {
        let state = lock(&self.state);
        state.stall_armed.len() + state.stalling
    }

    pub fn kills(&self) -> Vec<Kill> {
        lock(&self.state).record.kills.clone()
    }

    pub fn finish(self) -> Record {
        self.task.abort();
        std::mem::take(&mut lock(&self.state).record)
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(
    request: Request<Incoming>,
    state: Arc<Mutex<State>>,
    database_url: String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != hyper::Method::POST || request.uri().path() != "/v1/charges" {
        return Ok(json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        ));
    }
    let key = request
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Ok(json(StatusCode::BAD_REQUEST, serde_json::json!({}))),
    };
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let charge = Charge {
        key: key.clone(),
        invoice_id: text(&parsed["metadata"]["invoice_id"])
            .parse()
            .unwrap_or(-1),
        worker_id: text(&parsed["metadata"]["worker_id"]),
        customer: text(&parsed["customer"]),
        amount: parsed["amount"].as_i64().unwrap_or(-1),
        currency: text(&parsed["currency"]),
        charge_id: String::new(),
        applied: false,
    };
    if key.is_empty() || charge.invoice_id < 0 || charge.amount < 0 || charge.worker_id.is_empty() {
        let why = format!("malformed charge: key {key:?}, body {parsed}");
        lock(&state).record.refused.push(why.clone());
        return Ok(json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": why}),
        ));
    }
    tokio::time::sleep(LATENCY).await;

    let (answer, fault) = {
        let mut state = lock(&state);
        let terms = (
            charge.customer.clone(),
            charge.currency.clone(),
            charge.amount,
        );
        let (charge_id, applied) = match state.applied.get(&key) {
            Some((id, customer, amount, currency))
                if (customer, currency, *amount) == (&terms.0, &terms.1, terms.2) =>
            {
                (id.clone(), false)
            }
            Some(_) => {
                let why = format!("key {key} reused with other terms by {}", charge.worker_id);
                state.record.refused.push(why.clone());
                return Ok(json(
                    StatusCode::CONFLICT,
                    serde_json::json!({"error": why}),
                ));
            }
            None => {
                let id = format!("ch_{}", state.applied.len() + 1);
                state
                    .applied
                    .insert(key.clone(), (id.clone(), terms.0, terms.2, terms.1));
                (id, true)
            }
        };
        let fault = if state
            .kill_armed
            .as_ref()
            .is_some_and(|(w, _)| *w == charge.worker_id)
        {
            state.kill_armed.take().map(|(_, pid)| Fault::Kill(pid))
        } else if state.stall_armed.remove(&charge.worker_id) {
            state.stalling += 1;
            Some(Fault::Stall)
        } else {
            None
        };
        state.record.charges.push(Charge {
            charge_id: charge_id.clone(),
            applied,
            ..charge.clone()
        });
        let answer = serde_json::json!({"id": charge_id, "replayed": !applied});
        (answer, fault)
    };

    match fault {
        Some(Fault::Kill(pid)) => {
            let _ = crate::support::service::signal(pid, "KILL");
            lock(&state).record.kills.push(Kill {
                worker_id: charge.worker_id.clone(),
                invoice_id: charge.invoice_id,
            });
        }
        Some(Fault::Stall) => {
            // A task of its own: a worker that gives up on the charge drops
            // this request, and the stall must still be seen through.
            let stall = tokio::spawn(async move {
                let stall = stall_until_taken_back(&database_url, &charge).await;
                let mut state = lock(&state);
                state.record.stalls.push(stall);
                state.stalling -= 1;
            });
            let _ = stall.await;
        }
        None => {}
    }
    Ok(json(StatusCode::OK, answer))
}

enum Fault {
    Kill(u32),
    Stall,
}

/// Holds the answer until the charging worker's lease is no longer live,
/// then `STALL_AFTER_LOSS` more.
async fn stall_until_taken_back(database_url: &str, charge: &Charge) -> Stall {
    let mut stall = Stall {
        worker_id: charge.worker_id.clone(),
        invoice_id: charge.invoice_id,
        epoch: -1,
        lease_taken_back: false,
    };
    let Ok(epoch) = lease_epoch(database_url, charge.invoice_id).await else {
        return stall;
    };
    stall.epoch = epoch;
    let deadline = Instant::now() + STALL_LIMIT;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(true) = taken_back(database_url, charge.invoice_id, epoch).await {
            stall.lease_taken_back = true;
            tokio::time::sleep(STALL_AFTER_LOSS).await;
            break;
        }
    }
    stall
}

async fn lease_epoch(database_url: &str, invoice_id: i64) -> anyhow::Result<i32> {
    let mut conn = PgConnection::connect(database_url).await?;
    let epoch = sqlx::query_scalar("SELECT lease_epoch FROM invoices WHERE id = $1")
        .bind(invoice_id)
        .fetch_one(&mut conn)
        .await
        .context("reading a lease epoch")?;
    let _ = conn.close().await;
    Ok(epoch)
}

/// True once the lease of `epoch` is over without being settled by its holder:
/// the rescuer took it back, or another worker has claimed since.
async fn taken_back(database_url: &str, invoice_id: i64, epoch: i32) -> anyhow::Result<bool> {
    let mut conn = PgConnection::connect(database_url).await?;
    let over: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM invoice_events
                        WHERE invoice_id = $1 AND lease_epoch = $2 AND kind = 'expired')
             OR EXISTS (SELECT 1 FROM invoices WHERE id = $1 AND lease_epoch > $2)",
    )
    .bind(invoice_id)
    .bind(epoch)
    .fetch_one(&mut conn)
    .await?;
    let _ = conn.close().await;
    Ok(over)
}
