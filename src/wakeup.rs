//! Wakes long-polling claims when invoices become claimable.
//!
//! Whatever makes invoices claimable (a submit, a release, the rescuer, a
//! finished lease on a serialization key) runs `NOTIFY` with its transaction,
//! on whichever replica it happens; every replica listens, moves its claim
//! cursors back to what the payload names, and wakes its own waiting claims,
//! which then simply try again.
//!
//! A payload says how many invoices each queue gained, and that many waiting
//! claims on the queue are woken, the longest-waiting first, rather than all
//! of them: with a thousand workers idle, one invoice costs one claim, not a
//! thousand. A woken claim that goes away before it looked (its caller left,
//! or it was already answered by a claim that raced the wakeup) hands its
//! wakeup to the next claim waiting on that queue. Changes that are not
//! counted (a serialization key freed, a lost connection) wake every claim
//! they concern, and a waiting claim also looks again every poll interval.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{Change, Store};

/// How long to wait before listening again after the connection failed.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// The claims waiting in this process.
#[derive(Clone, Debug, Default)]
pub struct Wakeup {
    waiting: Arc<Mutex<Waiting>>,
}

#[derive(Debug, Default)]
struct Waiting {
    next_id: u64,
    /// Not yet woken, longest-waiting first.
    claims: VecDeque<Entry>,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    /// The queues the claim takes from; empty means every queue.
    queues: Vec<String>,
    woken: Arc<Notify>,
    /// Why it was woken: a queue, to hand on to another claim on it if this
    /// one leaves without looking; `None` for a change every claim heard.
    reason: Arc<Mutex<Option<Option<String>>>>,
}

impl Entry {
    fn takes_from(&self, queue: &str) -> bool {
        self.queues.is_empty() || self.queues.iter().any(|q| q == queue)
    }
}

/// One claim's place in line, from before it looks for invoices until it
/// has waited: registering first means a notification that arrives while it
/// looks is not missed.
#[derive(Debug)]
pub struct Waiter {
    id: u64,
    wakeup: Wakeup,
    woken: Arc<Notify>,
    reason: Arc<Mutex<Option<Option<String>>>>,
    /// Set once the claim has waited its wakeup out and will look again.
    used: bool,
}

impl Waiter {
    /// Completes when this claim is woken. Completing counts as acting on
    /// the wakeup: the caller is expected to look for invoices next.
    pub async fn woken(&mut self) {
        self.woken.notified().await;
        self.used = true;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiting = self.wakeup.lock();
        waiting.claims.retain(|entry| entry.id != self.id);
        if self.used {
            return;
        }
        // Woken for a queue but never looked: someone else must.
        let reason = self.reason.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Some(queue)) = reason {
            wake_on(&mut waiting, &queue, 1);
        }
    }
}

fn wake(entry: Entry, reason: Option<String>) {
    *entry.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    entry.woken.notify_one();
}

/// Wakes up to `count` claims that take from `queue`, longest-waiting first.
fn wake_on(waiting: &mut Waiting, queue: &str, count: u32) {
    let mut left = count;
    let mut kept = VecDeque::with_capacity(waiting.claims.len());
    for entry in waiting.claims.drain(..) {
        if left > 0 && entry.takes_from(queue) {
            left -= 1;
            wake(entry, Some(queue.to_owned()));
        } else {
            kept.push_back(entry);
        }
    }
    waiting.claims = kept;
}

impl Wakeup {
    /// A wakeup with no claims waiting.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a claim on `queues` (empty: every queue) in line.
    pub fn waiter(&self, queues: &[String]) -> Waiter {
        let mut waiting = self.lock();
        waiting.next_id += 1;
        let id = waiting.next_id;
        let woken = Arc::new(Notify::new());
        let reason = Arc::new(Mutex::new(None));
        waiting.claims.push_back(Entry {
            id,
            queues: queues.to_vec(),
            woken: woken.clone(),
            reason: reason.clone(),
        });
        Waiter {
            id,
            wakeup: self.clone(),
            woken,
            reason,
            used: false,
        }
    }

    /// Wakes the claims that `changes` may have given work.
    pub(crate) fn wake_for(&self, changes: &[Change]) {
        let mut waiting = self.lock();
        for change in changes {
            match change {
                Change::Pending { queue, count, .. } => wake_on(&mut waiting, queue, *count),
                Change::Queue(queue) => wake_on(&mut waiting, queue, u32::MAX),
                // A queue's settings changed: any of its claims may find work.
                Change::Queues | Change::All => {
                    for entry in waiting.claims.drain(..) {
                        wake(entry, None);
                    }
                }
            }
        }
    }

    /// Wakes every claim waiting now.
    pub fn wake_all(&self) {
        self.wake_for(&[Change::All]);
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
                        self.wake_for(&store.apply_notification(notification.payload()));
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

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn arrived(queue: &str, count: u32) -> Change {
        Change::Pending {
            queue: queue.to_owned(),
            priority: 0,
            key: (chrono::DateTime::UNIX_EPOCH, 1),
            count,
        }
    }

    /// Whether the waiter has been woken, without waiting.
    fn is_woken(waiter: &mut Waiter) -> bool {
        waiter.woken().now_or_never().is_some()
    }

    fn waiters(wakeup: &Wakeup, queues: &[&str], n: usize) -> Vec<Waiter> {
        let queues: Vec<String> = queues.iter().map(|q| (*q).to_owned()).collect();
        (0..n).map(|_| wakeup.waiter(&queues)).collect()
    }

    #[test]
    fn one_invoice_wakes_one_waiting_claim_the_longest_waiting() {
        let wakeup = Wakeup::new();
        let mut claims = waiters(&wakeup, &[], 5);
        wakeup.wake_for(&[arrived("a", 1)]);
        let woken: Vec<bool> = claims.iter_mut().map(is_woken).collect();
        assert_eq!(woken, [true, false, false, false, false]);
    }

    #[test]
    fn each_invoice_wakes_one_more_claim() {
        let wakeup = Wakeup::new();
        let mut claims = waiters(&wakeup, &[], 5);
        wakeup.wake_for(&[arrived("a", 3)]);
        let woken = claims.iter_mut().map(is_woken).filter(|w| *w).count();
        assert_eq!(woken, 3);
    }

    #[test]
    fn only_claims_on_the_invoices_queue_are_woken() {
        let wakeup = Wakeup::new();
        let mut on_b = waiters(&wakeup, &["b"], 2);
        let mut on_a_or_b = waiters(&wakeup, &["a", "b"], 1);
        let mut on_any = waiters(&wakeup, &[], 1);
        wakeup.wake_for(&[arrived("a", 2)]);
        assert!(!on_b.iter_mut().any(is_woken));
        assert!(is_woken(&mut on_a_or_b[0]));
        assert!(is_woken(&mut on_any[0]));
    }

    #[test]
    fn a_woken_claim_that_leaves_without_looking_hands_its_wakeup_on() {
        let wakeup = Wakeup::new();
        let mut claims = waiters(&wakeup, &["a"], 3);
        wakeup.wake_for(&[arrived("a", 1)]);
        let first = claims.remove(0);
        drop(first);
        assert!(is_woken(&mut claims[0]));
        assert!(!is_woken(&mut claims[1]));
    }

    #[test]
    fn a_claim_that_acted_on_its_wakeup_does_not_hand_it_on() {
        let wakeup = Wakeup::new();
        let mut claims = waiters(&wakeup, &["a"], 2);
        wakeup.wake_for(&[arrived("a", 1)]);
        assert!(is_woken(&mut claims[0]));
        drop(claims.remove(0));
        assert!(!is_woken(&mut claims[0]));
    }

    #[test]
    fn uncounted_changes_wake_every_claim_they_concern() {
        let wakeup = Wakeup::new();
        let mut on_a = waiters(&wakeup, &["a"], 2);
        let mut on_b = waiters(&wakeup, &["b"], 2);
        wakeup.wake_for(&[Change::Queue("a".into())]);
        assert!(on_a.iter_mut().all(is_woken));
        assert!(!on_b.iter_mut().any(is_woken));
        wakeup.wake_all();
        assert!(on_b.iter_mut().all(is_woken));
    }
}
