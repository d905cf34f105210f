//! The crate's error type, shaped by what a caller can do about it.
//!
//! The store classifies database errors into these kinds in one place
//! (`store::classify`), and `grpc::status` maps each kind to a gRPC status in
//! one exhaustive match, so a new kind forces a decision there.

use crate::lease::InvoiceId;

/// Anything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed or out of range. Nothing was changed.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The request field at fault, as named in the proto (`invoices[3].currency`).
        field: String,
        /// What is wrong with it.
        message: String,
    },

    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),

    /// The lease token is not the invoice's live lease any more: another worker
    /// claimed it since, or its holder gave it back. The caller must stop.
    #[error("lease lost on invoice {invoice_id}: {detail}")]
    LeaseLost {
        /// The invoice whose lease was lost.
        invoice_id: InvoiceId,
        /// The state the invoice is in now, as the API names it.
        state: &'static str,
        /// What happened to the lease.
        detail: String,
    },

    /// An invoice with this external id exists with different content.
    #[error("external_id {external_id:?} already exists with a different {differing_field}")]
    ExternalIdConflict {
        /// The external id submitted again.
        external_id: String,
        /// The first field whose value differs.
        differing_field: &'static str,
    },

    /// The database cannot be reached, or the server is shutting down.
    #[error("{message}")]
    Unavailable {
        /// What the caller is told.
        message: &'static str,
        /// The cause, logged where the error is mapped.
        #[source]
        source: Option<BoxError>,
    },

    /// A transaction kept conflicting (serialization failure or deadlock)
    /// after the retries made inside the service.
    #[error("transaction kept conflicting with concurrent ones")]
    Aborted(#[source] BoxError),

    /// A bug: nothing about the request is wrong.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// A boxed error cause, so that storage error types stay inside the store.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error for each caller whose request shared the statement
    /// that failed: kind and message kept, the cause reduced to its text.
    pub fn for_each_caller(&self) -> Self {
        let text = |cause: &BoxError| -> BoxError { cause.to_string().into() };
        match self {
            Self::InvalidArgument { field, message } => Self::invalid(field, message),
            Self::NotFound(what) => Self::NotFound(what.clone()),
            Self::LeaseLost {
                invoice_id,
                state,
                detail,
            } => Self::LeaseLost {
                invoice_id: *invoice_id,
                state,
                detail: detail.clone(),
            },
            Self::ExternalIdConflict {
                external_id,
                differing_field,
            } => Self::ExternalIdConflict {
                external_id: external_id.clone(),
                differing_field,
            },
            Self::Unavailable { message, source } => Self::Unavailable {
                message,
                source: source.as_ref().map(text),
            },
            Self::Aborted(cause) => Self::Aborted(text(cause)),
            Self::Internal(cause) => Self::Internal(text(cause)),
        }
    }

    /// An [`Error::Internal`] from any message, for broken invariants.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal(message.into().into())
    }
}
