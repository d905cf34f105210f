//! Takes expired leases back so a dead worker only delays its invoices.
//!
//! Every replica runs it; that is safe because each pass locks the rows it
//! takes with `SKIP LOCKED` and the update is idempotent, so no leader is
//! needed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{
    error::Result,
    lease::{Backoff, Timestamp},
    maintenance,
    store::{RescueCounts, Store},
};

/// How often a pass runs by default: expired invoices are claimable again
/// within the lease plus this.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);

/// Most leases one statement takes back, to keep each transaction short.
pub const DEFAULT_BATCH: u32 = 1000;

/// Rescues expired leases in bounded batches.
#[derive(Clone, Debug)]
pub struct Rescuer {
    store: Store,
    backoff: Backoff,
    /// Time between passes.
    pub interval: Duration,
    /// Most leases per statement.
    pub batch: u32,
}

impl Rescuer {
    /// A rescuer with the default interval and batch, holding rescued
    /// invoices back by `backoff`.
    pub fn new(store: Store, backoff: Backoff) -> Self {
        Self {
            store,
            backoff,
            interval: DEFAULT_INTERVAL,
            batch: DEFAULT_BATCH,
        }
    }

    /// One pass: takes back every lease expired by `now` (the database's
    /// clock when `None`), batch after batch, and says how many.
    pub async fn run_once(&self, now: Option<Timestamp>) -> Result<RescueCounts> {
        let mut total = RescueCounts::default();
        loop {
            let counts = self
                .store
                .invoice_rescue_expired(now, self.batch, self.backoff)
                .await?;
            total.returned += counts.returned;
            total.failed += counts.failed;
            total.cancelled += counts.cancelled;
            if counts.returned + counts.failed + counts.cancelled < u64::from(self.batch) {
                return Ok(total);
            }
        }
    }

    /// Runs passes until `shutdown`, logging only passes that did something.
    pub async fn run(self, shutdown: CancellationToken) {
        let report = |pass: Result<RescueCounts>| match pass {
            Ok(counts) if counts == RescueCounts::default() => {}
            Ok(counts) => {
                metrics::counter!("billing_coordinator_leases_expired_total")
                    .increment(counts.returned + counts.failed + counts.cancelled);
                tracing::info!(
                    returned = counts.returned,
                    failed = counts.failed,
                    cancelled = counts.cancelled,
                    "took back expired leases"
                );
            }
            Err(error) => tracing::warn!(%error, "rescuing expired leases failed"),
        };
        maintenance::every(self.interval, shutdown, || self.run_once(None), report).await;
    }
}
