//! The loop every maintenance task shares: a pass every interval until
//! shutdown, with shutdown checked first, before and during a pass (a pass
//! against a database that is down can take the whole acquire timeout, and
//! must not hold up a drain).

use std::{future::Future, time::Duration};

use tokio_util::sync::CancellationToken;

/// Runs `pass` every `interval` until `shutdown`, handing each result to
/// `report`.
pub async fn every<T, P, Fut>(
    interval: Duration,
    shutdown: CancellationToken,
    mut pass: P,
    mut report: impl FnMut(T),
) where
    P: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let outcome = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                outcome = pass() => outcome,
            },
        };
        report(outcome);
    }
}
