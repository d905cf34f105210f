//! The one mapping from [`Error`] to a gRPC status.
//!
//! Exhaustive on purpose: a new error kind must be given a code here. Causes
//! are logged once, here; callers only see messages written for them.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// The `google.rpc.ErrorInfo` domain of every reason this service gives.
pub const ERROR_DOMAIN: &str = "billing-coordinator";

/// `ErrorInfo.reason` for a token that is not the invoice's live lease.
pub const REASON_LEASE_LOST: &str = "LEASE_LOST";
/// `ErrorInfo.reason` for a resubmission whose content differs.
pub const REASON_EXTERNAL_ID_CONFLICT: &str = "EXTERNAL_ID_CONFLICT";

/// The gRPC code of `error`, without logging anything.
pub fn code(error: &Error) -> Code {
    match error {
        Error::InvalidArgument { .. } => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::LeaseLost { .. } => Code::FailedPrecondition,
        Error::ExternalIdConflict { .. } => Code::AlreadyExists,
        Error::Unavailable { .. } => Code::Unavailable,
        Error::Aborted(_) => Code::Aborted,
        Error::Internal(_) => Code::Internal,
    }
}

/// The code, machine-readable reason and message of `error`, as a batch
/// outcome reports them. Logs the cause of server-side failures: call it
/// once per error.
pub fn describe(error: &Error) -> (Code, &'static str, String) {
    match error {
        Error::InvalidArgument { .. } => (Code::InvalidArgument, "", error.to_string()),
        Error::NotFound(_) => (Code::NotFound, "", error.to_string()),
        Error::LeaseLost { .. } => (
            Code::FailedPrecondition,
            REASON_LEASE_LOST,
            error.to_string(),
        ),
        Error::ExternalIdConflict { .. } => (
            Code::AlreadyExists,
            REASON_EXTERNAL_ID_CONFLICT,
            error.to_string(),
        ),
        Error::Unavailable { source, .. } => {
            if let Some(cause) = source {
                tracing::warn!(error = %cause, "answering UNAVAILABLE");
            }
            (Code::Unavailable, "", error.to_string())
        }
        Error::Aborted(cause) => {
            tracing::warn!(error = %cause, "answering ABORTED");
            (Code::Aborted, "", error.to_string())
        }
        Error::Internal(cause) => {
            tracing::error!(error = %cause, "answering INTERNAL");
            (Code::Internal, "", error.to_string())
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let (code, reason, message) = describe(&error);
        let details = match &error {
            Error::InvalidArgument { field, message } => {
                ErrorDetails::with_bad_request_violation(field.clone(), message.clone())
            }
            Error::LeaseLost {
                invoice_id, state, ..
            } => ErrorDetails::with_error_info(
                reason,
                ERROR_DOMAIN,
                [
                    ("invoice_id".to_owned(), invoice_id.to_string()),
                    ("state".to_owned(), (*state).to_owned()),
                ],
            ),
            Error::ExternalIdConflict {
                external_id,
                differing_field,
            } => ErrorDetails::with_error_info(
                reason,
                ERROR_DOMAIN,
                [
                    ("external_id".to_owned(), external_id.clone()),
                    ("field".to_owned(), (*differing_field).to_owned()),
                ],
            ),
            Error::NotFound(_)
            | Error::Unavailable { .. }
            | Error::Aborted(_)
            | Error::Internal(_) => return Status::new(code, message),
        };
        Status::with_error_details(code, message, details)
    }
}
