//! Spawning the real server against a fresh database, and talking to it.

use std::time::Duration;

use billing_coordinator::{
    coordinator::CoordinatorConfig,
    lease::Backoff,
    proto::{
        self, ClaimInvoicesRequest, ClaimedInvoice, NewInvoice, SubmitInvoicesRequest,
        coordinator_service_client::CoordinatorServiceClient,
    },
    rescuer::Rescuer,
    startup::{Application, Settings},
    store::{DEFAULT_FULL_SCAN_INTERVAL, FUNNEL_CONNECTIONS, PoolSettings, RescueCounts, Store},
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

use crate::support::postgres::PgServer;

/// Backoff short enough that tests never wait on it; the tests of backoff
/// itself set their own.
pub const TEST_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(1),
    max: Duration::from_millis(10),
};

/// A running server with its own database.
pub struct TestApp {
    pub client: CoordinatorServiceClient<Channel>,
    pub health: HealthClient<Channel>,
    /// A pool of our own, for asserting on rows.
    pub db: PgPool,
    /// The server's own store, for driving its maintenance by hand.
    pub store: Store,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Settings for tests: the rescuer off (tests drive it with `rescue`), so
/// that nothing changes rows behind a test's back.
pub fn test_settings(database_url: String) -> Settings {
    Settings {
        database_url,
        pool: PoolSettings {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            full_scan_interval: DEFAULT_FULL_SCAN_INTERVAL,
            funnel_connections: FUNNEL_CONNECTIONS,
        },
        listen_addr: "127.0.0.1:0".parse().expect("a socket address"),
        migrate: true,
        coordinator: CoordinatorConfig {
            lease_min: Duration::from_secs(1),
            lease_default: Duration::from_secs(30),
            lease_max: Duration::from_secs(3600),
            max_hold: Duration::from_secs(4 * 3600),
            long_poll_max: Duration::from_secs(30),
            default_max_attempts: 5,
            backoff: TEST_BACKOFF,
            poll_interval: Duration::from_secs(1),
        },
        rescue_interval: None,
        audit_retention: None,
        health_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(5),
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let database_url = PgServer::shared()
        .create_database()
        .await
        .expect("a fresh database");
    let mut settings = test_settings(database_url.clone());
    configure(&mut settings);
    spawn_with_settings(settings).await
}

pub async fn spawn_with_settings(settings: Settings) -> TestApp {
    // The service's warnings and errors, printed with a failing test's
    // output: an INTERNAL status says no more than "internal error" to the
    // caller, and its cause is only in the log.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let database_url = settings.database_url.clone();
    let app = Application::build(settings).await.expect("the app builds");
    let addr = app.local_addr();
    let store = app.store();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("a URI")
        .connect()
        .await
        .expect("the server accepts connections");
    let db = PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy(&database_url)
        .expect("a pool for assertions");
    TestApp {
        client: CoordinatorServiceClient::new(channel.clone()),
        health: HealthClient::new(channel),
        db,
        store,
        shutdown: Some(tx),
        server: Some(server),
    }
}

impl TestApp {
    /// Submits `invoice`s and returns their ids.
    pub async fn submit(&self, invoices: Vec<NewInvoice>) -> Vec<i64> {
        self.client
            .clone()
            .submit_invoices(SubmitInvoicesRequest { invoices })
            .await
            .expect("submit succeeds")
            .into_inner()
            .results
            .into_iter()
            .map(|r| r.invoice_id)
            .collect()
    }

    /// Submits `n` plain invoices named `{prefix}-{i}`, in batches of 1000.
    pub async fn submit_many(&self, prefix: &str, n: usize) -> Vec<i64> {
        let mut ids = Vec::with_capacity(n);
        let all: Vec<NewInvoice> = (0..n).map(|i| invoice(&format!("{prefix}-{i}"))).collect();
        for chunk in all.chunks(1000) {
            ids.extend(self.submit(chunk.to_vec()).await);
        }
        ids
    }

    pub async fn claim(&self, worker: &str, max_count: i32) -> Vec<ClaimedInvoice> {
        self.try_claim(claim_request(worker, max_count))
            .await
            .expect("claim succeeds")
    }

    pub async fn try_claim(
        &self,
        request: ClaimInvoicesRequest,
    ) -> Result<Vec<ClaimedInvoice>, Status> {
        Ok(self
            .client
            .clone()
            .claim_invoices(request)
            .await?
            .into_inner()
            .invoices)
    }

    pub async fn complete(
        &self,
        claimed: &ClaimedInvoice,
    ) -> Result<proto::CompleteInvoiceResponse, Status> {
        self.client
            .clone()
            .complete_invoice(proto::CompleteInvoiceRequest {
                invoice_id: id_of(claimed),
                lease_token: claimed.lease_token.clone(),
                provider_reference: String::new(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn get(&self, invoice_id: i64) -> proto::Invoice {
        self.get_by(proto::get_invoice_request::Id::InvoiceId(invoice_id))
            .await
    }

    pub async fn get_by_external_id(&self, external_id: &str) -> proto::Invoice {
        self.get_by(proto::get_invoice_request::Id::ExternalId(
            external_id.to_owned(),
        ))
        .await
    }

    async fn get_by(&self, id: proto::get_invoice_request::Id) -> proto::Invoice {
        self.client
            .clone()
            .get_invoice(proto::GetInvoiceRequest { id: Some(id) })
            .await
            .expect("get succeeds")
            .into_inner()
            .invoice
            .expect("an invoice")
    }

    /// Moves the expiry of these invoices' leases into the past, as if the
    /// lease time had run out, without sleeping.
    pub async fn expire_leases(&self, ids: &[i64]) {
        sqlx::query(
            "UPDATE invoices SET lease_expires_at = now() - interval '1 second'
             WHERE id = ANY($1) AND state = 'leased'",
        )
        .bind(ids)
        .execute(&self.db)
        .await
        .expect("leases moved into the past");
    }

    /// One pass of the rescuer, as every replica runs it.
    pub async fn rescue(&self) -> RescueCounts {
        Rescuer::new(self.store.clone(), TEST_BACKOFF)
            .run_once(None)
            .await
            .expect("rescue succeeds")
    }

    /// The invoice rows' states, by id.
    pub async fn count_in_state(&self, state: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM invoices WHERE state = $1")
            .bind(state)
            .fetch_one(&self.db)
            .await
            .expect("count")
    }

    /// Every row, as text, to show a bad request changed nothing.
    pub async fn snapshot(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT row_to_json(i)::text FROM invoices i ORDER BY id")
            .fetch_all(&self.db)
            .await
            .expect("snapshot")
    }

    /// Sends the shutdown signal without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.take().expect("the server is running")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// `n` valid invoices, spread over `queues` in turn.
pub fn invoices_in_queues(n: usize, queues: &[&str]) -> Vec<NewInvoice> {
    (0..n)
        .map(|i| {
            let mut new = invoice(&format!("inv-{i}"));
            new.queue = queues[i % queues.len()].into();
            new
        })
        .collect()
}

/// A valid invoice with external id `external_id`.
pub fn invoice(external_id: &str) -> NewInvoice {
    NewInvoice {
        external_id: external_id.to_owned(),
        queue: String::new(),
        customer_id: format!("cus-{external_id}"),
        amount_minor: 1999,
        currency: "EUR".to_owned(),
        available_at: None,
        priority: 0,
        max_attempts: 0,
        metadata: [("plan".to_owned(), "pro".to_owned())].into(),
        serialization_key: String::new(),
    }
}

pub fn claim_request(worker: &str, max_count: i32) -> ClaimInvoicesRequest {
    ClaimInvoicesRequest {
        worker_id: worker.to_owned(),
        max_count,
        lease_duration: None,
        queues: Vec::new(),
        wait: None,
    }
}

pub fn id_of(claimed: &ClaimedInvoice) -> i64 {
    claimed.invoice.as_ref().expect("an invoice").invoice_id
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The `google.rpc.ErrorInfo` reason of a status, if any.
pub fn reason(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

/// Asserts that `status` is a lost lease, as workers are told to recognise it.
#[track_caller]
pub fn assert_lease_lost(status: &Status) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(status).as_deref(), Some("LEASE_LOST"), "{status:?}");
}

pub fn state(invoice: &proto::Invoice) -> proto::InvoiceState {
    proto::InvoiceState::try_from(invoice.state).expect("a known state")
}

impl TestApp {
    /// Gives a lease back as a failed attempt.
    pub async fn release_failed(&self, claimed: &ClaimedInvoice, error: &str) -> proto::Invoice {
        self.client
            .clone()
            .release_claim(proto::ReleaseClaimRequest {
                invoice_id: id_of(claimed),
                lease_token: claimed.lease_token.clone(),
                reason: proto::ReleaseReason::Failed as i32,
                error: error.to_owned(),
                retry_after: None,
            })
            .await
            .expect("release succeeds")
            .into_inner()
            .invoice
            .expect("an invoice")
    }

    /// Sets a queue's weight and serialization.
    pub async fn configure_queue(&self, queue: &str, weight: Option<i32>, serialize: Option<bool>) {
        self.client
            .clone()
            .configure_queue(proto::ConfigureQueueRequest {
                queue: queue.to_owned(),
                weight,
                serialize_by_customer: serialize,
            })
            .await
            .expect("configure succeeds");
    }

    /// Makes these invoices claimable now, as if their backoff had passed.
    pub async fn skip_backoff(&self, ids: &[i64]) {
        sqlx::query(
            "UPDATE invoices SET available_at = now() WHERE id = ANY($1) AND state = 'pending'",
        )
        .bind(ids)
        .execute(&self.db)
        .await
        .expect("backoff skipped");
        self.store.forget_claim_cursors();
    }

    /// The kinds of an invoice's audit events, oldest first.
    pub async fn event_kinds(&self, invoice_id: i64) -> Vec<proto::InvoiceEventKind> {
        self.client
            .clone()
            .list_invoice_events(proto::ListInvoiceEventsRequest {
                invoice_id,
                page_size: 1000,
                page_token: String::new(),
            })
            .await
            .expect("events listed")
            .into_inner()
            .events
            .iter()
            .map(|e| proto::InvoiceEventKind::try_from(e.kind).expect("a known kind"))
            .collect()
    }
}

/// Seconds from now until `at`, by the test's clock.
pub fn seconds_until(at: &prost_types::Timestamp) -> i64 {
    at.seconds - chrono::Utc::now().timestamp()
}
