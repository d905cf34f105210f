//! How an invoice row is read, shared by every statement that returns one.

use std::collections::BTreeMap;

use sqlx::types::Json;

use crate::{
    error::{Error, Result},
    lease::{Invoice, InvoiceState, Lease, LeaseToken, Timestamp},
};

/// An `invoices` row as `invoice_columns!()` selects it.
#[derive(Clone, sqlx::FromRow)]
pub(super) struct InvoiceRow {
    pub id: i64,
    pub external_id: String,
    pub queue: String,
    pub customer_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub priority: i16,
    pub metadata: Json<BTreeMap<String, String>>,
    pub idempotency_key: String,
    pub state: String,
    pub available_at: Timestamp,
    pub attempts: i32,
    pub max_attempts: i32,
    pub lease_epoch: i32,
    pub lease_nonce: Option<i64>,
    pub leased_by: Option<String>,
    pub leased_at: Option<Timestamp>,
    pub lease_expires_at: Option<Timestamp>,
    pub lease_expired: Option<bool>,
    pub lease_released: bool,
    pub last_error: Option<String>,
    pub provider_reference: Option<String>,
    pub completed_at: Option<Timestamp>,
    pub completed_by: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub serialization_key: Option<String>,
    pub cancel_requested: bool,
    pub finished_at: Option<Timestamp>,
}

impl InvoiceRow {
    pub fn state(&self) -> Result<InvoiceState> {
        InvoiceState::from_db(&self.state)
            .ok_or_else(|| Error::internal(format!("unknown invoice state {:?}", self.state)))
    }

    /// The token of the row's latest lease, if it ever had one.
    pub fn latest_token(&self) -> Option<LeaseToken> {
        self.lease_nonce.map(|nonce| LeaseToken {
            invoice_id: self.id,
            epoch: self.lease_epoch,
            nonce,
        })
    }

    pub fn into_invoice(self) -> Result<Invoice> {
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
            serialization_key: self.serialization_key,
            cancel_requested: self.cancel_requested,
            finished_at: self.finished_at,
        })
    }
}
