//! Merges concurrent single-invoice completions into shared statements.
//!
//! Completing one invoice per transaction caps a 2-core database at a few
//! thousand commits a second, however many workers call. So
//! `CompleteInvoice` calls queue here, and a few flushers each take whatever
//! has queued up and complete it with one `CompleteInvoices` statement. There
//! is no timer: a lone call is flushed at once, and calls that arrive while
//! every flusher is busy simply wait for the next statement, so batches grow
//! with the load. Each caller still gets its own outcome, and only after the
//! statement carrying its completion has committed.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{
    error::{Error, Result},
    lease::{Completed, Completion},
    store::Store,
};

/// Statements in flight at once.
pub const DEFAULT_FLUSHERS: usize = 4;

/// Most completions one statement carries.
pub const MAX_MERGED: usize = 1000;

type Reply = oneshot::Sender<Result<Completed>>;

/// The queue of completions waiting for a statement.
#[derive(Clone, Debug)]
pub struct CompletionFunnel {
    queue: mpsc::UnboundedSender<(Completion, Reply)>,
}

impl CompletionFunnel {
    /// Starts the funnel's dispatcher on the current runtime. It stops once
    /// every handle is dropped and the queue is empty.
    pub fn start(store: Store, flushers: usize) -> Self {
        let (queue, received) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(store, received, flushers.max(1)));
        Self { queue }
    }

    /// Completes one lease in the next shared statement.
    pub async fn complete(&self, completion: Completion) -> Result<Completed> {
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send((completion, reply))
            .map_err(|_| shutting_down())?;
        outcome.await.map_err(|_| shutting_down())?
    }
}

fn shutting_down() -> Error {
    Error::Unavailable {
        message: "the server is shutting down",
        source: None,
    }
}

async fn dispatch(
    store: Store,
    mut received: mpsc::UnboundedReceiver<(Completion, Reply)>,
    flushers: usize,
) {
    let permits = Arc::new(Semaphore::new(flushers));
    while let Some(first) = received.recv().await {
        // Wait for a free flusher first: what queues meanwhile joins this batch.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_MERGED {
            match received.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            flush(&store, batch).await;
            drop(permit);
        });
    }
}

async fn flush(store: &Store, batch: Vec<(Completion, Reply)>) {
    metrics::histogram!("billing_coordinator_merged_completions").record(batch.len() as f64);
    let (completions, replies): (Vec<Completion>, Vec<Reply>) = batch.into_iter().unzip();
    match store.invoice_complete_many(&completions).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.for_each_caller()));
            }
        }
    }
}
