//! The audit trail: `invoice_events`, appended by the lease statements in
//! their own transaction, read per invoice, pruned by age.

use std::time::Duration;

use super::{Store, classify, invoices::micros};
use crate::{
    admin::{EventKind, InvoiceEvent, PageRequest},
    error::{Error, Result},
    lease::{InvoiceId, LeaseToken, Timestamp},
};

/// A worker write refused because its lease was lost, for the trail.
pub(super) struct LostWrite {
    token: LeaseToken,
    detail: String,
}

impl LostWrite {
    pub(super) fn new(token: LeaseToken, write: &str, refusal: &Error) -> Self {
        Self {
            token,
            detail: format!("{write} refused: {refusal}"),
        }
    }
}

const LOG_LOST_WRITES: &str = "
    INSERT INTO invoice_events (invoice_id, kind, lease_epoch, lease_nonce, detail)
    SELECT invoice_id, 'lease_lost', lease_epoch, lease_nonce, detail
    FROM unnest($1::bigint[], $2::integer[], $3::bigint[], $4::text[])
         AS l(invoice_id, lease_epoch, lease_nonce, detail)";

const LIST_EVENTS: &str = "
    SELECT id, invoice_id, at, kind, worker_id, attempt, lease_epoch, lease_nonce, detail
    FROM invoice_events
    WHERE invoice_id = $1 AND id > $2
    ORDER BY id
    LIMIT $3";

const INVOICE_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM invoices WHERE id = $1)";

// Bounded batches keep each delete short and its WAL small. The rows are
// found through the BRIN index on `at` and deleted by their physical
// address, because no index on the id is kept (migration 0004).
const PRUNE_EVENTS: &str = "
    DELETE FROM invoice_events
    WHERE ctid = ANY (ARRAY(SELECT ctid FROM invoice_events
                            WHERE at < now() - $1 * interval '1 microsecond'
                            LIMIT $2))";

type EventRow = (
    i64,
    i64,
    Timestamp,
    String,
    Option<String>,
    Option<i32>,
    Option<i32>,
    Option<i64>,
    Option<String>,
);

impl Store {
    /// Records refused writes of lost leases.
    pub(super) async fn event_log_lost_writes(&self, lost: &[LostWrite]) -> Result<()> {
        if lost.is_empty() {
            return Ok(());
        }
        sqlx::query(LOG_LOST_WRITES)
            .bind(lost.iter().map(|l| l.token.invoice_id).collect::<Vec<_>>())
            .bind(lost.iter().map(|l| l.token.epoch).collect::<Vec<_>>())
            .bind(lost.iter().map(|l| l.token.nonce).collect::<Vec<_>>())
            .bind(lost.iter().map(|l| l.detail.as_str()).collect::<Vec<_>>())
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// One page of an invoice's trail, oldest first.
    pub async fn event_list(
        &self,
        invoice_id: InvoiceId,
        page: PageRequest,
    ) -> Result<Vec<InvoiceEvent>> {
        let rows: Vec<EventRow> = sqlx::query_as(LIST_EVENTS)
            .bind(invoice_id)
            .bind(page.after)
            .bind(i64::from(page.size))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        if rows.is_empty() {
            let exists: bool = sqlx::query_scalar(INVOICE_EXISTS)
                .bind(invoice_id)
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?;
            if !exists {
                return Err(super::invoices::no_such_invoice(invoice_id));
            }
        }
        rows.into_iter()
            .map(
                |(id, invoice_id, at, kind, worker_id, attempt, epoch, nonce, detail)| {
                    Ok(InvoiceEvent {
                        id,
                        invoice_id,
                        at,
                        kind: EventKind::from_db(&kind).ok_or_else(|| {
                            Error::internal(format!("unknown event kind {kind:?}"))
                        })?,
                        worker_id,
                        attempt,
                        token: epoch.zip(nonce).map(|(epoch, nonce)| LeaseToken {
                            invoice_id,
                            epoch,
                            nonce,
                        }),
                        detail,
                    })
                },
            )
            .collect()
    }

    /// Deletes up to `limit` events older than `retention`; says how many.
    pub async fn event_prune(&self, retention: Duration, limit: u32) -> Result<u64> {
        sqlx::query(PRUNE_EVENTS)
            .bind(micros(retention))
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await
            .map(|done| done.rows_affected())
            .map_err(classify)
    }
}
