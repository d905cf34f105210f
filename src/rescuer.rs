//! Takes expired leases back so a dead worker only delays its invoices.
//!
//! Every replica runs it; that is safe because each pass locks the rows it
//! takes with `SKIP LOCKED` and the update is idempotent, so no leader is
//! needed.
//!
//! A pass reads the lease-expiry index from where the previous one stopped,
//! not from the front: the front holds an entry for every lease that ever
//! ended, which vacuum cannot remove while some transaction in the cluster
//! stays open (see the store's claim cursors for the same problem).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

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

/// How far before the previous pass's cutoff a pass starts reading. A lease
/// that the previous pass could not see yet was granted by a transaction
/// still running then, so it expires at most this long before that cutoff
/// unless the claim took longer than this to commit; the full scan every
/// `full_scan_interval` finds even those.
pub const LATE_COMMIT_MARGIN: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Progress {
    /// The cutoff of the last pass that finished.
    scanned_to: Option<Timestamp>,
    full_scan_at: Instant,
}

/// Rescues expired leases in bounded batches.
#[derive(Clone, Debug)]
pub struct Rescuer {
    store: Store,
    backoff: Backoff,
    /// Time between passes.
    pub interval: Duration,
    /// Most leases per statement.
    pub batch: u32,
    progress: Arc<Mutex<Progress>>,
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
            progress: Arc::new(Mutex::new(Progress {
                scanned_to: None,
                full_scan_at: Instant::now(),
            })),
        }
    }

    /// One pass: takes back every lease expired by `now` (the database's
    /// clock when `None`), batch after batch, and says how many. A pass at a
    /// given `now` (a test's clock) reads the whole index.
    pub async fn run_once(&self, now: Option<Timestamp>) -> Result<RescueCounts> {
        let cutoff = self.store.clock(now).await?;
        let full_scan_due = {
            let progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
            (progress.full_scan_at.elapsed() >= self.store.full_scan_interval())
                .then_some(Instant::now())
        };
        let from = match (now, full_scan_due) {
            (None, None) => self
                .progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .scanned_to
                .and_then(|to| {
                    to.checked_sub_signed(chrono::TimeDelta::from_std(LATE_COMMIT_MARGIN).ok()?)
                }),
            _ => None,
        };
        let mut total = RescueCounts::default();
        loop {
            let counts = self
                .store
                .invoice_rescue_expired(Some(cutoff), from, self.batch, self.backoff)
                .await?;
            total.returned += counts.returned;
            total.failed += counts.failed;
            total.cancelled += counts.cancelled;
            if counts.returned + counts.failed + counts.cancelled < u64::from(self.batch) {
                break;
            }
        }
        if now.is_none() {
            let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
            progress.scanned_to = Some(cutoff);
            if let Some(started) = full_scan_due {
                progress.full_scan_at = started;
            }
        }
        Ok(total)
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
