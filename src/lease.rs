//! The lease contract and the domain types it speaks of.
//!
//! ```text
//!             submit                 claim (epoch += 1, attempts += 1)
//!   (none) ──────────▶ PENDING ─────────────────────────────────▶ LEASED
//!                        ▲  ▲                                    │ │ │ │
//!                        │  │  release SHUTDOWN (attempt undone) │ │ │ │
//!                        │  └────────────────────────────────────┘ │ │ │
//!                        │     release FAILED / lease expired      │ │ │
//!                        └──── (attempts < max_attempts, after backoff)┘ │
//!                                                                    │ │
//!          FAILED ◀──── release FAILED / lease expired ──────────────┘ │
//!       (dead letter)   (attempts = max_attempts)                      │
//!            │  RetryInvoices: back to PENDING, fresh budget            │
//!                                                                      │
//!        COMPLETED ◀──── complete (fenced by the token) ───────────────┘
//!
//!   CANCELLED ◀── CancelInvoices on PENDING or FAILED; on LEASED it sets
//!                 cancel_requested, and the lease's end (release, expiry)
//!                 leads to CANCELLED instead of PENDING or FAILED.
//! ```
//!
//! Two edges the diagram leaves out, both deliberate: the holder of a lease
//! that expired may still complete while nobody has claimed since (from
//! PENDING, FAILED, or a cancel request), and a completion always wins over
//! a cancellation: in both cases the charge was made, and refusing to record
//! it would lose track of it or cause a second.
//!
//! **Hard deadline.** Heartbeats (`extend`) keep a lease alive, but never
//! past `leased_at + max_hold`: a worker whose heartbeat thread outlives a
//! hung billing call cannot hold an invoice forever.
//!
//! **Backoff.** A counted failure (a FAILED release without `retry_after`, or
//! an expiry) makes the invoice claimable again after `base * 2^(attempt-1)`,
//! capped, with "equal jitter": between half and all of that.
//!
//! **Serialization.** Invoices sharing a `serialization_key` are never
//! leased at the same time: a unique index over leased rows enforces it, and
//! claims skip keys that are busy.
//!
//! **Tokens.** Every claim bumps the invoice's `lease_epoch` and draws a fresh
//! random nonce; the worker's [`LeaseToken`] is (invoice, epoch, nonce). Every
//! write a worker makes (complete, release, extend) names its token and
//! changes the row only if the token is still the invoice's latest lease, in
//! the same `UPDATE ... WHERE` that makes the change. There is no check-then-
//! act window.
//!
//! **Trust window.** A lease is exclusive until `lease_expires_at`, by the
//! database's clock (the only clock). After that the rescuer takes expired
//! leases back (counting the attempt), and the invoice can be claimed again.
//!
//! **Which writes are fenced by what.**
//! - `complete` succeeds while the token's epoch is still the latest and the
//!   lease was not released, *even after expiry*: if nobody else has claimed
//!   the invoice, the charge was made and refusing it would cause a second.
//!   Once another claim bumps the epoch, the old token gets `LEASE_LOST`.
//! - `extend` and `release` need the lease to be live (state LEASED, same
//!   token); once the rescuer has taken the lease back they get `LEASE_LOST`.
//! - Retrying any of them with the same token after it succeeded is answered
//!   as a success again, because a client's timeout can hide a success.
//!
//! **Why the billing provider still needs the idempotency key.** A worker that
//! stalls past its lease may charge after another worker was given the
//! invoice. The fence guarantees only one of them *completes*; the stable
//! per-invoice idempotency key lets the provider absorb the second charge.

use std::{collections::BTreeMap, fmt, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};

/// The coordinator's id for an invoice.
pub type InvoiceId = i64;

/// A point in time by the database's clock.
pub type Timestamp = DateTime<Utc>;

/// Invoice priorities, first to last (the schema's `priority_in_range`).
pub const PRIORITIES: std::ops::RangeInclusive<i16> = 0..=9;

/// The fencing token of one lease: which invoice, which of its leases, and a
/// random nonce so a token cannot be guessed from the epoch alone.
///
/// Workers see it as an opaque string (`v1.<invoice>.<epoch>.<nonce hex>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseToken {
    /// The invoice the lease is on.
    pub invoice_id: InvoiceId,
    /// How many leases the invoice had been granted when this one was.
    pub epoch: i32,
    /// Random, drawn by the database with the lease.
    pub nonce: i64,
}

const TOKEN_VERSION: &str = "v1";

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOKEN_VERSION}.{}.{}.{:016x}",
            self.invoice_id, self.epoch, self.nonce as u64
        )
    }
}

/// Why a string is not a lease token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("is not a lease token issued by this service")]
pub struct MalformedToken;

impl FromStr for LeaseToken {
    type Err = MalformedToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('.');
        let (Some(TOKEN_VERSION), Some(id), Some(epoch), Some(nonce), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(MalformedToken);
        };
        let invoice_id: InvoiceId = id.parse().map_err(|_| MalformedToken)?;
        let epoch: i32 = epoch.parse().map_err(|_| MalformedToken)?;
        if invoice_id <= 0 || epoch <= 0 || nonce.len() != 16 {
            return Err(MalformedToken);
        }
        let nonce = u64::from_str_radix(nonce, 16).map_err(|_| MalformedToken)? as i64;
        Ok(Self {
            invoice_id,
            epoch,
            nonce,
        })
    }
}

/// Where an invoice is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvoiceState {
    /// Waiting; claimable once `available_at` has passed.
    Pending,
    /// A worker holds a lease (possibly expired, not yet taken back).
    Leased,
    /// Billed. Final.
    Completed,
    /// Dead letter: the attempt budget is spent.
    Failed,
    /// Cancelled by an operator. Final.
    Cancelled,
}

impl InvoiceState {
    /// The name stored in the database.
    pub fn as_db(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Leased => "leased",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state named `s` in the database, if any.
    pub fn from_db(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "leased" => Self::Leased,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    /// The name the API uses, for error details.
    pub fn api_name(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Leased => "LEASED",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }
}

/// An invoice as an upstream system submits it, already validated.
#[derive(Clone, Debug, PartialEq)]
pub struct NewInvoice {
    /// The upstream system's unique id.
    pub external_id: String,
    /// Queue (tenant) name.
    pub queue: String,
    /// The customer to charge.
    pub customer_id: String,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// When billing may start; `None` means now.
    pub available_at: Option<Timestamp>,
    /// 0 (first) to 9 (last).
    pub priority: i16,
    /// Attempt budget; `None` means the server's default.
    pub max_attempts: Option<i32>,
    /// Opaque data for the worker.
    pub metadata: BTreeMap<String, String>,
    /// Never leased at the same time as another invoice with this key;
    /// `None` means the queue's default.
    pub serialization_key: Option<String>,
}

/// An invoice and where it is in its life.
#[derive(Clone, Debug, PartialEq)]
pub struct Invoice {
    /// The coordinator's id.
    pub id: InvoiceId,
    /// The upstream system's id.
    pub external_id: String,
    /// Queue (tenant) name.
    pub queue: String,
    /// The customer to charge.
    pub customer_id: String,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// 0 (first) to 9 (last).
    pub priority: i16,
    /// Opaque data for the worker.
    pub metadata: BTreeMap<String, String>,
    /// Where it is in its life.
    pub state: InvoiceState,
    /// When it may next be claimed, or was last made available.
    pub available_at: Timestamp,
    /// Attempts counted so far.
    pub attempts: i32,
    /// The attempt budget.
    pub max_attempts: i32,
    /// The live lease, while leased.
    pub lease: Option<Lease>,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// The provider's reference, once completed.
    pub provider_reference: Option<String>,
    /// When it was completed.
    pub completed_at: Option<Timestamp>,
    /// The worker whose lease completed it.
    pub completed_by: Option<String>,
    /// The key for the billing provider, stable across attempts.
    pub idempotency_key: String,
    /// When it was submitted.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// Never leased at the same time as another invoice with this key.
    pub serialization_key: Option<String>,
    /// An operator asked to cancel it while leased.
    pub cancel_requested: bool,
    /// When it became completed, failed or cancelled.
    pub finished_at: Option<Timestamp>,
}

/// The lease on a leased invoice.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    /// Who holds it.
    pub worker_id: String,
    /// When it was granted.
    pub leased_at: Timestamp,
    /// When it runs out unless extended.
    pub expires_at: Timestamp,
    /// Past its expiry but not yet taken back by the rescuer.
    pub expired: bool,
}

/// An invoice just leased to a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedInvoice {
    /// The invoice, as it is now (state LEASED).
    pub invoice: Invoice,
    /// The fencing token of the new lease.
    pub token: LeaseToken,
    /// The lease can never be extended past this.
    pub hold_deadline: Timestamp,
}

/// What a claim asks for, validated.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    /// Who is claiming.
    pub worker_id: String,
    /// At most this many invoices (1..=1000).
    pub max_count: u32,
    /// Lease length; `None` means the server's default.
    pub lease_duration: Option<Duration>,
    /// Only these queues; empty means all.
    pub queues: Vec<String>,
    /// Long-poll for this long when nothing is available.
    pub wait: Duration,
}

/// One completion a worker reports.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The lease being completed (it names the invoice).
    pub token: LeaseToken,
    /// The provider's reference for the charge.
    pub provider_reference: Option<String>,
}

/// The result of a successful completion.
#[derive(Clone, Debug)]
pub struct Completed {
    /// The invoice, now COMPLETED.
    pub invoice: Invoice,
    /// The invoice had already been completed with this token: a retry.
    pub already_completed: bool,
}

/// How a worker gives a lease back.
#[derive(Clone, Debug, PartialEq)]
pub enum Release {
    /// The attempt failed; it counts toward the budget.
    Failed {
        /// What went wrong, kept as `last_error`.
        error: Option<String>,
        /// The earliest the invoice may be claimed again.
        retry_after: Option<Duration>,
    },
    /// The worker is stopping before it tried; the attempt does not count.
    Shutdown,
}

/// A lease after a heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct Extended {
    /// The new expiry.
    pub expires_at: Timestamp,
    /// The lease can never be extended past this.
    pub hold_deadline: Timestamp,
    /// An operator asked to cancel the invoice.
    pub cancel_requested: bool,
}

/// How long a counted failure keeps an invoice back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failed attempt, doubled after each next one.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
}

/// The outcome of submitting one invoice.
#[derive(Clone, Debug, PartialEq)]
pub struct Submitted {
    /// The coordinator's id.
    pub invoice_id: InvoiceId,
    /// The upstream system's id.
    pub external_id: String,
    /// Created by this call, rather than found already there.
    pub created: bool,
    /// Its state now.
    pub state: InvoiceState,
}

/// How an invoice is named in a lookup.
#[derive(Clone, Debug)]
pub enum InvoiceRef {
    /// By the coordinator's id.
    Id(InvoiceId),
    /// By the upstream system's id.
    External(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_survives_its_string_form() {
        let token = LeaseToken {
            invoice_id: 42,
            epoch: 3,
            nonce: -7,
        };
        assert_eq!(token.to_string().parse::<LeaseToken>(), Ok(token));
    }

    #[test]
    fn strings_that_are_not_tokens_are_refused() {
        for s in [
            "",
            "v1",
            "v1.1.1",
            "v2.1.1.0000000000000001",
            "v1.0.1.0000000000000001",
            "v1.1.0.0000000000000001",
            "v1.-1.1.0000000000000001",
            "v1.1.1.1",
            "v1.1.1.000000000000000g",
            "v1.1.1.0000000000000001.extra",
        ] {
            assert_eq!(s.parse::<LeaseToken>(), Err(MalformedToken), "{s:?}");
        }
    }
}
