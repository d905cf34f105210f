"""A worker library for billing-coordinator.

:class:`Worker` runs the claim loop the service's lease contract asks for;
your handler only bills one invoice. The generated stubs are here too, as
``billing_coordinator_client.pb`` (messages) and ``billing_coordinator_client.pb_grpc``
(``CoordinatorServiceStub``), for calls the worker does not make.
"""

from ._proto import coordinator_pb2 as pb
from ._proto import coordinator_pb2_grpc as pb_grpc
from .status import ERROR_DOMAIN, REASON_LEASE_LOST, is_lease_lost, is_retryable
from .worker import (
    BillingFailed,
    Handler,
    Lease,
    StopReason,
    Worker,
    WorkerStats,
    WorkStopped,
    default_worker_id,
)

__all__ = [
    "ERROR_DOMAIN",
    "REASON_LEASE_LOST",
    "BillingFailed",
    "Handler",
    "Lease",
    "StopReason",
    "Worker",
    "WorkerStats",
    "WorkStopped",
    "default_worker_id",
    "is_lease_lost",
    "is_retryable",
    "pb",
    "pb_grpc",
]
