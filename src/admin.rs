//! What operators ask for and are told: filters, pages, queue settings and
//! statistics, and the audit trail.

use std::time::Duration;

use crate::lease::{InvoiceId, InvoiceState, LeaseToken, Timestamp};

/// Which invoices to list.
#[derive(Clone, Debug, Default)]
pub struct InvoiceFilter {
    /// Only these states; empty means all.
    pub states: Vec<InvoiceState>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this customer.
    pub customer_id: Option<String>,
}

/// One page of a listing ordered by id.
#[derive(Clone, Copy, Debug)]
pub struct PageRequest {
    /// Items with ids above this one.
    pub after: i64,
    /// At most this many.
    pub size: u32,
}

/// Which invoices an operator action applies to.
#[derive(Clone, Debug)]
pub enum Selection {
    /// These ids, all of which must exist.
    Ids(Vec<InvoiceId>),
    /// Everything matching.
    Filter {
        /// Only this queue.
        queue: Option<String>,
        /// Redrive: failed at or after this. Cancel: only this customer.
        failed_since: Option<Timestamp>,
        /// Cancel: only this customer.
        customer_id: Option<String>,
    },
}

/// What a redrive did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redriven {
    /// Failed invoices made pending.
    pub retried: u64,
    /// Selected by id but not failed.
    pub skipped: Vec<InvoiceId>,
}

/// What a cancellation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cancelled {
    /// Pending or failed invoices now cancelled.
    pub cancelled: u64,
    /// Leased invoices now marked cancel-requested.
    pub cancel_requested: u64,
    /// Selected by id but already finished.
    pub skipped: Vec<InvoiceId>,
}

/// A queue's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue name.
    pub queue: String,
    /// Share of claims relative to other queues.
    pub weight: i32,
    /// New invoices get their customer id as serialization key.
    pub serialize_by_customer: bool,
}

/// A change to a queue's settings; `None` keeps the current value.
#[derive(Clone, Debug)]
pub struct QueueChange {
    /// Queue name.
    pub queue: String,
    /// New weight.
    pub weight: Option<i32>,
    /// New serialization setting.
    pub serialize_by_customer: Option<bool>,
}

/// One queue's settings and contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStats {
    /// Settings.
    pub config: QueueConfig,
    /// Pending and claimable now.
    pub available: i64,
    /// Pending, claimable later.
    pub scheduled: i64,
    /// Leased, before expiry.
    pub leased: i64,
    /// Leased, past expiry, not yet taken back.
    pub expired_leases: i64,
    /// Completed.
    pub completed: i64,
    /// Failed (dead letters).
    pub failed: i64,
    /// Cancelled.
    pub cancelled: i64,
    /// How long the oldest available invoice has been claimable.
    pub oldest_available_age: Duration,
}

/// What happened to an invoice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Submitted.
    Submitted,
    /// Leased to a worker.
    Claimed,
    /// Heartbeat.
    Extended,
    /// Given back by its holder.
    Released,
    /// Taken back after its lease ran out.
    Expired,
    /// Billed.
    Completed,
    /// A write with a stale token was refused.
    LeaseLost,
    /// Dead-lettered.
    Failed,
    /// Redriven by an operator.
    Redriven,
    /// Cancellation asked while leased.
    CancelRequested,
    /// Cancelled.
    Cancelled,
}

impl EventKind {
    /// The name stored in the database.
    pub fn as_db(self) -> &'static str {
        match self {
            Self::Submitted => "submitted",
            Self::Claimed => "claimed",
            Self::Extended => "extended",
            Self::Released => "released",
            Self::Expired => "expired",
            Self::Completed => "completed",
            Self::LeaseLost => "lease_lost",
            Self::Failed => "failed",
            Self::Redriven => "redriven",
            Self::CancelRequested => "cancel_requested",
            Self::Cancelled => "cancelled",
        }
    }

    /// The kind named `s` in the database, if any.
    pub fn from_db(s: &str) -> Option<Self> {
        Some(match s {
            "submitted" => Self::Submitted,
            "claimed" => Self::Claimed,
            "extended" => Self::Extended,
            "released" => Self::Released,
            "expired" => Self::Expired,
            "completed" => Self::Completed,
            "lease_lost" => Self::LeaseLost,
            "failed" => Self::Failed,
            "redriven" => Self::Redriven,
            "cancel_requested" => Self::CancelRequested,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// One entry of an invoice's audit trail.
#[derive(Clone, Debug, PartialEq)]
pub struct InvoiceEvent {
    /// Position in the trail.
    pub id: i64,
    /// The invoice.
    pub invoice_id: InvoiceId,
    /// When, by the database's clock.
    pub at: Timestamp,
    /// What.
    pub kind: EventKind,
    /// The worker concerned.
    pub worker_id: Option<String>,
    /// The attempt concerned.
    pub attempt: Option<i32>,
    /// The lease concerned.
    pub token: Option<LeaseToken>,
    /// Error, new expiry, reason.
    pub detail: Option<String>,
}
