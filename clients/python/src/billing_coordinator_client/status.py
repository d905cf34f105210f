"""How the service's errors read to a worker.

billing-coordinator refuses a write made with a lease that is no longer live
with FAILED_PRECONDITION and a ``google.rpc.ErrorInfo`` whose reason is
``LEASE_LOST``. Transport and database trouble is UNAVAILABLE, ABORTED or,
seen from the client, DEADLINE_EXCEEDED: completing, releasing and extending
with the same token are safe to retry after any of them.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "billing-coordinator"
REASON_LEASE_LOST = "LEASE_LOST"

# A completion, release or extension that failed with one of these may have
# taken effect or not; retrying with the same token is safe either way.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
)


def error_reason(error: grpc.RpcError) -> str | None:
    """The ``ErrorInfo`` reason the service attached to `error`, if any."""
    if not isinstance(error, grpc.Call):
        return None
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        # The details disagree with the call's own status: not ours to trust.
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                return info.reason
    return None


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    """The status code of `error`; UNKNOWN when it carries none."""
    code = error.code() if isinstance(error, grpc.Call) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def is_lease_lost(error: grpc.RpcError) -> bool:
    """True when the service says the lease is no longer live."""
    return (
        code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
        and error_reason(error) == REASON_LEASE_LOST
    )


def is_retryable(error: grpc.RpcError) -> bool:
    """True for failures after which the same call may simply be sent again."""
    return code_of(error) in RETRYABLE_CODES
