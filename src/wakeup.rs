//! Wakes long-polling claims when invoices become claimable.
//!
//! Whatever makes invoices claimable (a submit, a release, the rescuer, a
//! finished lease on a serialization key) runs `NOTIFY` with its transaction,
//! on whichever replica it happens; every replica listens, moves its claim
//! cursors back to what the payload names, and wakes its own waiting claims,
//! which then simply try again.

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, futures::Notified};
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How long to wait before listening again after the connection failed.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// A wakeup shared by the claims waiting in this process.
#[derive(Clone, Debug, Default)]
pub struct Wakeup {
    notify: Arc<Notify>,
}

impl Wakeup {
    /// A wakeup nobody has signalled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A future that completes at the next [`Wakeup::wake_all`].
    pub fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }

    /// Wakes every claim waiting now.
    pub fn wake_all(&self) {
        self.notify.notify_waiters();
    }

    /// Listens for the store's notifications until `shutdown`, reconnecting
    /// after failures. Waiters are also woken whenever the connection was
    /// lost, since notifications sent meanwhile are gone.
    pub async fn listen(self, store: Store, shutdown: CancellationToken) {
        loop {
            let listener = tokio::select! {
                l = store.listen_available() => l,
                () = shutdown.cancelled() => return,
            };
            let mut listener = match listener {
                Ok(l) => l,
                Err(error) => {
                    tracing::debug!(%error, "cannot listen for available invoices yet");
                    tokio::select! {
                        () = tokio::time::sleep(RECONNECT_DELAY) => continue,
                        () = shutdown.cancelled() => return,
                    }
                }
            };
            // Whatever was announced while nobody listened is lost.
            store.forget_claim_cursors();
            self.wake_all();
            loop {
                let received = tokio::select! {
                    r = listener.try_recv() => r,
                    () = shutdown.cancelled() => return,
                };
                match received {
                    Ok(Some(notification)) => {
                        store.apply_notification(notification.payload());
                        self.wake_all();
                    }
                    // The connection dropped; the next try_recv reconnects.
                    Ok(None) => {
                        store.forget_claim_cursors();
                        self.wake_all();
                    }
                    Err(error) => {
                        tracing::warn!(%error, "lost the notification listener; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}
