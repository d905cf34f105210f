//! Deletes audit events older than the retention, in small batches, on
//! every replica (deleting the same old rows twice is harmless).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{error::Result, maintenance, store::Store};

/// How often a pass runs by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// Most events one statement deletes.
pub const DEFAULT_BATCH: u32 = 5000;

/// Prunes the audit trail.
#[derive(Clone, Debug)]
pub struct EventPruner {
    store: Store,
    /// Events older than this are deleted.
    pub retention: Duration,
    /// Time between passes.
    pub interval: Duration,
    /// Most events per statement.
    pub batch: u32,
}

impl EventPruner {
    /// A pruner keeping `retention` worth of events.
    pub fn new(store: Store, retention: Duration) -> Self {
        Self {
            store,
            retention,
            interval: DEFAULT_INTERVAL,
            batch: DEFAULT_BATCH,
        }
    }

    /// One pass: deletes every event older than the retention, batch after
    /// batch, and says how many.
    pub async fn run_once(&self) -> Result<u64> {
        let mut total = 0;
        loop {
            let deleted = self.store.event_prune(self.retention, self.batch).await?;
            total += deleted;
            if deleted < u64::from(self.batch) {
                return Ok(total);
            }
        }
    }

    /// Runs passes until `shutdown`, logging only passes that deleted.
    pub async fn run(self, shutdown: CancellationToken) {
        let report = |pass: Result<u64>| match pass {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "pruned old audit events"),
            Err(error) => tracing::warn!(%error, "pruning audit events failed"),
        };
        maintenance::every(self.interval, shutdown, || self.run_once(), report).await;
    }
}
