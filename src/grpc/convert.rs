//! Decoding requests into validated domain values, and encoding answers.
//!
//! Every check here names the offending field as the proto does, so a worker
//! in any language can tell what to fix.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};

use crate::{
    admin::{EventKind, InvoiceEvent, PageRequest, QueueStats, Selection},
    error::{Error, Result},
    lease::{
        ClaimRequest, ClaimedInvoice, Invoice, InvoiceState, LeaseToken, NewInvoice, Release,
        Timestamp,
    },
    proto,
};

/// Longest external id, customer id, worker id or provider reference.
const MAX_ID_BYTES: usize = 255;
/// Longest queue name.
const MAX_QUEUE_CHARS: usize = 64;
/// The queue of invoices submitted without one.
pub const DEFAULT_QUEUE: &str = "default";
/// Most metadata entries, longest key, and most bytes in all.
const MAX_METADATA_KEYS: usize = 64;
const MAX_METADATA_KEY_BYTES: usize = 128;
const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Longest release error.
const MAX_ERROR_BYTES: usize = 4096;
/// Highest attempt budget.
const MAX_ATTEMPTS: i32 = 100;
/// Lowest-priority value.
const MAX_PRIORITY: i32 = *crate::lease::PRIORITIES.end() as i32;

fn id_like(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes long; at most {MAX_ID_BYTES} are allowed",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn queue_name(field: &str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.chars().count() > MAX_QUEUE_CHARS
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
    {
        return Err(Error::invalid(
            field,
            format!("must be 1 to {MAX_QUEUE_CHARS} characters from [a-zA-Z0-9_.:-]"),
        ));
    }
    Ok(value.to_owned())
}

/// A protobuf duration as a non-negative [`Duration`]; `None` when unset.
pub fn duration(field: &str, value: Option<prost_types::Duration>) -> Result<Option<Duration>> {
    let Some(value) = value else { return Ok(None) };
    if value.seconds < 0 || value.nanos < 0 || value.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "must be a non-negative duration"));
    }
    Ok(Some(Duration::new(
        value.seconds as u64,
        value.nanos as u32,
    )))
}

fn timestamp(field: &str, value: Option<prost_types::Timestamp>) -> Result<Option<Timestamp>> {
    let Some(value) = value else { return Ok(None) };
    // PostgreSQL's timestamptz spans years 4713 BC to 294276 AD; keep well inside.
    let in_range = (-62_135_596_800..=253_402_300_799).contains(&value.seconds);
    let nanos = u32::try_from(value.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000);
    match (in_range, nanos) {
        (true, Some(nanos)) => Ok(DateTime::<Utc>::from_timestamp(value.seconds, nanos)),
        _ => Err(Error::invalid(
            field,
            "must be a valid timestamp between years 1 and 9999",
        )),
    }
}

/// A lease token that must belong to `invoice_id`.
pub fn lease_token(invoice_id: i64, token: &str) -> Result<LeaseToken> {
    if invoice_id <= 0 {
        return Err(Error::invalid(
            "invoice_id",
            "must be a positive invoice id",
        ));
    }
    if token.is_empty() {
        return Err(Error::invalid("lease_token", "must not be empty"));
    }
    let parsed: LeaseToken = token
        .parse()
        .map_err(|e| Error::invalid("lease_token", format!("{e}")))?;
    if parsed.invoice_id != invoice_id {
        return Err(Error::invalid(
            "lease_token",
            format!(
                "belongs to invoice {}, not to invoice {invoice_id}",
                parsed.invoice_id
            ),
        ));
    }
    Ok(parsed)
}

/// An external id to look an invoice up by.
pub fn external_id(value: String) -> Result<String> {
    id_like("external_id", &value)?;
    Ok(value)
}

/// Validates one submitted invoice; `at` is its index in the batch.
pub fn new_invoice(at: usize, invoice: proto::NewInvoice) -> Result<NewInvoice> {
    let field = |name: &str| format!("invoices[{at}].{name}");
    id_like(&field("external_id"), &invoice.external_id)?;
    id_like(&field("customer_id"), &invoice.customer_id)?;
    let queue = if invoice.queue.is_empty() {
        DEFAULT_QUEUE.to_owned()
    } else {
        queue_name(&field("queue"), &invoice.queue)?
    };
    if invoice.amount_minor < 0 {
        return Err(Error::invalid(
            field("amount_minor"),
            "must not be negative",
        ));
    }
    if invoice.currency.len() != 3 || !invoice.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Error::invalid(
            field("currency"),
            "must be an ISO 4217 code: three upper-case letters such as \"EUR\"",
        ));
    }
    if !(0..=MAX_PRIORITY).contains(&invoice.priority) {
        return Err(Error::invalid(
            field("priority"),
            format!("must be between 0 and {MAX_PRIORITY}"),
        ));
    }
    let max_attempts = match invoice.max_attempts {
        0 => None,
        n if (1..=MAX_ATTEMPTS).contains(&n) => Some(n),
        _ => {
            return Err(Error::invalid(
                field("max_attempts"),
                format!("must be 0 (the server's default) or between 1 and {MAX_ATTEMPTS}"),
            ));
        }
    };
    let metadata = metadata(&field("metadata"), invoice.metadata)?;
    let serialization_key = if invoice.serialization_key.is_empty() {
        None
    } else {
        id_like(&field("serialization_key"), &invoice.serialization_key)?;
        Some(invoice.serialization_key)
    };
    Ok(NewInvoice {
        external_id: invoice.external_id,
        queue,
        customer_id: invoice.customer_id,
        amount_minor: invoice.amount_minor,
        currency: invoice.currency,
        available_at: timestamp(&field("available_at"), invoice.available_at)?,
        priority: invoice.priority as i16,
        max_attempts,
        metadata,
        serialization_key,
    })
}

fn metadata(
    field: &str,
    metadata: std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    if metadata.len() > MAX_METADATA_KEYS {
        return Err(Error::invalid(
            field,
            format!(
                "has {} keys; at most {MAX_METADATA_KEYS} are allowed",
                metadata.len()
            ),
        ));
    }
    let mut total = 0;
    for (key, value) in &metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY_BYTES {
            return Err(Error::invalid(
                field,
                format!("keys must be 1 to {MAX_METADATA_KEY_BYTES} bytes"),
            ));
        }
        // PostgreSQL text cannot hold NUL.
        if key.contains('\0') || value.contains('\0') {
            return Err(Error::invalid(field, "must not contain NUL characters"));
        }
        total += key.len() + value.len();
    }
    if total > MAX_METADATA_BYTES {
        return Err(Error::invalid(
            field,
            format!("holds {total} bytes; at most {MAX_METADATA_BYTES} are allowed"),
        ));
    }
    Ok(metadata.into_iter().collect())
}

/// Validates a claim's shape; the coordinator checks the server's bounds.
pub fn claim_request(request: proto::ClaimInvoicesRequest) -> Result<ClaimRequest> {
    id_like("worker_id", &request.worker_id)?;
    if !(1..=1000).contains(&request.max_count) {
        return Err(Error::invalid("max_count", "must be between 1 and 1000"));
    }
    let queues = request
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| queue_name(&format!("queues[{i}]"), q))
        .collect::<Result<Vec<_>>>()?;
    Ok(ClaimRequest {
        worker_id: request.worker_id,
        max_count: request.max_count as u32,
        lease_duration: duration("lease_duration", request.lease_duration)?,
        queues,
        wait: duration("wait", request.wait)?.unwrap_or_default(),
    })
}

/// A queue name that may be empty (meaning "any").
pub fn optional_queue(field: &str, value: String) -> Result<Option<String>> {
    if value.is_empty() {
        Ok(None)
    } else {
        queue_name(field, &value).map(Some)
    }
}

/// An optional id-like field (customer id and the like).
pub fn optional_id(field: &str, value: String) -> Result<Option<String>> {
    if value.is_empty() {
        return Ok(None);
    }
    id_like(field, &value)?;
    Ok(Some(value))
}

/// The most items of a page, and the default.
const MAX_PAGE: i32 = 1000;
const DEFAULT_PAGE: u32 = 100;
const PAGE_TOKEN_PREFIX: &str = "after:";

/// A page request from its size and token.
pub fn page(size: i32, token: &str) -> Result<PageRequest> {
    let size = match size {
        0 => DEFAULT_PAGE,
        n if (1..=MAX_PAGE).contains(&n) => n as u32,
        _ => {
            return Err(Error::invalid(
                "page_size",
                format!("must be between 1 and {MAX_PAGE}, or 0 for {DEFAULT_PAGE}"),
            ));
        }
    };
    let after = if token.is_empty() {
        0
    } else {
        token
            .strip_prefix(PAGE_TOKEN_PREFIX)
            .and_then(|id| id.parse::<i64>().ok())
            .filter(|id| *id >= 0)
            .ok_or_else(|| Error::invalid("page_token", "is not a token from a previous page"))?
    };
    Ok(PageRequest { after, size })
}

/// The token of the page after one that ended at `last`, if it was full.
pub fn next_page_token(page: PageRequest, returned: usize, last: Option<i64>) -> String {
    match last {
        Some(last) if returned as u32 >= page.size => format!("{PAGE_TOKEN_PREFIX}{last}"),
        _ => String::new(),
    }
}

/// The state a filter names.
pub fn state_filter(at: usize, state: i32) -> Result<InvoiceState> {
    match proto::InvoiceState::try_from(state) {
        Ok(proto::InvoiceState::Pending) => Ok(InvoiceState::Pending),
        Ok(proto::InvoiceState::Leased) => Ok(InvoiceState::Leased),
        Ok(proto::InvoiceState::Completed) => Ok(InvoiceState::Completed),
        Ok(proto::InvoiceState::Failed) => Ok(InvoiceState::Failed),
        Ok(proto::InvoiceState::Cancelled) => Ok(InvoiceState::Cancelled),
        Ok(proto::InvoiceState::Unspecified) | Err(_) => Err(Error::invalid(
            format!("states[{at}]"),
            "must be a known state other than INVOICE_STATE_UNSPECIFIED",
        )),
    }
}

/// Which invoices an operator action applies to: ids, or a filter, not both.
pub fn selection(
    ids: Vec<i64>,
    queue: String,
    failed_since: Option<prost_types::Timestamp>,
    customer_id: String,
) -> Result<Selection> {
    let queue = optional_queue("queue", queue)?;
    let failed_since = timestamp("failed_since", failed_since)?;
    let customer_id = optional_id("customer_id", customer_id)?;
    let filtered = queue.is_some() || failed_since.is_some() || customer_id.is_some();
    if ids.is_empty() {
        return Ok(Selection::Filter {
            queue,
            failed_since,
            customer_id,
        });
    }
    if filtered {
        return Err(Error::invalid(
            "invoice_ids",
            "select by ids or by a filter, not both",
        ));
    }
    if let Some(at) = ids.iter().position(|id| *id <= 0) {
        return Err(Error::invalid(
            format!("invoice_ids[{at}]"),
            "must be a positive invoice id",
        ));
    }
    Ok(Selection::Ids(ids))
}

/// An audit event as the API shows it.
pub fn to_event(event: InvoiceEvent) -> proto::InvoiceEvent {
    use proto::InvoiceEventKind as K;
    let kind = match event.kind {
        EventKind::Submitted => K::Submitted,
        EventKind::Claimed => K::Claimed,
        EventKind::Extended => K::Extended,
        EventKind::Released => K::Released,
        EventKind::Expired => K::Expired,
        EventKind::Completed => K::Completed,
        EventKind::LeaseLost => K::LeaseLost,
        EventKind::Failed => K::Failed,
        EventKind::Redriven => K::Redriven,
        EventKind::CancelRequested => K::CancelRequested,
        EventKind::Cancelled => K::Cancelled,
    };
    proto::InvoiceEvent {
        event_id: event.id,
        invoice_id: event.invoice_id,
        at: Some(to_timestamp(event.at)),
        kind: kind.into(),
        worker_id: event.worker_id.unwrap_or_default(),
        attempt: event.attempt.unwrap_or_default(),
        lease_token: event.token.map(|t| t.to_string()).unwrap_or_default(),
        detail: event.detail.unwrap_or_default(),
    }
}

/// A queue's statistics as the API shows them.
pub fn to_queue_stats(stats: QueueStats) -> proto::QueueStats {
    proto::QueueStats {
        queue: stats.config.queue,
        weight: stats.config.weight,
        serialize_by_customer: stats.config.serialize_by_customer,
        available: stats.available,
        scheduled: stats.scheduled,
        leased: stats.leased,
        expired_leases: stats.expired_leases,
        completed: stats.completed,
        failed: stats.failed,
        cancelled: stats.cancelled,
        oldest_available_age: Some(prost_types::Duration {
            seconds: stats.oldest_available_age.as_secs() as i64,
            nanos: stats.oldest_available_age.subsec_nanos() as i32,
        }),
    }
}

/// Validates an optional provider reference.
pub fn provider_reference(value: String) -> Result<Option<String>> {
    if value.is_empty() {
        return Ok(None);
    }
    id_like("provider_reference", &value)?;
    Ok(Some(value))
}

/// Validates a release's reason, error and delay.
pub fn release(request: &proto::ReleaseClaimRequest) -> Result<Release> {
    let retry_after = duration("retry_after", request.retry_after)?;
    match proto::ReleaseReason::try_from(request.reason) {
        Ok(proto::ReleaseReason::Failed) => {
            if request.error.len() > MAX_ERROR_BYTES {
                return Err(Error::invalid(
                    "error",
                    format!(
                        "is {} bytes long; at most {MAX_ERROR_BYTES} are allowed",
                        request.error.len()
                    ),
                ));
            }
            if request.error.contains('\0') {
                return Err(Error::invalid("error", "must not contain NUL characters"));
            }
            Ok(Release::Failed {
                error: (!request.error.is_empty()).then(|| request.error.clone()),
                retry_after,
            })
        }
        Ok(proto::ReleaseReason::Shutdown) => {
            if retry_after.is_some() {
                return Err(Error::invalid(
                    "retry_after",
                    "is only allowed with reason FAILED",
                ));
            }
            if !request.error.is_empty() {
                return Err(Error::invalid(
                    "error",
                    "is only allowed with reason FAILED",
                ));
            }
            Ok(Release::Shutdown)
        }
        Ok(proto::ReleaseReason::Unspecified) | Err(_) => Err(Error::invalid(
            "reason",
            "must be RELEASE_REASON_FAILED or RELEASE_REASON_SHUTDOWN",
        )),
    }
}

/// A timestamp as protobuf sends it.
pub fn to_timestamp(at: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// The API's name for a state.
pub fn to_state(state: InvoiceState) -> proto::InvoiceState {
    match state {
        InvoiceState::Pending => proto::InvoiceState::Pending,
        InvoiceState::Leased => proto::InvoiceState::Leased,
        InvoiceState::Completed => proto::InvoiceState::Completed,
        InvoiceState::Failed => proto::InvoiceState::Failed,
        InvoiceState::Cancelled => proto::InvoiceState::Cancelled,
    }
}

/// An invoice as the API shows it.
pub fn to_invoice(invoice: Invoice) -> proto::Invoice {
    proto::Invoice {
        invoice_id: invoice.id,
        external_id: invoice.external_id,
        queue: invoice.queue,
        customer_id: invoice.customer_id,
        amount_minor: invoice.amount_minor,
        currency: invoice.currency,
        priority: i32::from(invoice.priority),
        metadata: invoice.metadata.into_iter().collect(),
        state: to_state(invoice.state).into(),
        available_at: Some(to_timestamp(invoice.available_at)),
        attempts: invoice.attempts,
        max_attempts: invoice.max_attempts,
        lease: invoice.lease.map(|lease| proto::Lease {
            worker_id: lease.worker_id,
            leased_at: Some(to_timestamp(lease.leased_at)),
            expires_at: Some(to_timestamp(lease.expires_at)),
            expired: lease.expired,
        }),
        last_error: invoice.last_error.unwrap_or_default(),
        provider_reference: invoice.provider_reference.unwrap_or_default(),
        completed_at: invoice.completed_at.map(to_timestamp),
        completed_by: invoice.completed_by.unwrap_or_default(),
        idempotency_key: invoice.idempotency_key,
        created_at: Some(to_timestamp(invoice.created_at)),
        updated_at: Some(to_timestamp(invoice.updated_at)),
        serialization_key: invoice.serialization_key.unwrap_or_default(),
        cancel_requested: invoice.cancel_requested,
        finished_at: invoice.finished_at.map(to_timestamp),
    }
}

/// A claimed invoice as the API shows it.
pub fn to_claimed(claimed: ClaimedInvoice) -> proto::ClaimedInvoice {
    let expires_at = claimed
        .invoice
        .lease
        .as_ref()
        .map(|l| to_timestamp(l.expires_at));
    proto::ClaimedInvoice {
        lease_token: claimed.token.to_string(),
        lease_expires_at: expires_at,
        attempt: claimed.invoice.attempts,
        idempotency_key: claimed.invoice.idempotency_key.clone(),
        hold_deadline: Some(to_timestamp(claimed.hold_deadline)),
        invoice: Some(to_invoice(claimed.invoice)),
    }
}
