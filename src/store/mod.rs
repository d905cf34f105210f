//! The only place that speaks SQL.
//!
//! What is stored: one row per invoice in `invoices`, with its latest lease
//! in the row (see `migrations/` and the [`crate::lease`] contract). Each
//! public function is one operation, named entity first then verb, taking
//! and returning domain types: no sqlx type leaves this module, and every
//! sqlx error is classified into the crate's [`Error`] by [`classify`].

/// The columns every statement returns for an invoice, in `InvoiceRow`
/// order. Statements joining other row sources name those sources' columns
/// differently, so these need no table prefix.
macro_rules! invoice_columns {
    () => {
        "id, external_id, queue, customer_id, amount_minor, currency, priority, metadata, \
         idempotency_key::text AS idempotency_key, state, available_at, attempts, \
         max_attempts, lease_epoch, lease_nonce, leased_by, leased_at, lease_expires_at, \
         lease_expires_at <= now() AS lease_expired, lease_released, last_error, \
         provider_reference, completed_at, completed_by, created_at, updated_at, \
         serialization_key, cancel_requested, finished_at"
    };
}

/// The delay before a counted failure's invoice is claimable again, in SQL:
/// `base * 2^(attempts - 1)` microseconds, capped at `max`, with equal jitter
/// (half of it fixed, half random), so that retries of invoices that failed
/// together spread out. Reads the row's `attempts` before the update.
macro_rules! backoff_sql {
    ($base:literal, $max:literal) => {
        concat!(
            "(least(",
            $max,
            "::float8, ",
            $base,
            "::float8 * power(2, greatest(attempts - 1, 0))) * (0.5 + random() / 2)) \
             * interval '1 microsecond'"
        )
    };
}

mod admin;
mod cursors;
mod events;
mod invoices;
mod rows;

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sqlx::{
    Connection, PgPool, Postgres,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::error::{Error, Result};

pub(crate) use cursors::Change;
use cursors::ClaimCursors;
pub use cursors::DEFAULT_FULL_SCAN_INTERVAL;
pub use invoices::{ClaimParams, RescueCounts};

/// The text of the hot-path statements, for tools that run them outside the
/// service (the raw-SQL ceiling in `bench/`), with parameters as the store
/// binds them: see the functions that use each.
pub mod statements {
    pub use super::invoices::{CLAIM, COMPLETE_MANY, SUBMIT};
}

/// The channel on which the store announces that invoices became claimable.
/// The payload says where (see `cursors::encode`); listeners move their claim
/// cursors back accordingly and wake their waiting claims.
pub const AVAILABLE_CHANNEL: &str = "billing_coordinator_available";

/// A pooled connection used this recently is handed out without a ping.
/// sqlx pings every connection it hands out by default: one more round trip
/// before each statement, on the path of every claim and completion. Like
/// HikariCP's `aliveBypassWindowMs`, a connection that was busy a moment ago
/// is taken to be alive; one that sat idle longer is checked first, so that
/// connections the database dropped meanwhile are replaced, not used.
const TRUSTED_IF_IDLE_UNDER: Duration = Duration::from_millis(500);

/// How long a funnel keeps one connection before handing it back to the
/// pool (see [`Kept`]): sqlx's default `max_lifetime`, which a connection
/// that is never handed back would otherwise escape.
const KEPT_AT_MOST: Duration = Duration::from_secs(30 * 60);

/// How often a replica hands back the funnel connections it keeps but can
/// no longer trust (see [`Store::release_stale_funnel_connections`]).
pub const KEPT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// The most connections the funnels' claim and completion statements take,
/// apart from the main pool: one flusher each, which keeps its connection
/// between statements (see [`Kept`]), and room for connections the pool is
/// still checking after a statement failed on them.
pub const FUNNEL_CONNECTIONS: u32 = 6;

/// The settings under which a statement runs on a plan made once per
/// connection (see `Store::funnel_pool`): the generic plan, with sequential
/// scans ruled out.
const GENERIC_PLANS: [(&str, &str); 2] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
];

/// How many times a transaction that hit a serialization failure or a
/// deadlock is run again before the caller is told `ABORTED`.
const TRANSIENT_RETRIES: u32 = 3;

/// Connection settings for the database pool.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long a caller waits for a connection before `UNAVAILABLE`.
    pub acquire_timeout: Duration,
    /// How often the claim cursors are swept and the rescuer reads its index
    /// from the front (see `cursors`).
    pub full_scan_interval: Duration,
    /// Most connections for the claim and completion statements, which have
    /// a pool of their own (see [`Store`]).
    pub funnel_connections: u32,
}

/// Handle to the invoice store. Cheap to clone; clones share the pool and the
/// claim cursors.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Connections for the claim and completion statements, which the
    /// funnels run thousands of times a second. PostgreSQL planned the claim
    /// anew on every call, because it estimates the generic plan dearer than
    /// custom ones, and planning took twice as long as running it (0.67
    /// against 0.33 ms); with single-invoice calls it planned the completion
    /// on a third of its calls too (1,455 plans in 4,294 calls, 0.48 ms
    /// each). On these connections both use the generic plan, made once per
    /// connection (`plan_cache_mode = force_generic_plan`), with sequential
    /// scans ruled out: a plan made while the table was small must not keep
    /// scanning it whole once it has grown, and every read of either
    /// statement is an index lookup. Other statements keep the defaults: the
    /// operator filters (`$n IS NULL OR ...`) need custom plans to use their
    /// indexes.
    funnel_pool: PgPool,
    /// The funnel pool's connections between statements, when that pool is
    /// the funnels' own (see [`Kept`]).
    kept: Option<Arc<Kept>>,
    cursors: Arc<ClaimCursors>,
    full_scan_interval: Duration,
}

impl Store {
    /// Opens a pool to `database_url`. Connections are made lazily, so the
    /// service starts (and reports NOT_SERVING) while the database is down.
    pub fn connect_lazy(database_url: &str, settings: &PoolSettings) -> Result<Self> {
        let options = connect_options(database_url)?;
        let funnel_options = options.clone().options(GENERIC_PLANS);
        Ok(Self {
            pool: pool_options(settings.max_connections, settings.acquire_timeout)
                .connect_lazy_with(options),
            funnel_pool: pool_options(settings.funnel_connections, settings.acquire_timeout)
                .connect_lazy_with(funnel_options),
            kept: Some(Arc::default()),
            cursors: Arc::new(ClaimCursors::new()),
            full_scan_interval: settings.full_scan_interval,
        })
    }

    /// Wraps an existing pool (tools, and tests of a single operation).
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            funnel_pool: pool.clone(),
            // Kept connections would be missing from the one pool that
            // every other statement needs.
            kept: None,
            pool,
            cursors: Arc::new(ClaimCursors::new()),
            full_scan_interval: DEFAULT_FULL_SCAN_INTERVAL,
        }
    }

    /// The same store over a small pool of its own, so that background work
    /// (taking back expired leases, health checks) still gets a connection
    /// when requests hold every connection of the main pool.
    pub fn with_own_pool(&self, database_url: &str, max_connections: u32) -> Result<Self> {
        let pool = pool_options(max_connections, Duration::from_secs(5))
            .connect_lazy_with(connect_options(database_url)?);
        Ok(Self {
            // Background work runs no funnel statements.
            funnel_pool: pool.clone(),
            kept: None,
            pool,
            cursors: self.cursors.clone(),
            full_scan_interval: self.full_scan_interval,
        })
    }

    /// Runs one funnel statement on a connection kept from the last one if
    /// there is one, else on one from the funnel pool. The connection is
    /// kept for the next statement only if this one succeeded: after a
    /// failure it goes back to the pool, which checks it, and closes it if
    /// the database went away.
    async fn on_funnel_connection<T>(
        &self,
        statement: impl AsyncFnOnce(&mut sqlx::PgConnection) -> sqlx::Result<T>,
    ) -> Result<T> {
        let mut conn = match self.kept.as_ref().and_then(|kept| kept.take()) {
            Some(conn) => conn,
            None => FunnelConnection {
                conn: Some(self.funnel_pool.acquire().await.map_err(classify)?),
                since: Instant::now(),
            },
        };
        let out = statement(&mut conn).await.map_err(classify)?;
        if let Some(kept) = &self.kept {
            kept.keep(conn);
        }
        Ok(out)
    }

    /// Hands the kept funnel connections that would not be used again (see
    /// [`Kept`]) back to the pool, whose idle timeout then closes them, so
    /// that an idle service does not hold connections; says how many.
    pub fn release_stale_funnel_connections(&self) -> usize {
        self.kept.as_ref().map_or(0, |kept| kept.release_stale())
    }

    /// How often scans start from the front of their index again.
    pub fn full_scan_interval(&self) -> Duration {
        self.full_scan_interval
    }

    /// Makes the next claims read every queue from the front. For whoever
    /// changed invoices with SQL of their own; the service's own writes keep
    /// the cursors right.
    pub fn forget_claim_cursors(&self) {
        self.cursors.apply(&[cursors::Change::All]);
    }

    /// Applies a notification sent by any replica's store, and returns what
    /// it said for the waiting claims to act on.
    pub(crate) fn apply_notification(&self, payload: &str) -> Vec<Change> {
        let changes = cursors::decode(payload);
        self.cursors.apply(&changes);
        changes
    }

    /// Applies the embedded migrations. Safe when several replicas start at
    /// once: sqlx serialises migrators with a PostgreSQL advisory lock.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations")
            .run(&self.pool)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => classify(e),
                other => Error::Internal(other.into()),
            })
    }

    /// Answers when the database does.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// A listener for [`AVAILABLE_CHANNEL`] on its own connection.
    pub(crate) async fn listen_available(&self) -> Result<sqlx::postgres::PgListener> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool)
            .await
            .map_err(classify)?;
        listener.listen(AVAILABLE_CHANNEL).await.map_err(classify)?;
        Ok(listener)
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The connection settings in `database_url`, with the service's name.
fn connect_options(database_url: &str) -> Result<PgConnectOptions> {
    let options: PgConnectOptions = database_url
        .parse()
        .map_err(|e| Error::invalid("database_url", format!("is not a PostgreSQL URL: {e}")))?;
    // No JIT: every statement here runs in milliseconds, and PostgreSQL
    // compiles anew on each execution. Its estimate for the claim's generic
    // plan, which cannot know the LIMIT, passed `jit_above_cost` once a
    // million invoices were pending, and LLVM then took about 2 s of every
    // claim statement.
    Ok(options
        .application_name("billing-coordinator")
        .options([("jit", "off")]))
}

/// A lazy pool of at most `max` connections. A connection used within
/// [`TRUSTED_IF_IDLE_UNDER`] is handed out without a ping; see there.
fn pool_options(max: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= TRUSTED_IF_IDLE_UNDER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// A connection taken from the funnel pool, and since when a funnel has had
/// it.
#[derive(Debug)]
struct FunnelConnection {
    /// Always there until dropped.
    conn: Option<PoolConnection<Postgres>>,
    since: Instant,
}

const FUNNEL_CONNECTION: &str = "a funnel connection is there until dropped";

impl std::ops::Deref for FunnelConnection {
    type Target = sqlx::PgConnection;

    fn deref(&self) -> &Self::Target {
        self.conn.as_ref().expect(FUNNEL_CONNECTION)
    }
}

impl std::ops::DerefMut for FunnelConnection {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.conn.as_mut().expect(FUNNEL_CONNECTION)
    }
}

impl Drop for FunnelConnection {
    /// A pooled connection goes back to its pool in a task of its own. A
    /// kept one outlives the statements, and a store dropped after its
    /// runtime (in a test, say) has no runtime to run that task on: there
    /// the connection is closed instead.
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_err()
            && let Some(conn) = self.conn.take()
        {
            drop(conn.detach());
        }
    }
}

/// What a kept connection says about its age.
trait Aged {
    /// Since when a funnel has had it.
    fn since(&self) -> Instant;
}

impl Aged for FunnelConnection {
    fn since(&self) -> Instant {
        self.since
    }
}

/// Funnel connections held between statements instead of handed back to
/// the pool. sqlx checks every connection handed back with a round trip of
/// its own (a `Sync`), so each funnel statement cost the database two
/// wakeups of its backend instead of one, and the service a task to run the
/// check. A kept connection is used again only if it was used within
/// [`TRUSTED_IF_IDLE_UNDER`], like a pooled one that is handed out without a
/// ping, and if it has been kept for less than [`KEPT_AT_MOST`]; otherwise
/// it goes back to the pool, which checks it and retires it when it is old.
#[derive(Debug)]
struct Kept<C = FunnelConnection> {
    /// Most recently used last.
    idle: Mutex<Vec<(C, Instant)>>,
    trusted_for: Duration,
    at_most: Duration,
}

impl<C> Default for Kept<C> {
    fn default() -> Self {
        Self::new(TRUSTED_IF_IDLE_UNDER, KEPT_AT_MOST)
    }
}

impl<C> Kept<C> {
    fn new(trusted_for: Duration, at_most: Duration) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            trusted_for,
            at_most,
        }
    }
}

impl<C: Aged> Kept<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(C, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn usable(&self, conn: &C, used: Instant) -> bool {
        used.elapsed() < self.trusted_for && conn.since().elapsed() < self.at_most
    }

    /// The most recently used connection that is still usable. Those found
    /// unusable on the way are dropped, which hands them back to the pool.
    fn take(&self) -> Option<C> {
        let mut idle = self.lock();
        while let Some((conn, used)) = idle.pop() {
            if self.usable(&conn, used) {
                return Some(conn);
            }
        }
        None
    }

    /// Drops the connections that are no longer usable; says how many.
    fn release_stale(&self) -> usize {
        let mut idle = self.lock();
        let before = idle.len();
        idle.retain(|(conn, used)| self.usable(conn, *used));
        before - idle.len()
    }

    fn keep(&self, conn: C) {
        self.lock().push((conn, Instant::now()));
    }
}

/// Sorts a database error into what the caller can do about it.
pub(crate) fn classify(error: sqlx::Error) -> Error {
    use sqlx::Error as E;
    match error {
        E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => {
            Error::Unavailable {
                message: "the database is unavailable",
                source: Some(error.into()),
            }
        }
        E::Database(ref db) => match db.code().as_deref() {
            // serialization_failure, deadlock_detected
            Some("40001" | "40P01") => Error::Aborted(error.into()),
            // Two claims raced for one serialization key, or two submits for
            // one external id: the loser runs again (and a submit then finds
            // the winner's invoice).
            Some("23505")
                if matches!(
                    db.constraint(),
                    Some("invoices_one_lease_per_key" | "invoice_external_ids_pkey")
                ) =>
            {
                Error::Aborted(error.into())
            }
            // admin_shutdown, crash_shutdown, cannot_connect_now,
            // too_many_connections, and the connection_exception class
            Some("57P01" | "57P02" | "57P03" | "53300") => Error::Unavailable {
                message: "the database is unavailable",
                source: Some(error.into()),
            },
            Some(code) if code.starts_with("08") => Error::Unavailable {
                message: "the database is unavailable",
                source: Some(error.into()),
            },
            _ => Error::Internal(error.into()),
        },
        other => Error::Internal(other.into()),
    }
}

/// Runs `op` again when it fails with a serialization failure or deadlock,
/// which concurrent batches can cause and which succeed when repeated.
async fn retry_transient<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(Error::Aborted(cause)) if attempt < TRANSIENT_RETRIES => {
                attempt += 1;
                tracing::debug!(attempt, error = %cause, "retrying a conflicting transaction");
                let jitter = rand::random_range(0..10u64);
                tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt) + jitter)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a connection, named, that a funnel has had since `since`.
    #[derive(Debug, PartialEq)]
    struct Conn(&'static str, Instant);

    impl Aged for Conn {
        fn since(&self) -> Instant {
            self.1
        }
    }

    fn names(taken: Option<Conn>) -> Option<&'static str> {
        taken.map(|c| c.0)
    }

    #[test]
    fn a_kept_connection_is_handed_out_again_most_recent_first() {
        let kept = Kept::new(Duration::from_secs(60), Duration::from_secs(60));
        kept.keep(Conn("first", Instant::now()));
        kept.keep(Conn("second", Instant::now()));
        assert_eq!(names(kept.take()), Some("second"));
        assert_eq!(names(kept.take()), Some("first"));
        assert_eq!(names(kept.take()), None);
    }

    #[test]
    fn a_connection_kept_past_the_trusted_idle_time_goes_back_to_the_pool() {
        let kept = Kept::new(Duration::from_millis(20), Duration::from_secs(60));
        kept.keep(Conn("older", Instant::now()));
        kept.keep(Conn("newer", Instant::now()));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(names(kept.take()), None);
        kept.keep(Conn("fresh", Instant::now()));
        assert_eq!(
            names(kept.take()),
            Some("fresh"),
            "the stale ones were dropped"
        );
        assert_eq!(names(kept.take()), None);
    }

    #[test]
    fn the_periodic_check_hands_back_only_connections_that_would_not_be_used_again() {
        let kept = Kept::new(Duration::from_millis(20), Duration::from_secs(60));
        kept.keep(Conn("idle", Instant::now()));
        std::thread::sleep(Duration::from_millis(30));
        kept.keep(Conn("busy", Instant::now()));
        assert_eq!(kept.release_stale(), 1);
        assert_eq!(kept.release_stale(), 0);
        assert_eq!(names(kept.take()), Some("busy"));
    }

    #[test]
    fn a_connection_kept_for_its_whole_lifetime_goes_back_to_the_pool_though_busy() {
        let kept = Kept::new(Duration::from_secs(60), Duration::from_millis(20));
        let since = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        kept.keep(Conn("old", since));
        kept.keep(Conn("young", Instant::now()));
        assert_eq!(names(kept.take()), Some("young"));
        assert_eq!(
            names(kept.take()),
            None,
            "the old one went back to the pool"
        );
    }

    #[test]
    fn every_connection_turns_jit_off() {
        let options = connect_options("postgres://billing@localhost/billing").unwrap();
        let sent = options.get_options().unwrap_or_default();
        assert!(sent.contains("jit=off"), "connection options: {sent:?}");
    }
}
