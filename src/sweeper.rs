//! Sweeps the claim cursors: every `full_scan_interval`, finds pending
//! invoices that claims would skip because they sit behind a cursor, and
//! moves the cursor back to them (see the store's `cursors` module for why
//! claims keep cursors, and what keeps them right without this sweep).
//!
//! Each replica sweeps its own cursors; the sweep only reads.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{error::Result, maintenance, store::Store};

/// Sweeps one replica's claim cursors.
#[derive(Clone, Debug)]
pub struct CursorSweeper {
    store: Store,
    /// Time between sweeps.
    pub interval: Duration,
}

impl CursorSweeper {
    /// A sweeper running every `store.full_scan_interval()`.
    pub fn new(store: Store) -> Self {
        let interval = store.full_scan_interval();
        Self { store, interval }
    }

    /// One sweep; says how many cursors moved back.
    pub async fn run_once(&self) -> Result<usize> {
        self.store.claim_cursor_sweep().await
    }

    /// Sweeps until `shutdown`, logging only sweeps that moved something.
    pub async fn run(self, shutdown: CancellationToken) {
        let report = |sweep: Result<usize>| match sweep {
            Ok(0) => {}
            Ok(moved) => tracing::info!(moved, "claim cursors moved back to pending invoices"),
            Err(error) => tracing::warn!(%error, "sweeping the claim cursors failed"),
        };
        maintenance::every(self.interval, shutdown, || self.run_once(), report).await;
    }
}
