//! Merges concurrent calls into shared statements.
//!
//! One statement per call caps a small database at a few thousand commits a
//! second however many workers call, 32 claims racing for the front of one
//! index mostly skip each other's locked rows, and 32 batch completions at
//! once contend for the same two cores. So claims and completions (single
//! ones and batches) queue here, and a flusher takes whatever has queued up
//! and serves it with as few statements as the calls allow. There is no
//! timer: a lone call is flushed at once, and calls that arrive while the
//! flusher is busy wait for the next statement, so batches grow with the
//! load. Each caller still gets its own answer, and only after the statement
//! carrying its part has committed.

use std::{future::Future, sync::Arc};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{Error, Result};

/// Statements in flight at once, per funnel. One: with 32 workers claiming
/// and completing one invoice at a time, 1 claim and 1 completion flusher
/// drained 2,440-2,505 invoices/s where 2 and 2 drained 1,810-1,975 and 4
/// and 4 1,354-1,407 (interleaved runs on one PostgreSQL), since every
/// extra statement in flight is another commit to flush and another
/// scan of the same index head. On a disk that flushes in 0.1 ms rather
/// than 1.9, 1 and 1 still won: 3,792-4,032 against 3,200-3,309 for 2 and
/// 2. With batches of 100, 1 and 2 completion flushers drained at the same
/// rate within the noise.
pub const DEFAULT_FLUSHERS: usize = 1;

/// Most calls one flush serves.
pub const MAX_MERGED: usize = 1000;

type Reply<R> = oneshot::Sender<Result<R>>;

/// A queue of calls of type `J` answered with `R`.
#[derive(Debug)]
pub struct Funnel<J, R> {
    queue: mpsc::UnboundedSender<(J, Reply<R>)>,
}

impl<J, R> Clone for Funnel<J, R> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<J: Send + 'static, R: Send + 'static> Funnel<J, R> {
    /// Starts the dispatcher on the current runtime. `flush` serves a batch
    /// of calls and answers each, in order; if it fails as a whole, every
    /// call in the batch gets that error. The dispatcher stops once every
    /// handle is dropped and the queue is empty.
    pub fn start<F, Fut>(flushers: usize, flush: F) -> Self
    where
        F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<R>>>> + Send + 'static,
    {
        let (queue, received) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(received, flushers.max(1), Arc::new(flush)));
        Self { queue }
    }

    /// Queues `job` for the next flush and waits for its answer.
    pub async fn call(&self, job: J) -> Result<R> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((job, reply)).map_err(|_| shutting_down())?;
        answer.await.map_err(|_| shutting_down())?
    }
}

fn shutting_down() -> Error {
    Error::Unavailable {
        message: "the server is shutting down",
        source: None,
    }
}

async fn dispatch<J, R, F, Fut>(
    mut received: mpsc::UnboundedReceiver<(J, Reply<R>)>,
    flushers: usize,
    flush: Arc<F>,
) where
    J: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Result<R>>>> + Send + 'static,
{
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
        let flush = flush.clone();
        tokio::spawn(async move {
            metrics::histogram!("billing_coordinator_merged_calls").record(batch.len() as f64);
            let (jobs, replies): (Vec<J>, Vec<Reply<R>>) = batch.into_iter().unzip();
            match flush(jobs).await {
                Ok(answers) if answers.len() == replies.len() => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(answer);
                    }
                }
                Ok(answers) => {
                    let error = Error::internal(format!(
                        "a flush of {} calls gave {} answers",
                        replies.len(),
                        answers.len()
                    ));
                    for reply in replies {
                        let _ = reply.send(Err(error.for_each_caller()));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.for_each_caller()));
                    }
                }
            }
            drop(permit);
        });
    }
}
