//! The lease statements on `invoices`: submit, claim, complete, release,
//! extend, rescue. Each appends its audit events in the same statement.

use std::{collections::HashMap, sync::LazyLock, time::Duration};

use sqlx::{Postgres, Transaction};

use rand::seq::SliceRandom;

use super::{
    AVAILABLE_CHANNEL, GENERIC_PLANS, Store, classify,
    cursors::{self, Change, QueueList},
    events::LostWrite,
    retry_transient,
    rows::InvoiceRow,
};
use crate::{
    error::{Error, Result},
    lease::{
        Backoff, ClaimedInvoice, Completed, Completion, Extended, Invoice, InvoiceId, InvoiceRef,
        InvoiceState, LeaseToken, NewInvoice, Release, Submitted, Timestamp,
    },
};

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

pub(super) fn no_such_invoice(id: InvoiceId) -> Error {
    Error::NotFound(format!("invoice {id} does not exist"))
}

fn lease_lost(row: &InvoiceRow, detail: &str) -> Result<Error> {
    Ok(Error::LeaseLost {
        invoice_id: row.id,
        state: row.state()?.api_name(),
        detail: detail.to_owned(),
    })
}

pub(super) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// What one pass of the rescuer did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RescueCounts {
    /// Expired leases whose invoice will be claimable again.
    pub returned: u64,
    /// Expired leases whose invoice had spent its attempt budget.
    pub failed: u64,
    /// Expired leases whose invoice an operator had asked to cancel.
    pub cancelled: u64,
}

/// What one claim statement takes.
#[derive(Clone, Debug)]
pub struct ClaimParams<'a> {
    /// Who the leases go to and how many each may take, in order: the
    /// invoices first in claim order go to the first holder.
    pub holders: Vec<(&'a str, u32)>,
    /// Lease length.
    pub lease_duration: Duration,
    /// The hold deadline is the claim time plus this.
    pub max_hold: Duration,
    /// Queues to take from, and how many from each before topping up from
    /// all of them.
    pub shares: Vec<(String, u32)>,
}

fn plus(at: Timestamp, duration: Duration) -> Timestamp {
    chrono::TimeDelta::from_std(duration)
        .ok()
        .and_then(|d| at.checked_add_signed(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// Starts a submit's transaction under `GENERIC_PLANS`, set in the same
/// round trip. PostgreSQL planned the submit anew on every call, 0.45 ms of
/// planning against 0.55 ms of running it for a single invoice, because it
/// estimates the generic plan dearer than custom ones. Submits run on the
/// main pool, not on the funnel's few connections, since any number of
/// producers may submit at once.
static BEGIN_SUBMIT: LazyLock<String> = LazyLock::new(|| {
    GENERIC_PLANS
        .iter()
        .fold(String::from("BEGIN"), |sql, (name, value)| {
            sql + &format!("; SET LOCAL {name} = {value}")
        })
});

// Rows are inserted in external_id order, so that ids, and the claim order
// among invoices due at the same time, do not depend on the plan. External
// ids already taken are left out here; the insert trigger of
// migration 0006 enters the rest in `invoice_external_ids`, whose primary key
// keeps them unique. A batch racing another that submits the same external
// id fails there once the other commits (`Error::Aborted`, so it is run
// again and then finds that invoice). The lookup is a lateral subquery with
// a LIMIT, which PostgreSQL runs as one primary-key probe per row: written
// as NOT EXISTS, it became an anti-join, and the plan cached while the table
// was small hashed the whole table on every submit once it was not.
pub const SUBMIT: &str = "
    WITH submitted AS (
        INSERT INTO invoices (external_id, queue, customer_id, amount_minor, currency, priority,
                              metadata, available_at, max_attempts, serialization_key)
        SELECT s.external_id, s.queue, s.customer_id, s.amount_minor, s.currency, s.priority,
               s.metadata::jsonb, coalesce(s.available_at, now()), s.max_attempts,
               coalesce(s.serialization_key,
                        CASE WHEN q.serialize_by_customer THEN s.customer_id END)
        FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                    $6::smallint[], $7::text[], $8::timestamptz[], $9::integer[], $10::text[])
             AS s(external_id, queue, customer_id, amount_minor, currency, priority,
                  metadata, available_at, max_attempts, serialization_key)
        LEFT JOIN queues q ON q.name = s.queue
        LEFT JOIN LATERAL (SELECT true AS taken FROM invoice_external_ids e
                           WHERE e.external_id = s.external_id LIMIT 1) t ON true
        WHERE t.taken IS NULL
        ORDER BY s.external_id
        RETURNING id, external_id, queue, priority, available_at
    ),
    logged AS (
        INSERT INTO invoice_events (invoice_id, kind)
        SELECT id, 'submitted' FROM submitted
    )
    SELECT id, external_id, queue, priority, available_at FROM submitted";

const SELECT_BY_EXTERNAL_IDS: &str = concat!(
    "SELECT ",
    invoice_columns!(),
    " FROM invoices WHERE id = ANY (ARRAY(",
    "SELECT invoice_id FROM invoice_external_ids WHERE external_id = ANY($1)))"
);

pub(super) const SELECT_BY_IDS: &str = concat!(
    "SELECT ",
    invoice_columns!(),
    " FROM invoices WHERE id = ANY($1)"
);

const NOTIFY_AVAILABLE: &str = "SELECT pg_notify($1, $2)";

/// The queues that have pending invoices, with their weights. A loose index
/// scan: one probe of the per-queue claim index per queue, however many
/// invoices each holds.
const ACTIVE_QUEUES: &str = "
    WITH RECURSIVE active(queue_name) AS (
        (SELECT queue FROM invoices WHERE state = 'pending' ORDER BY queue LIMIT 1)
        UNION ALL
        SELECT (SELECT queue FROM invoices
                WHERE state = 'pending' AND queue > active.queue_name
                ORDER BY queue LIMIT 1)
        FROM active WHERE active.queue_name IS NOT NULL
    )
    SELECT a.queue_name, coalesce(q.weight, 1)
    FROM active a LEFT JOIN queues q ON q.name = a.queue_name
    WHERE a.queue_name IS NOT NULL";

/// The first pending invoice before each given cursor, if any: one bounded
/// walk per lane over the entries the cursor lets claims skip.
const BEHIND_CURSORS: &str = "
    SELECT lane_queue, lane_priority, first.available_at, first.id
    FROM unnest($1::text[], $2::smallint[], $3::timestamptz[], $4::bigint[])
         AS lane(lane_queue, lane_priority, after_at, after_id)
    CROSS JOIN LATERAL (
        SELECT available_at, id FROM invoices
        WHERE queue = lane.lane_queue AND priority = lane.lane_priority
          AND state = 'pending' AND (available_at, id) < (lane.after_at, lane.after_id)
        ORDER BY available_at, id
        LIMIT 1
    ) first";

/// A pending row that is claimable now: available, and, if it has a
/// serialization key, no other invoice with that key is leased. The
/// advisory try-lock keeps two concurrent claims from both taking the key
/// (the unique index would refuse the second); its xact scope ends with the
/// claim, when the leased row itself makes the key busy.
macro_rules! claimable {
    () => {
        "state = 'pending' AND available_at <= now()
         AND (serialization_key IS NULL OR (
              NOT EXISTS (SELECT 1 FROM invoices busy
                          WHERE busy.serialization_key = invoices.serialization_key
                            AND busy.state = 'leased')
              AND pg_try_advisory_xact_lock(1651663669, hashtext(serialization_key))))"
    };
}

// The fair share: each queue's quota is taken from its lanes (one per
// priority, first priority first), then whatever the quotas left unfilled is
// topped up from all lanes in order, and finally at most one invoice per
// serialization key is kept. Each lane is read from its cursor on (see
// `cursors`), which keeps the scans out of index entries left by invoices
// that are no longer pending. The row comparison is an index condition on
// `invoices_queue_claim_order`, so a scan starts at the cursor rather than
// filtering its way there. The outer LIMITs stop the nested loops as soon as
// a quota is met, so no lane locks rows nobody asked for.
//
// The locking subqueries must stay in CTEs: inlined into `WHERE id IN (...)`
// the planner may run them again and lease more rows than asked. SKIP LOCKED
// makes concurrent claims take different rows rather than queue behind each
// other; our own locks it does not skip, hence `NOT IN fair` in the top-up.
// Rows locked but not kept are released at commit.
pub const CLAIM: &str = concat!(
    "WITH lane AS (
        SELECT lane_queue, lane_priority, lane_order,
               coalesce(after_at, '-infinity') AS after_at, coalesce(after_id, 0) AS after_id
        FROM unnest($4::text[], $5::smallint[], $6::timestamptz[], $7::bigint[])
             WITH ORDINALITY AS l(lane_queue, lane_priority, after_at, after_id, lane_order)
    ),
    fair AS (
        SELECT picked.*
        FROM unnest($8::text[], $9::integer[]) AS share(share_queue, share_quota)
        CROSS JOIN LATERAL (
            SELECT taken.*
            FROM (SELECT * FROM lane WHERE lane_queue = share.share_queue
                  ORDER BY lane_order) l
            CROSS JOIN LATERAL (
                SELECT id AS pick_id, serialization_key AS pick_key,
                       priority AS pick_priority, available_at AS pick_available_at
                FROM invoices
                WHERE queue = l.lane_queue AND priority = l.lane_priority
                  AND (available_at, id) >= (l.after_at, l.after_id) AND ",
    claimable!(),
    "
                ORDER BY available_at, id
                LIMIT share.share_quota
                FOR UPDATE SKIP LOCKED
            ) taken
            LIMIT share.share_quota
        ) picked
    ),
    topped_up AS (
        SELECT taken.*
        FROM (SELECT * FROM lane ORDER BY lane_order) l
        CROSS JOIN LATERAL (
            SELECT id AS pick_id, serialization_key AS pick_key,
                   priority AS pick_priority, available_at AS pick_available_at
            FROM invoices
            WHERE queue = l.lane_queue AND priority = l.lane_priority
              AND (available_at, id) >= (l.after_at, l.after_id) AND ",
    claimable!(),
    "
              AND id NOT IN (SELECT pick_id FROM fair)
            ORDER BY available_at, id
            LIMIT greatest(0, $2 - (SELECT count(*) FROM fair))
            FOR UPDATE SKIP LOCKED
        ) taken
        LIMIT greatest(0, $2 - (SELECT count(*) FROM fair))
    ),
    picked AS (
        SELECT pick_id,
               row_number() OVER (ORDER BY pick_priority, pick_available_at, pick_id) AS slot
        FROM (
            SELECT pick_id, pick_key, pick_priority, pick_available_at,
                   row_number() OVER (PARTITION BY pick_key
                                      ORDER BY pick_priority, pick_available_at, pick_id) AS nth
            FROM (SELECT * FROM fair UNION ALL SELECT * FROM topped_up) AS candidates
        ) ranked
        WHERE pick_key IS NULL OR nth = 1
    ),
    -- Slot n, in claim order, goes to holder $1[$10[n]]: a holder asking for
    -- k invoices is named in k slots. Subscripts rather than a join with
    -- unnest: the plan made once for every call (see `Store::funnel_pool`)
    -- cannot know how many slots there are, and joined them in a nested
    -- loop, slots times picks. The slots are integers, which a subscript
    -- reaches directly; the names, variable-length, it walks, so there is
    -- one per claim merged into the statement, not one per slot.
    assigned AS (
        SELECT pick_id, slot, ($1::text[])[($10::integer[])[slot]] AS holder
        FROM picked
        WHERE slot <= cardinality($10::integer[])
    ),
    claimed AS (
        UPDATE invoices SET
            state = 'leased',
            attempts = attempts + 1,
            lease_epoch = lease_epoch + 1,
            lease_nonce = (random() * 9007199254740991)::bigint,
            leased_by = holder,
            leased_at = now(),
            lease_expires_at = now() + $3 * interval '1 microsecond',
            lease_released = false,
            updated_at = now()
        FROM assigned
        WHERE id = pick_id
        RETURNING slot AS claim_slot, ",
    invoice_columns!(),
    "
    ),
    logged AS (
        INSERT INTO invoice_events (invoice_id, kind, worker_id, attempt, lease_epoch, lease_nonce)
        SELECT id, 'claimed', leased_by, attempts, lease_epoch, lease_nonce FROM claimed
    )
    SELECT * FROM claimed"
);

// Completes every listed lease that is still its invoice's latest and was not
// given back, expired or not, cancel requested or not: see the lease
// contract.
pub const COMPLETE_MANY: &str = concat!(
    "WITH completed AS (
        UPDATE invoices SET
            state = 'completed',
            completed_at = now(),
            finished_at = now(),
            completed_by = leased_by,
            provider_reference = c_reference,
            lease_expires_at = NULL,
            cancel_requested = false,
            updated_at = now()
        FROM unnest($1::bigint[], $2::integer[], $3::bigint[], $4::text[])
             AS c(c_id, c_epoch, c_nonce, c_reference)
        WHERE id = c_id AND lease_epoch = c_epoch AND lease_nonce = c_nonce
          AND NOT lease_released AND state <> 'completed'
        RETURNING ",
    invoice_columns!(),
    "
    ),
    logged AS (
        INSERT INTO invoice_events (invoice_id, kind, worker_id, attempt, lease_epoch,
                                    lease_nonce, detail)
        SELECT id, 'completed', completed_by, attempts, lease_epoch, lease_nonce,
               provider_reference
        FROM completed
    )
    SELECT * FROM completed"
);

// In SET, every column on the right reads the row as it was before: the
// attempt being released, the cancel request as the operator left it.
const RELEASE: &str = concat!(
    "WITH released AS (
        UPDATE invoices SET
            state = CASE WHEN cancel_requested THEN 'cancelled'
                         WHEN $4 AND attempts >= max_attempts THEN 'failed'
                         ELSE 'pending' END,
            attempts = CASE WHEN $4 THEN attempts ELSE attempts - 1 END,
            available_at = CASE WHEN NOT $4 THEN now()
                                WHEN $5::bigint IS NOT NULL
                                    THEN now() + $5 * interval '1 microsecond'
                                ELSE now() + ",
    backoff_sql!("$7", "$8"),
    " END,
            last_error = CASE WHEN $4 THEN coalesce($6, 'released as failed by ' || leased_by)
                              ELSE last_error END,
            finished_at = CASE WHEN cancel_requested OR ($4 AND attempts >= max_attempts)
                               THEN now() END,
            cancel_requested = false,
            lease_expires_at = NULL,
            lease_released = true,
            updated_at = now()
        WHERE id = $1 AND lease_epoch = $2 AND lease_nonce = $3 AND state = 'leased'
        RETURNING ",
    invoice_columns!(),
    "
    ),
    logged AS (
        INSERT INTO invoice_events (invoice_id, kind, worker_id, attempt, lease_epoch,
                                    lease_nonce, detail)
        SELECT id, 'released', leased_by, attempts + CASE WHEN $4 THEN 0 ELSE 1 END,
               lease_epoch, lease_nonce,
               CASE WHEN $4 THEN last_error ELSE 'shutting down' END
        FROM released
        UNION ALL
        SELECT id, state, leased_by, attempts, lease_epoch, lease_nonce, last_error
        FROM released WHERE state IN ('failed', 'cancelled')
    )
    SELECT * FROM released"
);

const EXTEND: &str = "
    WITH extended AS (
        UPDATE invoices SET
            lease_expires_at = least(now() + $4 * interval '1 microsecond',
                                     leased_at + $5 * interval '1 microsecond'),
            updated_at = now()
        WHERE id = $1 AND lease_epoch = $2 AND lease_nonce = $3 AND state = 'leased'
        RETURNING id, leased_by, attempts, lease_epoch, lease_nonce, lease_expires_at,
                  leased_at, cancel_requested
    ),
    logged AS (
        INSERT INTO invoice_events (invoice_id, kind, worker_id, attempt, lease_epoch,
                                    lease_nonce, detail)
        SELECT id, 'extended', leased_by, attempts, lease_epoch, lease_nonce,
               'until ' || lease_expires_at
        FROM extended
    )
    SELECT lease_expires_at, leased_at, cancel_requested FROM extended";

// Takes expired leases back. The holder's token stays the latest until
// somebody claims the invoice again, so a late completion still lands. The
// backoff counts from the expiry, so a rescuer that runs late does not add
// its delay to it.
const RESCUE_EXPIRED: &str = concat!(
    "WITH expired AS (
        SELECT id AS expired_id FROM invoices
        WHERE state = 'leased' AND lease_expires_at <= coalesce($1, now())
          AND lease_expires_at >= coalesce($5, '-infinity')
        ORDER BY lease_expires_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ),
    rescued AS (
        UPDATE invoices SET
            state = CASE WHEN cancel_requested THEN 'cancelled'
                         WHEN attempts >= max_attempts THEN 'failed'
                         ELSE 'pending' END,
            available_at = lease_expires_at + ",
    backoff_sql!("$3", "$4"),
    ",
            last_error = format('lease held by %s expired at %s', leased_by, lease_expires_at),
            finished_at = CASE WHEN cancel_requested OR attempts >= max_attempts
                               THEN coalesce($1, now()) END,
            cancel_requested = false,
            lease_expires_at = NULL,
            updated_at = coalesce($1, now())
        FROM expired
        WHERE id = expired_id
        RETURNING id, state, leased_by, attempts, lease_epoch, lease_nonce, last_error,
                  available_at, queue, priority, serialization_key
    ),
    logged AS (
        INSERT INTO invoice_events (invoice_id, kind, worker_id, attempt, lease_epoch,
                                    lease_nonce, detail)
        SELECT id, 'expired', leased_by, attempts, lease_epoch, lease_nonce,
               CASE WHEN state = 'pending'
                    THEN last_error || '; claimable again at ' || available_at
                    ELSE last_error END
        FROM rescued
        UNION ALL
        SELECT id, state, leased_by, attempts, lease_epoch, lease_nonce, last_error
        FROM rescued WHERE state IN ('failed', 'cancelled')
    )
    SELECT state, queue, priority, available_at, id, serialization_key FROM rescued"
);

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
        let mut tx = self
            .pool
            .begin_with(BEGIN_SUBMIT.as_str())
            .await
            .map_err(classify)?;
        let created: Vec<(i64, String, String, i16, Timestamp)> = sqlx::query_as(SUBMIT)
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
            .bind(
                invoices
                    .iter()
                    .map(|i| i.serialization_key.as_deref())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        let changes: Vec<Change> = created
            .iter()
            .map(|(id, _, queue, priority, at)| pending(queue, *priority, *at, *id))
            .collect();
        let created: HashMap<String, i64> =
            created.into_iter().map(|(id, ext, ..)| (ext, id)).collect();

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
        self.commit_announcing(tx, &changes).await?;
        Ok(results)
    }

    /// The queues a claim may take from, with their weights: every queue with
    /// pending invoices, or those of them in `only` when the worker chose
    /// queues. Finding them walks the claim index from the front, so the
    /// answer is kept until a write names a queue it does not list, weights
    /// change, or the next full scan. A chosen queue missing from it has
    /// nothing to claim, so a claim on it costs no statement at all.
    pub async fn queue_list_claimable(&self, only: &[String]) -> Result<Vec<(String, i32)>> {
        let mut queues = match self.cursors.active_queues() {
            QueueList::Use(queues) => queues,
            QueueList::Read => self.queue_read_active().await?,
        };
        if !only.is_empty() {
            queues.retain(|(queue, _)| only.contains(queue));
        }
        Ok(queues)
    }

    async fn queue_read_active(&self) -> Result<Vec<(String, i32)>> {
        let read = sqlx::query_as(ACTIVE_QUEUES)
            .fetch_all(&self.pool)
            .await
            .map_err(classify);
        match &read {
            Ok(queues) => self.cursors.set_active_queues(Vec::clone(queues)),
            Err(_) => self.cursors.active_queues_unread(),
        }
        read
    }

    /// Reads the queues with pending invoices again, and moves each claim
    /// cursor back to the first pending invoice behind it, if any: what the
    /// cursors' own bookkeeping missed. Says how many cursors moved.
    pub async fn claim_cursor_sweep(&self) -> Result<usize> {
        self.queue_read_active().await?;
        let lanes = self.cursors.lanes_past_front();
        if lanes.is_empty() {
            return Ok(0);
        }
        let behind: Vec<(String, i16, Timestamp, i64)> = sqlx::query_as(BEHIND_CURSORS)
            .bind(lanes.iter().map(|l| l.0.as_str()).collect::<Vec<_>>())
            .bind(lanes.iter().map(|l| l.1).collect::<Vec<_>>())
            .bind(lanes.iter().map(|l| l.2.0).collect::<Vec<_>>())
            .bind(lanes.iter().map(|l| l.2.1).collect::<Vec<_>>())
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let changes: Vec<Change> = behind
            .iter()
            .map(|(queue, priority, at, id)| pending(queue, *priority, *at, *id))
            .collect();
        self.cursors.apply(&changes);
        Ok(changes.len())
    }

    /// Leases claimable invoices to each holder, up to its count, taking
    /// each queue's share first. One list of claims per holder, in order.
    pub async fn invoice_claim_many(
        &self,
        params: &ClaimParams<'_>,
    ) -> Result<Vec<Vec<ClaimedInvoice>>> {
        let (queues, quotas): (Vec<&str>, Vec<i32>) = params
            .shares
            .iter()
            .map(|(q, n)| (q.as_str(), i32::try_from(*n).unwrap_or(i32::MAX)))
            .unzip();
        let holders: Vec<&str> = params.holders.iter().map(|(holder, _)| *holder).collect();
        let slots: Vec<i32> = (1..)
            .zip(&params.holders)
            .flat_map(|(nth, (_, count))| std::iter::repeat_n(nth, *count as usize))
            .collect();
        // Top-ups go through the queues in a different order each time, so
        // that no queue is always first to give its leftovers.
        let mut lane_order = queues.clone();
        lane_order.shuffle(&mut rand::rng());
        let starts = self.cursors.starts(&lane_order);
        let claimed: Result<Vec<ClaimedRow>> = retry_transient(|| async {
            self.on_funnel_connection(async |conn| {
                sqlx::query_as(CLAIM)
                    .bind(&holders)
                    .bind(slots.len() as i64)
                    .bind(micros(params.lease_duration))
                    .bind(starts.iter().map(|l| l.queue.as_str()).collect::<Vec<_>>())
                    .bind(starts.iter().map(|l| l.priority).collect::<Vec<_>>())
                    .bind(
                        starts
                            .iter()
                            .map(|l| l.after.map(|a| a.0))
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        starts
                            .iter()
                            .map(|l| l.after.map(|a| a.1))
                            .collect::<Vec<_>>(),
                    )
                    .bind(&queues)
                    .bind(&quotas)
                    .bind(&slots)
                    .fetch_all(conn)
                    .await
            })
            .await
        })
        .await;
        let mut rows = match claimed {
            Ok(rows) => rows,
            Err(error) => {
                // Rows this claim held were skipped by concurrent claims.
                let reset: Vec<Change> =
                    queues.iter().map(|q| Change::Queue((*q).into())).collect();
                self.cursors.apply(&reset);
                return Err(error);
            }
        };
        self.cursors.advance(
            &starts,
            rows.iter().map(|r| {
                let r = &r.row;
                (r.queue.as_str(), r.priority, (r.available_at, r.id))
            }),
        );
        // Rows locked for a serialization key but not kept were skipped by
        // concurrent claims too, and are now behind their cursors.
        let keyed: Vec<InvoiceRow> = rows
            .iter()
            .filter(|r| r.row.serialization_key.is_some())
            .map(|r| r.row.clone())
            .collect();
        if !keyed.is_empty() {
            self.cursors.apply(&keyed_queues(&keyed));
        }
        // Slots are numbered in claim order; UPDATE ... RETURNING keeps no order.
        rows.sort_by_key(|r| r.claim_slot);
        let mut per_holder = Vec::with_capacity(params.holders.len());
        let mut rows = rows.into_iter().peekable();
        let mut first_slot = 1;
        for (_, count) in &params.holders {
            let end = first_slot + i64::from(*count);
            let mut mine = Vec::new();
            while let Some(row) = rows.next_if(|r| r.claim_slot < end) {
                mine.push(claimed_invoice(row.row, params.max_hold)?);
            }
            per_holder.push(mine);
            first_slot = end;
        }
        Ok(per_holder)
    }

    /// Completes each lease that is still its invoice's latest, and says for
    /// every other one why not. One outcome per completion, in order.
    pub async fn invoice_complete_many(
        &self,
        completions: &[Completion],
    ) -> Result<Vec<Result<Completed>>> {
        let ids: Vec<i64> = completions.iter().map(|c| c.token.invoice_id).collect();
        let rows: Vec<InvoiceRow> = retry_transient(|| async {
            self.on_funnel_connection(async |conn| {
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
                    .fetch_all(conn)
                    .await
            })
            .await
        })
        .await?;
        // Invoices waiting for these keys may be claimable now.
        self.announce(&keyed_queues(&rows)).await?;
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
        let mut lost = Vec::new();
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
            if let Err(error @ Error::LeaseLost { .. }) = &outcome {
                lost.push(LostWrite::new(completion.token, "complete", error));
            }
            outcomes.push(outcome);
        }
        self.event_log_lost_writes(&lost).await?;
        Ok(outcomes)
    }

    /// Gives a live lease back; see [`Release`].
    pub async fn invoice_release(
        &self,
        token: &LeaseToken,
        release: &Release,
        backoff: Backoff,
    ) -> Result<Invoice> {
        let (counts, delay, error) = match release {
            Release::Failed { error, retry_after } => {
                (true, retry_after.map(micros), error.as_deref())
            }
            Release::Shutdown => (false, None, None),
        };
        let released = retry_transient(|| async {
            let mut tx = self.pool.begin().await.map_err(classify)?;
            let row: Option<InvoiceRow> = sqlx::query_as(RELEASE)
                .bind(token.invoice_id)
                .bind(token.epoch)
                .bind(token.nonce)
                .bind(counts)
                .bind(delay)
                .bind(error)
                .bind(micros(backoff.base))
                .bind(micros(backoff.max))
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
            let mut changes = Vec::new();
            if let Some(row) = &row {
                if row.state == InvoiceState::Pending.as_db() {
                    changes.push(pending(&row.queue, row.priority, row.available_at, row.id));
                }
                changes.extend(keyed_queues(std::slice::from_ref(row)));
            }
            self.commit_announcing(tx, &changes).await?;
            Ok(row)
        })
        .await?;
        if let Some(row) = released {
            return row.into_invoice();
        }
        let row = self.row_by_id(token.invoice_id).await?;
        let refusal = match fence(&row, token) {
            Fence::Latest if row.lease_released => return row.into_invoice(),
            Fence::Latest => lease_lost(&row, latest_not_live(&row)?)?,
            Fence::Superseded => lease_lost(&row, "the invoice was claimed again since")?,
            Fence::Unknown => return Err(unknown_token(token)),
        };
        self.event_log_lost_writes(&[LostWrite::new(*token, "release", &refusal)])
            .await?;
        Err(refusal)
    }

    /// Moves a live lease's expiry to now + `lease_duration`, but never past
    /// `leased_at + max_hold`.
    pub async fn invoice_extend_lease(
        &self,
        token: &LeaseToken,
        lease_duration: Duration,
        max_hold: Duration,
    ) -> Result<Extended> {
        let extended: Option<(Timestamp, Timestamp, bool)> = retry_transient(|| async {
            sqlx::query_as(EXTEND)
                .bind(token.invoice_id)
                .bind(token.epoch)
                .bind(token.nonce)
                .bind(micros(lease_duration))
                .bind(micros(max_hold))
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)
        })
        .await?;
        if let Some((expires_at, leased_at, cancel_requested)) = extended {
            return Ok(Extended {
                expires_at,
                hold_deadline: plus(leased_at, max_hold),
                cancel_requested,
            });
        }
        let row = self.row_by_id(token.invoice_id).await?;
        let refusal = match fence(&row, token) {
            Fence::Latest => lease_lost(&row, latest_not_live(&row)?)?,
            Fence::Superseded => lease_lost(&row, "the invoice was claimed again since")?,
            Fence::Unknown => return Err(unknown_token(token)),
        };
        self.event_log_lost_writes(&[LostWrite::new(*token, "extend", &refusal)])
            .await?;
        Err(refusal)
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
    /// clock when `None`) and not before `from`, counting the attempt.
    /// Idempotent and safe to run on every replica at once: concurrent passes
    /// skip each other's rows.
    pub async fn invoice_rescue_expired(
        &self,
        now: Option<Timestamp>,
        from: Option<Timestamp>,
        limit: u32,
        backoff: Backoff,
    ) -> Result<RescueCounts> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let rescued: Vec<(String, String, i16, Timestamp, i64, Option<String>)> =
            sqlx::query_as(RESCUE_EXPIRED)
                .bind(now)
                .bind(i64::from(limit))
                .bind(micros(backoff.base))
                .bind(micros(backoff.max))
                .bind(from)
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?;
        let count =
            |state: InvoiceState| rescued.iter().filter(|r| r.0 == state.as_db()).count() as u64;
        let counts = RescueCounts {
            returned: count(InvoiceState::Pending),
            failed: count(InvoiceState::Failed),
            cancelled: count(InvoiceState::Cancelled),
        };
        let mut changes = Vec::new();
        for (state, queue, priority, available_at, id, key) in &rescued {
            if state == InvoiceState::Pending.as_db() {
                changes.push(pending(queue, *priority, *available_at, *id));
            }
            if key.is_some() {
                changes.push(Change::Queue(queue.clone()));
            }
        }
        self.commit_announcing(tx, &changes).await?;
        Ok(counts)
    }

    /// The database's clock, or `now` when given.
    pub async fn clock(&self, now: Option<Timestamp>) -> Result<Timestamp> {
        sqlx::query_scalar("SELECT coalesce($1, now())")
            .bind(now)
            .fetch_one(&self.pool)
            .await
            .map_err(classify)
    }

    /// Commits `tx`, telling every replica's claim cursors about `changes`:
    /// the notification goes out with the commit, and this replica's cursors
    /// move only after it, when concurrent claims can see the rows.
    pub(super) async fn commit_announcing(
        &self,
        mut tx: Transaction<'_, Postgres>,
        changes: &[Change],
    ) -> Result<()> {
        if !changes.is_empty() {
            notify(&mut *tx, changes).await?;
        }
        tx.commit().await.map_err(classify)?;
        self.cursors.apply(changes);
        Ok(())
    }

    /// Tells every replica's claim cursors about `changes` made by a
    /// statement that has already committed.
    pub(super) async fn announce(&self, changes: &[Change]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.cursors.apply(changes);
        notify(&self.pool, changes).await
    }

    pub(super) async fn row_by_id(&self, id: InvoiceId) -> Result<InvoiceRow> {
        sqlx::query_as(SELECT_BY_IDS)
            .bind(vec![id])
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?
            .ok_or_else(|| no_such_invoice(id))
    }
}

/// A claimed row and the slot it was claimed for.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    claim_slot: i64,
    #[sqlx(flatten)]
    row: InvoiceRow,
}

fn claimed_invoice(row: InvoiceRow, max_hold: Duration) -> Result<ClaimedInvoice> {
    let token = row
        .latest_token()
        .ok_or_else(|| Error::internal("claimed row without a lease nonce"))?;
    let leased_at = row
        .leased_at
        .ok_or_else(|| Error::internal("claimed row without a claim time"))?;
    Ok(ClaimedInvoice {
        invoice: row.into_invoice()?,
        token,
        hold_deadline: plus(leased_at, max_hold),
    })
}

/// Sends `changes` on [`AVAILABLE_CHANNEL`], which also wakes long-polls.
async fn notify<'e>(executor: impl sqlx::PgExecutor<'e>, changes: &[Change]) -> Result<()> {
    sqlx::query(NOTIFY_AVAILABLE)
        .bind(AVAILABLE_CHANNEL)
        .bind(cursors::encode(changes))
        .execute(executor)
        .await
        .map(|_| ())
        .map_err(classify)
}

/// An invoice that became pending, as the claim cursors see it.
pub(super) fn pending(queue: &str, priority: i16, available_at: Timestamp, id: i64) -> Change {
    Change::Pending {
        queue: queue.to_owned(),
        priority,
        key: (available_at, id),
        count: 1,
    }
}

/// The queues of rows with a serialization key: invoices sharing their keys
/// may have been skipped by claims, and are behind the cursors.
fn keyed_queues(rows: &[InvoiceRow]) -> Vec<Change> {
    let mut queues: Vec<&str> = rows
        .iter()
        .filter(|r| r.serialization_key.is_some())
        .map(|r| r.queue.as_str())
        .collect();
    queues.sort_unstable();
    queues.dedup();
    queues
        .into_iter()
        .map(|q| Change::Queue(q.to_owned()))
        .collect()
}

/// Why the latest lease, presented by its holder, could not be written.
fn latest_not_live(row: &InvoiceRow) -> Result<&'static str> {
    Ok(match row.state()? {
        InvoiceState::Completed => "the invoice was already completed with this lease",
        _ if row.lease_released => "the lease was released",
        InvoiceState::Leased => "the lease is live",
        InvoiceState::Cancelled => "the lease expired and the invoice was cancelled",
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
    } else if new
        .serialization_key
        .as_ref()
        .is_some_and(|key| Some(key) != old.serialization_key.as_ref())
    {
        Some("serialization_key")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::CLAIM;

    /// SQL with its comments dropped and its whitespace collapsed.
    fn normalized(sql: &str) -> String {
        sql.lines()
            .map(|line| line.split("--").next().unwrap_or_default())
            .flat_map(str::split_whitespace)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// From `WITH lane AS` to the claimed rows' `RETURNING`.
    fn claim_body(sql: &str) -> String {
        let sql = normalized(sql);
        let start = sql.find("WITH lane AS").expect("a claim statement");
        let end = start + sql[start..].find(" RETURNING ").expect("a RETURNING");
        sql[start..end].to_owned()
    }

    // bench/schema_ab.sh measures the claim statement's shape with a copy
    // that pgbench can run; a copy that drifted would measure something else.
    #[test]
    fn the_schema_ab_service_claim_variant_runs_the_claim_statement() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/bench/sql/schema_ab/service_claim.claim.sql"
        );
        let copy = std::fs::read_to_string(path).expect("the variant's script");
        // `$10` before `$1`, which is its prefix.
        let named = [
            ("$10", ":slots"),
            ("$1", ":holders"),
            ("$2", ":n"),
            ("$3", ":lease"),
            ("$4", ":queues"),
            ("$5", ":priorities"),
            ("$6", ":after_ats"),
            ("$7", ":after_ids"),
            ("$8", ":share_queues"),
            ("$9", ":quotas"),
        ]
        .iter()
        .fold(CLAIM.to_owned(), |sql, (param, name)| {
            sql.replace(param, name)
        });
        assert_eq!(claim_body(&copy), claim_body(&named));
    }
}
