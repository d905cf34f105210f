//! Statements on the `invoices` table, one function per operation.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use sqlx::{Postgres, Transaction, types::Json};

use super::{AVAILABLE_CHANNEL, Store, classify, retry_transient};
use crate::{
    error::{Error, Result},
    lease::{
        ClaimedInvoice, Completed, Completion, Invoice, InvoiceId, InvoiceRef, InvoiceState, Lease,
        LeaseToken, NewInvoice, Release, Submitted, Timestamp,
    },
};

/// The columns every statement returns for an invoice, in `InvoiceRow` order.
/// Statements joining other row sources name those columns differently so
/// these need no table prefix.
macro_rules! invoice_columns {
    () => {
        "id, external_id, queue, customer_id, amount_minor, currency, priority, metadata, \
         idempotency_key::text AS idempotency_key, state, available_at, attempts, \
         max_attempts, lease_epoch, lease_nonce, leased_by, leased_at, lease_expires_at, \
         lease_expires_at <= now() AS lease_expired, lease_released, last_error, \
         provider_reference, completed_at, completed_by, created_at, updated_at"
    };
}

#[derive(Clone, sqlx::FromRow)]
struct InvoiceRow {
    id: i64,
    external_id: String,
    queue: String,
    customer_id: String,
    amount_minor: i64,
    currency: String,
    priority: i16,
    metadata: Json<BTreeMap<String, String>>,
    idempotency_key: String,
    state: String,
    available_at: Timestamp,
    attempts: i32,
    max_attempts: i32,
    lease_epoch: i32,
    lease_nonce: Option<i64>,
    leased_by: Option<String>,
    leased_at: Option<Timestamp>,
    lease_expires_at: Option<Timestamp>,
    lease_expired: Option<bool>,
    lease_released: bool,
    last_error: Option<String>,
    provider_reference: Option<String>,
    completed_at: Option<Timestamp>,
    completed_by: Option<String>,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl InvoiceRow {
    fn state(&self) -> Result<InvoiceState> {
        InvoiceState::from_db(&self.state)
            .ok_or_else(|| Error::internal(format!("unknown invoice state {:?}", self.state)))
    }

    /// The token of the row's latest lease, if it ever had one.
    fn latest_token(&self) -> Option<LeaseToken> {
        self.lease_nonce.map(|nonce| LeaseToken {
            invoice_id: self.id,
            epoch: self.lease_epoch,
            nonce,
        })
    }

    fn into_invoice(self) -> Result<Invoice> {
        let state = self.state()?;
        let lease = match (state, self.leased_by, self.leased_at, self.lease_expires_at) {
            (InvoiceState::Leased, Some(worker_id), Some(leased_at), Some(expires_at)) => {
                Some(Lease {
                    worker_id,
                    leased_at,
                    expires_at,
                    expired: self.lease_expired.unwrap_or(false),
                })
            }
            _ => None,
        };
        Ok(Invoice {
            id: self.id,
            external_id: self.external_id,
            queue: self.queue,
            customer_id: self.customer_id,
            amount_minor: self.amount_minor,
            currency: self.currency,
            priority: self.priority,
            metadata: self.metadata.0,
            state,
            available_at: self.available_at,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            lease,
            last_error: self.last_error,
            provider_reference: self.provider_reference,
            completed_at: self.completed_at,
            completed_by: self.completed_by,
            idempotency_key: self.idempotency_key,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// How a presented token relates to the invoice's latest lease.
enum Fence {
    /// It is the latest lease.
    Latest,
    /// A later lease has been granted since.
    Superseded,
    /// The invoice never issued it.
    Unknown,
}

fn fence(row: &InvoiceRow, token: &LeaseToken) -> Fence {
    match row.latest_token() {
        Some(latest) if latest == *token => Fence::Latest,
        _ if token.epoch < row.lease_epoch => Fence::Superseded,
        _ => Fence::Unknown,
    }
}

fn unknown_token(token: &LeaseToken) -> Error {
    Error::NotFound(format!(
        "lease_token was never issued for invoice {}",
        token.invoice_id
    ))
}

fn no_such_invoice(id: InvoiceId) -> Error {
    Error::NotFound(format!("invoice {id} does not exist"))
}

fn lease_lost(row: &InvoiceRow, detail: &str) -> Result<Error> {
    Ok(Error::LeaseLost {
        invoice_id: row.id,
        state: row.state()?.api_name(),
        detail: detail.to_owned(),
    })
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// What one pass of the rescuer did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RescueCounts {
    /// Expired leases whose invoice became claimable again.
    pub returned: u64,
    /// Expired leases whose invoice had spent its attempt budget.
    pub failed: u64,
}

// Rows are inserted in external_id order so that two batches sharing
// external ids wait on each other's unique-index entries in the same order
// instead of deadlocking.
const INSERT_INVOICES: &str = "
    INSERT INTO invoices (external_id, queue, customer_id, amount_minor, currency, priority,
                          metadata, available_at, max_attempts)
    SELECT external_id, queue, customer_id, amount_minor, currency, priority,
           metadata::jsonb, coalesce(available_at, now()), max_attempts
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::smallint[],
                $7::text[], $8::timestamptz[], $9::integer[])
         AS s(external_id, queue, customer_id, amount_minor, currency, priority,
              metadata, available_at, max_attempts)
    ORDER BY external_id
    ON CONFLICT (external_id) DO NOTHING
    RETURNING id, external_id";

const SELECT_BY_EXTERNAL_IDS: &str = concat!(
    "SELECT ",
    invoice_columns!(),
    " FROM invoices WHERE external_id = ANY($1)"
);

const SELECT_BY_IDS: &str = concat!(
    "SELECT ",
    invoice_columns!(),
    " FROM invoices WHERE id = ANY($1)"
);

const NOTIFY_AVAILABLE: &str = "SELECT pg_notify($1, '')";

// The locking subquery must stay in a CTE: written as `WHERE id IN (SELECT
// ... FOR UPDATE SKIP LOCKED LIMIT n)` the planner may run it more than once
// and lease more than n rows. SKIP LOCKED makes concurrent claims take
// different rows instead of queueing behind each other. The two variants
// exist because `queue = ANY($x) OR cardinality($x) = 0` would keep a
// prepared statement's generic plan off the per-queue index.
const CLAIM_ANY_QUEUE: &str = concat!(
    "WITH candidates AS (
        SELECT id AS candidate_id FROM invoices
        WHERE state = 'pending' AND available_at <= now()
        ORDER BY priority, available_at, id
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    UPDATE invoices SET
        state = 'leased',
        attempts = attempts + 1,
        lease_epoch = lease_epoch + 1,
        lease_nonce = (random() * 9007199254740991)::bigint,
        leased_by = $1,
        leased_at = now(),
        lease_expires_at = now() + $3 * interval '1 microsecond',
        lease_released = false,
        updated_at = now()
    FROM candidates
    WHERE id = candidate_id
    RETURNING ",
    invoice_columns!()
);

const CLAIM_FROM_QUEUES: &str = concat!(
    "WITH candidates AS (
        SELECT id AS candidate_id FROM invoices
        WHERE state = 'pending' AND available_at <= now() AND queue = ANY($4)
        ORDER BY priority, available_at, id
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    UPDATE invoices SET
        state = 'leased',
        attempts = attempts + 1,
        lease_epoch = lease_epoch + 1,
        lease_nonce = (random() * 9007199254740991)::bigint,
        leased_by = $1,
        leased_at = now(),
        lease_expires_at = now() + $3 * interval '1 microsecond',
        lease_released = false,
        updated_at = now()
    FROM candidates
    WHERE id = candidate_id
    RETURNING ",
    invoice_columns!()
);

// Completes every listed lease that is still its invoice's latest and was not
// given back, expired or not: see the lease contract.
const COMPLETE_MANY: &str = concat!(
    "UPDATE invoices SET
        state = 'completed',
        completed_at = now(),
        completed_by = leased_by,
        provider_reference = c_reference,
        lease_expires_at = NULL,
        updated_at = now()
    FROM unnest($1::bigint[], $2::integer[], $3::bigint[], $4::text[])
         AS c(c_id, c_epoch, c_nonce, c_reference)
    WHERE id = c_id AND lease_epoch = c_epoch AND lease_nonce = c_nonce
      AND NOT lease_released AND state <> 'completed'
    RETURNING ",
    invoice_columns!()
);

const RELEASE: &str = concat!(
    "UPDATE invoices SET
        state = CASE WHEN $4 AND attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
        attempts = CASE WHEN $4 THEN attempts ELSE attempts - 1 END,
        available_at = now() + $5 * interval '1 microsecond',
        last_error = CASE WHEN $4 THEN coalesce($6, 'released as failed by ' || leased_by)
                          ELSE last_error END,
        lease_expires_at = NULL,
        lease_released = true,
        updated_at = now()
    WHERE id = $1 AND lease_epoch = $2 AND lease_nonce = $3 AND state = 'leased'
    RETURNING ",
    invoice_columns!()
);

const EXTEND: &str = "
    UPDATE invoices SET
        lease_expires_at = now() + $4 * interval '1 microsecond',
        updated_at = now()
    WHERE id = $1 AND lease_epoch = $2 AND lease_nonce = $3 AND state = 'leased'
    RETURNING lease_expires_at";

// Takes expired leases back. The holder's token stays the latest until
// somebody claims the invoice again, so a late completion still lands.
const RESCUE_EXPIRED: &str = "
    WITH expired AS (
        SELECT id AS expired_id FROM invoices
        WHERE state = 'leased' AND lease_expires_at <= coalesce($1, now())
        ORDER BY lease_expires_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    UPDATE invoices SET
        state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
        available_at = coalesce($1, now()),
        last_error = format('lease held by %s expired at %s', leased_by, lease_expires_at),
        lease_expires_at = NULL,
        updated_at = coalesce($1, now())
    FROM expired
    WHERE id = expired_id
    RETURNING state";

impl Store {
    /// Inserts new invoices, leaving existing external ids alone. Fails with
    /// [`Error::ExternalIdConflict`], inserting nothing, if an existing invoice
    /// differs from its resubmission.
    pub async fn invoice_submit_many(
        &self,
        invoices: &[NewInvoice],
        default_max_attempts: i32,
    ) -> Result<Vec<Submitted>> {
        retry_transient(|| self.submit_once(invoices, default_max_attempts)).await
    }

    async fn submit_once(
        &self,
        invoices: &[NewInvoice],
        default_max_attempts: i32,
    ) -> Result<Vec<Submitted>> {
        let metadata: Vec<String> = invoices
            .iter()
            .map(|i| serde_json::to_string(&i.metadata))
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Internal(e.into()))?;
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let created: Vec<(i64, String)> = sqlx::query_as(INSERT_INVOICES)
            .bind(
                invoices
                    .iter()
                    .map(|i| i.external_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                invoices
                    .iter()
                    .map(|i| i.queue.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                invoices
                    .iter()
                    .map(|i| i.customer_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(invoices.iter().map(|i| i.amount_minor).collect::<Vec<_>>())
            .bind(
                invoices
                    .iter()
                    .map(|i| i.currency.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(invoices.iter().map(|i| i.priority).collect::<Vec<_>>())
            .bind(metadata)
            .bind(invoices.iter().map(|i| i.available_at).collect::<Vec<_>>())
            .bind(
                invoices
                    .iter()
                    .map(|i| i.max_attempts.unwrap_or(default_max_attempts))
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        let created: HashMap<String, i64> =
            created.into_iter().map(|(id, ext)| (ext, id)).collect();

        let existing_ids: Vec<&str> = invoices
            .iter()
            .filter(|i| !created.contains_key(&i.external_id))
            .map(|i| i.external_id.as_str())
            .collect();
        let mut existing: HashMap<String, Invoice> = HashMap::new();
        if !existing_ids.is_empty() {
            let rows: Vec<InvoiceRow> = sqlx::query_as(SELECT_BY_EXTERNAL_IDS)
                .bind(existing_ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?;
            for row in rows {
                let invoice = row.into_invoice()?;
                existing.insert(invoice.external_id.clone(), invoice);
            }
        }

        let mut results = Vec::with_capacity(invoices.len());
        for new in invoices {
            if let Some(&id) = created.get(&new.external_id) {
                results.push(Submitted {
                    invoice_id: id,
                    external_id: new.external_id.clone(),
                    created: true,
                    state: InvoiceState::Pending,
                });
                continue;
            }
            let old = existing.get(&new.external_id).ok_or_else(|| {
                Error::internal(format!(
                    "external id {:?} neither inserted nor found",
                    new.external_id
                ))
            })?;
            if let Some(field) = first_difference(new, old, default_max_attempts) {
                // Dropping the transaction rolls back the rows this batch created.
                return Err(Error::ExternalIdConflict {
                    external_id: new.external_id.clone(),
                    differing_field: field,
                });
            }
            results.push(Submitted {
                invoice_id: old.id,
                external_id: old.external_id.clone(),
                created: false,
                state: old.state,
            });
        }
        if !created.is_empty() {
            notify_available(&mut tx).await?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(results)
    }

    /// Leases up to `max_count` available invoices to `worker_id`.
    pub async fn invoice_claim_many(
        &self,
        worker_id: &str,
        max_count: u32,
        lease_duration: Duration,
        queues: &[String],
    ) -> Result<Vec<ClaimedInvoice>> {
        let query = if queues.is_empty() {
            sqlx::query_as::<_, InvoiceRow>(CLAIM_ANY_QUEUE)
        } else {
            sqlx::query_as::<_, InvoiceRow>(CLAIM_FROM_QUEUES)
        };
        let rows = query
            .bind(worker_id)
            .bind(i64::from(max_count))
            .bind(micros(lease_duration))
            .bind(queues)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let mut claimed = rows
            .into_iter()
            .map(|row| {
                let token = row
                    .latest_token()
                    .ok_or_else(|| Error::internal("claimed row without a lease nonce"))?;
                Ok(ClaimedInvoice {
                    invoice: row.into_invoice()?,
                    token,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // UPDATE ... RETURNING does not keep the CTE's order.
        claimed.sort_by(|a, b| {
            let key =
                |c: &ClaimedInvoice| (c.invoice.priority, c.invoice.available_at, c.invoice.id);
            key(a).cmp(&key(b))
        });
        Ok(claimed)
    }

    /// Completes each lease that is still its invoice's latest, and says for
    /// every other one why not. One outcome per completion, in order.
    pub async fn invoice_complete_many(
        &self,
        completions: &[Completion],
    ) -> Result<Vec<Result<Completed>>> {
        let ids: Vec<i64> = completions.iter().map(|c| c.token.invoice_id).collect();
        let rows: Vec<InvoiceRow> = retry_transient(|| async {
            sqlx::query_as(COMPLETE_MANY)
                .bind(&ids)
                .bind(
                    completions
                        .iter()
                        .map(|c| c.token.epoch)
                        .collect::<Vec<_>>(),
                )
                .bind(
                    completions
                        .iter()
                        .map(|c| c.token.nonce)
                        .collect::<Vec<_>>(),
                )
                .bind(
                    completions
                        .iter()
                        .map(|c| c.provider_reference.as_deref())
                        .collect::<Vec<_>>(),
                )
                .fetch_all(&self.pool)
                .await
                .map_err(classify)
        })
        .await?;
        let done: HashMap<InvoiceId, InvoiceRow> = rows.into_iter().map(|r| (r.id, r)).collect();

        // Everything not completed just now is diagnosed from its current row.
        let missing: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !done.contains_key(id))
            .collect();
        let mut current: HashMap<InvoiceId, InvoiceRow> = HashMap::new();
        if !missing.is_empty() {
            let rows: Vec<InvoiceRow> = sqlx::query_as(SELECT_BY_IDS)
                .bind(&missing)
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
            current.extend(rows.into_iter().map(|row| (row.id, row)));
        }

        // A batch may name one invoice more than once: the mention whose token
        // completed it is the completion, any later one with that token a retry.
        let mut reported = std::collections::HashSet::new();
        let mut outcomes = Vec::with_capacity(completions.len());
        for completion in completions {
            let id = completion.token.invoice_id;
            let outcome = match done.get(&id) {
                Some(row) if row.latest_token() == Some(completion.token) => Ok(Completed {
                    invoice: row.clone().into_invoice()?,
                    already_completed: !reported.insert(id),
                }),
                Some(row) => diagnose_completion(Some(row), &completion.token),
                None => diagnose_completion(current.get(&id), &completion.token),
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Gives a live lease back; see [`Release`].
    pub async fn invoice_release(&self, token: &LeaseToken, release: &Release) -> Result<Invoice> {
        let (counts, delay, error) = match release {
            Release::Failed { error, retry_after } => {
                (true, retry_after.unwrap_or_default(), error.as_deref())
            }
            Release::Shutdown => (false, Duration::ZERO, None),
        };
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let row: Option<InvoiceRow> = sqlx::query_as(RELEASE)
            .bind(token.invoice_id)
            .bind(token.epoch)
            .bind(token.nonce)
            .bind(counts)
            .bind(micros(delay))
            .bind(error)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        let Some(row) = row else {
            drop(tx);
            let row = self.row_by_id(token.invoice_id).await?;
            return match fence(&row, token) {
                Fence::Latest if row.lease_released => row.into_invoice(),
                Fence::Latest => Err(lease_lost(&row, latest_not_live(&row)?)?),
                Fence::Superseded => Err(lease_lost(&row, "the invoice was claimed again since")?),
                Fence::Unknown => Err(unknown_token(token)),
            };
        };
        if row.state == InvoiceState::Pending.as_db() {
            notify_available(&mut tx).await?;
        }
        tx.commit().await.map_err(classify)?;
        row.into_invoice()
    }

    /// Moves a live lease's expiry to now + `lease_duration`.
    pub async fn invoice_extend_lease(
        &self,
        token: &LeaseToken,
        lease_duration: Duration,
    ) -> Result<Timestamp> {
        let expires_at: Option<Timestamp> = sqlx::query_scalar(EXTEND)
            .bind(token.invoice_id)
            .bind(token.epoch)
            .bind(token.nonce)
            .bind(micros(lease_duration))
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        if let Some(expires_at) = expires_at {
            return Ok(expires_at);
        }
        let row = self.row_by_id(token.invoice_id).await?;
        Err(match fence(&row, token) {
            Fence::Latest => lease_lost(&row, latest_not_live(&row)?)?,
            Fence::Superseded => lease_lost(&row, "the invoice was claimed again since")?,
            Fence::Unknown => unknown_token(token),
        })
    }

    /// Reads one invoice.
    pub async fn invoice_get(&self, invoice: &InvoiceRef) -> Result<Invoice> {
        let row: Option<InvoiceRow> = match invoice {
            InvoiceRef::Id(id) => sqlx::query_as(SELECT_BY_IDS).bind(vec![*id]),
            InvoiceRef::External(ext) => {
                sqlx::query_as(SELECT_BY_EXTERNAL_IDS).bind(vec![ext.clone()])
            }
        }
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        match (row, invoice) {
            (Some(row), _) => row.into_invoice(),
            (None, InvoiceRef::Id(id)) => Err(no_such_invoice(*id)),
            (None, InvoiceRef::External(ext)) => Err(Error::NotFound(format!(
                "no invoice has external_id {ext:?}"
            ))),
        }
    }

    /// Takes back up to `limit` leases that expired by `now` (the database's
    /// clock when `None`), counting the attempt. Idempotent and safe to run on
    /// every replica at once: concurrent passes skip each other's rows.
    pub async fn invoice_rescue_expired(
        &self,
        now: Option<Timestamp>,
        limit: u32,
    ) -> Result<RescueCounts> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let states: Vec<String> = sqlx::query_scalar(RESCUE_EXPIRED)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        let returned = states
            .iter()
            .filter(|s| *s == InvoiceState::Pending.as_db())
            .count();
        let counts = RescueCounts {
            returned: returned as u64,
            failed: (states.len() - returned) as u64,
        };
        if counts.returned > 0 {
            notify_available(&mut tx).await?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(counts)
    }

    async fn row_by_id(&self, id: InvoiceId) -> Result<InvoiceRow> {
        sqlx::query_as(SELECT_BY_IDS)
            .bind(vec![id])
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?
            .ok_or_else(|| no_such_invoice(id))
    }
}

async fn notify_available(tx: &mut Transaction<'_, Postgres>) -> Result<()> {
    sqlx::query(NOTIFY_AVAILABLE)
        .bind(AVAILABLE_CHANNEL)
        .execute(&mut **tx)
        .await
        .map(|_| ())
        .map_err(classify)
}

/// Why the latest lease, presented by its holder, could not be written.
fn latest_not_live(row: &InvoiceRow) -> Result<&'static str> {
    Ok(match row.state()? {
        InvoiceState::Completed => "the invoice was already completed with this lease",
        _ if row.lease_released => "the lease was released",
        InvoiceState::Leased => "the lease is live",
        InvoiceState::Pending | InvoiceState::Failed => "the lease expired and was taken back",
    })
}

fn diagnose_completion(row: Option<&InvoiceRow>, token: &LeaseToken) -> Result<Completed> {
    let Some(row) = row else {
        return Err(no_such_invoice(token.invoice_id));
    };
    match fence(row, token) {
        Fence::Latest if row.state()? == InvoiceState::Completed => Ok(Completed {
            invoice: row.clone().into_invoice()?,
            already_completed: true,
        }),
        Fence::Latest if row.lease_released => Err(lease_lost(row, "the lease was released")?),
        Fence::Latest => Err(Error::internal(
            "a completion with the latest lease did not apply",
        )),
        Fence::Superseded => Err(lease_lost(row, "the invoice was claimed again since")?),
        Fence::Unknown => Err(unknown_token(token)),
    }
}

/// The first field in which a resubmission differs from the stored invoice.
fn first_difference(
    new: &NewInvoice,
    old: &Invoice,
    default_max_attempts: i32,
) -> Option<&'static str> {
    if new.queue != old.queue {
        Some("queue")
    } else if new.customer_id != old.customer_id {
        Some("customer_id")
    } else if new.amount_minor != old.amount_minor {
        Some("amount_minor")
    } else if new.currency != old.currency {
        Some("currency")
    } else if new.priority != old.priority {
        Some("priority")
    } else if new.max_attempts.unwrap_or(default_max_attempts) != old.max_attempts {
        Some("max_attempts")
    } else if new.metadata != old.metadata {
        Some("metadata")
    } else if new.available_at.is_some_and(|at| at != old.available_at) {
        Some("available_at")
    } else {
        None
    }
}
