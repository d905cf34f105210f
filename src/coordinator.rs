//! The rules: what a request may ask for, how a claim is shared between
//! queues, and how claims wait for work.
//!
//! No tonic and no sqlx types here: requests arrive decoded by `grpc`, and
//! every effect goes through the [`Store`].

use std::{collections::HashSet, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{
        Cancelled, InvoiceEvent, InvoiceFilter, PageRequest, QueueChange, QueueConfig, QueueStats,
        Redriven, Selection,
    },
    error::{Error, Result},
    fairness,
    funnel::{DEFAULT_FLUSHERS, Funnel},
    lease::{
        Backoff, ClaimRequest, ClaimedInvoice, Completed, Completion, Extended, Invoice, InvoiceId,
        InvoiceRef, LeaseToken, NewInvoice, Release, Submitted,
    },
    store::{ClaimParams, Store},
    wakeup::Wakeup,
};

/// The most invoices one submit, claim, completion or operator batch may carry.
pub const MAX_BATCH: usize = 1000;

/// The longest `retry_after` a release may ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(365 * 24 * 3600);

/// The highest queue weight.
pub const MAX_WEIGHT: i32 = 1000;

/// The limits and defaults the coordinator enforces.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// The shortest lease a worker may ask for.
    pub lease_min: Duration,
    /// The lease a worker gets when it does not ask.
    pub lease_default: Duration,
    /// The longest lease a worker may ask for.
    pub lease_max: Duration,
    /// No lease is extended past its claim time plus this.
    pub max_hold: Duration,
    /// The longest a claim may long-poll.
    pub long_poll_max: Duration,
    /// The attempt budget of invoices submitted without one.
    pub default_max_attempts: i32,
    /// Delay before a failed attempt's invoice is claimable again.
    pub backoff: Backoff,
    /// How often a long-polling claim looks again without a wakeup: invoices
    /// scheduled for later become available with no notification.
    pub poll_interval: Duration,
}

/// Applies the rules of the lease contract on top of the store.
#[derive(Debug)]
pub struct Coordinator {
    store: Store,
    config: CoordinatorConfig,
    wakeup: Wakeup,
    shutdown: CancellationToken,
    claims: Funnel<ClaimJob, Vec<ClaimedInvoice>>,
    completions: Funnel<Vec<Completion>, Vec<Result<Completed>>>,
}

/// One caller's part of a merged claim.
#[derive(Debug)]
struct ClaimJob {
    worker_id: String,
    max_count: u32,
    lease: Duration,
    queues: Vec<String>,
}

impl Coordinator {
    /// A coordinator over `store`. Long-polls wake on `wakeup` and return
    /// early once `shutdown` is cancelled, so a draining server is not held
    /// up by idle workers. Starts the completion funnel, so it must be called
    /// within a Tokio runtime.
    pub fn new(
        store: Store,
        config: CoordinatorConfig,
        wakeup: Wakeup,
        shutdown: CancellationToken,
    ) -> Self {
        let claims = Funnel::start(DEFAULT_FLUSHERS, {
            let store = store.clone();
            let max_hold = config.max_hold;
            move |jobs| claim_merged(store.clone(), max_hold, jobs)
        });
        let completions = Funnel::start(DEFAULT_FLUSHERS, {
            let store = store.clone();
            move |batches| complete_merged(store.clone(), batches)
        });
        Self {
            store,
            config,
            wakeup,
            shutdown,
            claims,
            completions,
        }
    }

    /// Registers invoices; see `SubmitInvoices` in the proto.
    pub async fn submit(&self, invoices: Vec<NewInvoice>) -> Result<Vec<Submitted>> {
        check_batch("invoices", invoices.len())?;
        let mut seen = HashSet::with_capacity(invoices.len());
        for (i, invoice) in invoices.iter().enumerate() {
            if !seen.insert(invoice.external_id.as_str()) {
                return Err(Error::invalid(
                    format!("invoices[{i}].external_id"),
                    format!(
                        "{:?} appears more than once in the batch",
                        invoice.external_id
                    ),
                ));
            }
        }
        let submitted = self
            .store
            .invoice_submit_many(&invoices, self.config.default_max_attempts)
            .await?;
        let created = submitted.iter().filter(|s| s.created).count();
        metrics::counter!("billing_coordinator_invoices_submitted_total").increment(created as u64);
        Ok(submitted)
    }

    /// Leases available invoices, long-polling up to `request.wait`.
    pub async fn claim(&self, request: ClaimRequest) -> Result<Vec<ClaimedInvoice>> {
        let lease = self
            .lease_duration("lease_duration", request.lease_duration)?
            .min(self.config.max_hold);
        if request.wait > self.config.long_poll_max {
            return Err(Error::invalid(
                "wait",
                format!(
                    "must be at most {} (the server's long-poll bound)",
                    humantime::format_duration(self.config.long_poll_max)
                ),
            ));
        }
        let deadline = Instant::now() + request.wait;
        loop {
            // In line before looking, so a notification that arrives between
            // an empty claim and the wait below is not missed. A claim that
            // will not wait stays out of line.
            let mut waiter = (!request.wait.is_zero()).then(|| self.wakeup.waiter(&request.queues));

            let claimed = self.claim_once(&request, lease).await?;
            let now = Instant::now();
            let waits = claimed.is_empty() && now < deadline && !self.shutdown.is_cancelled();
            let Some(waiter) = waiter.as_mut().filter(|_| waits) else {
                metrics::counter!("billing_coordinator_invoices_claimed_total")
                    .increment(claimed.len() as u64);
                return Ok(claimed);
            };
            let look_again = deadline.min(now + self.config.poll_interval);
            tokio::select! {
                () = waiter.woken() => {}
                () = tokio::time::sleep_until(look_again) => {}
                () = self.shutdown.cancelled() => {}
            }
        }
    }

    /// One look for work, merged with the claims of other callers waiting
    /// at the same time (see [`crate::funnel`]).
    async fn claim_once(
        &self,
        request: &ClaimRequest,
        lease: Duration,
    ) -> Result<Vec<ClaimedInvoice>> {
        self.claims
            .call(ClaimJob {
                worker_id: request.worker_id.clone(),
                max_count: request.max_count,
                lease,
                queues: request.queues.clone(),
            })
            .await
    }

    /// Completes many leases, one outcome each; see `CompleteInvoices`.
    pub async fn complete_many(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<Result<Completed>>> {
        check_batch("completions", completions.len())?;
        let outcomes = self.completions.call(completions).await?;
        outcomes.iter().for_each(count_completion);
        Ok(outcomes)
    }

    /// Completes one lease; see `CompleteInvoice`. Concurrent calls share
    /// statements with each other and with batches (see [`crate::funnel`]).
    pub async fn complete(&self, completion: Completion) -> Result<Completed> {
        let outcome = match self.completions.call(vec![completion]).await {
            Ok(mut outcomes) if outcomes.len() == 1 => outcomes.remove(0),
            Ok(outcomes) => Err(Error::internal(format!(
                "one completion got {} outcomes",
                outcomes.len()
            ))),
            Err(error) => Err(error),
        };
        count_completion(&outcome);
        outcome
    }

    /// Gives a lease back; see `ReleaseClaim`.
    pub async fn release(&self, token: LeaseToken, release: Release) -> Result<Invoice> {
        if let Release::Failed {
            retry_after: Some(after),
            ..
        } = &release
            && *after > MAX_RETRY_AFTER
        {
            return Err(Error::invalid("retry_after", "must be at most 365 days"));
        }
        let invoice = self
            .store
            .invoice_release(&token, &release, self.config.backoff)
            .await;
        count_lost(&invoice, "release");
        invoice
    }

    /// Heartbeat; see `ExtendLease`.
    pub async fn extend(
        &self,
        token: LeaseToken,
        lease_duration: Option<Duration>,
    ) -> Result<Extended> {
        let lease = self.lease_duration("lease_duration", lease_duration)?;
        let extended = self
            .store
            .invoice_extend_lease(&token, lease, self.config.max_hold)
            .await;
        count_lost(&extended, "extend");
        extended
    }

    /// Reads one invoice.
    pub async fn get(&self, invoice: InvoiceRef) -> Result<Invoice> {
        self.store.invoice_get(&invoice).await
    }

    /// One page of an invoice's audit trail.
    pub async fn events(
        &self,
        invoice_id: InvoiceId,
        page: PageRequest,
    ) -> Result<Vec<InvoiceEvent>> {
        self.store.event_list(invoice_id, page).await
    }

    /// One page of invoices matching `filter`.
    pub async fn list(&self, filter: InvoiceFilter, page: PageRequest) -> Result<Vec<Invoice>> {
        self.store.invoice_list(&filter, page).await
    }

    /// Settings and counts per queue.
    pub async fn queue_stats(&self, queue: Option<String>) -> Result<Vec<QueueStats>> {
        self.store.queue_stats(queue.as_deref()).await
    }

    /// Redrives dead letters; see `RetryInvoices`.
    pub async fn retry(&self, selection: Selection) -> Result<Redriven> {
        check_selection(&selection)?;
        let redriven = self.store.invoice_redrive(&selection).await?;
        metrics::counter!("billing_coordinator_invoices_redriven_total")
            .increment(redriven.retried);
        Ok(redriven)
    }

    /// Cancels invoices; see `CancelInvoices`.
    pub async fn cancel(&self, selection: Selection) -> Result<Cancelled> {
        check_selection(&selection)?;
        self.store.invoice_cancel(&selection).await
    }

    /// Changes a queue's settings; see `ConfigureQueue`.
    pub async fn configure_queue(&self, change: QueueChange) -> Result<QueueConfig> {
        if let Some(weight) = change.weight
            && !(1..=MAX_WEIGHT).contains(&weight)
        {
            return Err(Error::invalid(
                "weight",
                format!("must be between 1 and {MAX_WEIGHT}"),
            ));
        }
        self.store.queue_configure(&change).await
    }

    fn lease_duration(&self, field: &str, asked: Option<Duration>) -> Result<Duration> {
        let Some(asked) = asked else {
            return Ok(self.config.lease_default);
        };
        if asked < self.config.lease_min || asked > self.config.lease_max {
            return Err(Error::invalid(
                field,
                format!(
                    "must be between {} and {} (the server's lease bounds)",
                    humantime::format_duration(self.config.lease_min),
                    humantime::format_duration(self.config.lease_max)
                ),
            ));
        }
        Ok(asked)
    }
}

/// Serves claims that queued together: one statement for each set of
/// claims that ask for the same queues and lease, with the invoices shared
/// fairly between the queues that have work and handed out in the order the
/// claims arrived. One answer per claim, in order.
async fn claim_merged(
    store: Store,
    max_hold: Duration,
    jobs: Vec<ClaimJob>,
) -> Result<Vec<Result<Vec<ClaimedInvoice>>>> {
    let mut answers: Vec<Option<Result<Vec<ClaimedInvoice>>>> = jobs.iter().map(|_| None).collect();
    // Claims that can share a statement: same queues, same lease.
    type Shape<'a> = (&'a [String], Duration);
    let mut groups: Vec<(Shape<'_>, Vec<usize>)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let key = (job.queues.as_slice(), job.lease);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    for ((only, lease), members) in groups {
        let holders: Vec<(&str, u32)> = members
            .iter()
            .map(|&i| (jobs[i].worker_id.as_str(), jobs[i].max_count))
            .collect();
        let claimed = claim_group(&store, only, lease, max_hold, holders).await;
        match claimed {
            Ok(per_holder) => {
                for (&i, mine) in members.iter().zip(per_holder) {
                    answers[i] = Some(Ok(mine));
                }
            }
            Err(error) => {
                for &i in &members {
                    answers[i] = Some(Err(error.for_each_caller()));
                }
            }
        }
    }
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Error::internal("a merged claim went unanswered"))))
        .collect())
}

async fn claim_group(
    store: &Store,
    only: &[String],
    lease: Duration,
    max_hold: Duration,
    holders: Vec<(&str, u32)>,
) -> Result<Vec<Vec<ClaimedInvoice>>> {
    let queues = store.queue_list_claimable(only).await?;
    if queues.is_empty() {
        return Ok(holders.iter().map(|_| Vec::new()).collect());
    }
    let total = holders.iter().map(|(_, n)| *n).sum();
    let shares = fairness::shares(total, &queues, &mut rand::rng());
    store
        .invoice_claim_many(&ClaimParams {
            holders,
            lease_duration: lease,
            max_hold,
            shares,
        })
        .await
}

/// Serves completions that queued together, single ones and batches alike:
/// as few statements as [`MAX_BATCH`] completions each allow, a caller's
/// batch never split between two. If a statement fails, only the callers
/// it carried get the error. One list of outcomes per caller, in order.
async fn complete_merged(
    store: Store,
    batches: Vec<Vec<Completion>>,
) -> Result<Vec<Result<Vec<Result<Completed>>>>> {
    let mut answers = Vec::with_capacity(batches.len());
    let mut batches = batches.into_iter().peekable();
    while let Some(first) = batches.next() {
        // A caller's batch holds at most MAX_BATCH, so each statement takes
        // at least one caller.
        let mut sizes = vec![first.len()];
        let mut rows = first;
        while let Some(next) = batches.next_if(|b| rows.len() + b.len() <= MAX_BATCH) {
            sizes.push(next.len());
            rows.extend(next);
        }
        match store.invoice_complete_many(&rows).await {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for size in sizes {
                    answers.push(Ok(outcomes.by_ref().take(size).collect()));
                }
            }
            Err(error) => answers.extend(sizes.iter().map(|_| Err(error.for_each_caller()))),
        }
    }
    Ok(answers)
}

/// Refuses an empty batch or one larger than [`MAX_BATCH`], naming `field`.
pub fn check_batch(field: &str, len: usize) -> Result<()> {
    match len {
        0 => Err(Error::invalid(field, "must not be empty")),
        n if n > MAX_BATCH => Err(Error::invalid(
            field,
            format!("holds {n} items; at most {MAX_BATCH} are allowed"),
        )),
        _ => Ok(()),
    }
}

fn check_selection(selection: &Selection) -> Result<()> {
    match selection {
        Selection::Ids(ids) => check_batch("invoice_ids", ids.len()),
        Selection::Filter {
            queue: None,
            failed_since: None,
            customer_id: None,
        } => Err(Error::invalid(
            "invoice_ids",
            "select invoices by id, or give a filter",
        )),
        Selection::Filter { .. } => Ok(()),
    }
}

fn count_completion(outcome: &Result<Completed>) {
    match outcome {
        Ok(c) if !c.already_completed => {
            metrics::counter!("billing_coordinator_invoices_completed_total").increment(1);
        }
        Err(Error::LeaseLost { .. }) => {
            metrics::counter!("billing_coordinator_lease_lost_total", "rpc" => "complete")
                .increment(1);
        }
        _ => {}
    }
}

fn count_lost<T>(result: &Result<T>, rpc: &'static str) {
    if let Err(Error::LeaseLost { .. }) = result {
        metrics::counter!("billing_coordinator_lease_lost_total", "rpc" => rpc).increment(1);
    }
}
