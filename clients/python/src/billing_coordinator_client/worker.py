"""The worker loop: claim, keep the leases alive while billing, then complete or release.

One :class:`Worker` runs the loop the service's lease contract asks for:

* It claims a batch with a long-poll (``wait``), so an idle worker makes one
  call every ``wait`` seconds instead of spinning.
* A heartbeat thread extends every lease it holds, from claim to settlement,
  every third of the lease duration. When the service answers ``LEASE_LOST``
  (or an operator asked to cancel the invoice), the lease's stop flag is set:
  the handler sees it through :meth:`Lease.check` or :meth:`Lease.wait` and
  should stop before charging if it still can.
* The handler's outcome settles the lease: a returned provider reference
  completes the invoice, :class:`BillingFailed` (or any other exception)
  releases it as failed, :class:`WorkStopped` after a cancellation releases
  it without counting the attempt. Completions and releases are retried on
  UNAVAILABLE, ABORTED and DEADLINE_EXCEEDED with the same token, which the
  service makes safe.
* :meth:`Worker.stop` (or SIGTERM, after :meth:`Worker.install_signal_handlers`)
  stops claiming, lets invoices already being billed finish, and releases the
  ones not yet started with reason SHUTDOWN, so they go to another worker at
  once and the attempt is not counted. A long-poll in flight gets two seconds
  to answer before it is cut short.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for_all
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import FrameType
from typing import Callable, Optional, Sequence, TypeVar, Union

import grpc
from google.protobuf import duration_pb2

from ._proto import coordinator_pb2 as pb
from ._proto import coordinator_pb2_grpc as pb_grpc
from .status import code_of, is_lease_lost, is_retryable

log = logging.getLogger("billing_coordinator_client")

# How often a blocked loop looks at the stop flag. The flag is a plain
# attribute so that a signal handler can set it without taking a lock.
POLL_INTERVAL = 0.1
# The service keeps at most this much of a release's error text.
MAX_ERROR_BYTES = 4096
# How long a claim in flight may still answer after stop(). A claim that
# found work answers within milliseconds, and its leases are then released;
# one still open after this is long-polling an empty queue, and cutting it
# short loses nothing (cancelling a claim the service has just granted would
# strand its leases until they expire).
CLAIM_STOP_GRACE = 2.0

Request = TypeVar("Request")
Response = TypeVar("Response")


class StopReason(enum.Enum):
    """Why a lease's work should stop."""

    #: The lease is not live any more: it expired and was taken back, or
    #: another worker holds the invoice. Do not charge; the invoice is theirs.
    LEASE_LOST = "lease_lost"
    #: An operator asked to cancel the invoice: stop before charging if you
    #: still can. If the charge was already made, return its reference anyway.
    CANCEL_REQUESTED = "cancel_requested"


class WorkStopped(Exception):
    """Raised by :meth:`Lease.check` when the work on a lease should stop."""

    def __init__(self, invoice_id: int, reason: StopReason) -> None:
        super().__init__(f"invoice {invoice_id}: {reason.value}")
        self.invoice_id = invoice_id
        self.reason = reason


class BillingFailed(Exception):
    """Raise from a handler when the charge failed and should be tried again.

    The lease is released with reason FAILED, which counts the attempt. The
    invoice becomes claimable again after `retry_after` seconds (a provider's
    Retry-After, say), or when unset after the service's backoff. Raise it too
    when the outcome is unknown (a timeout): the next attempt sends the same
    idempotency key, so the provider will not charge twice.
    """

    def __init__(self, error: str, retry_after: Optional[float] = None) -> None:
        super().__init__(error)
        self.error = error
        self.retry_after = retry_after


class Lease:
    """One claimed invoice and the lease on it, as a handler sees it."""

    def __init__(self, claimed: pb.ClaimedInvoice) -> None:
        #: The invoice, as the service returned it with the claim.
        self.invoice: pb.Invoice = claimed.invoice
        #: The fencing token; the worker passes it back on every write.
        self.token: str = claimed.lease_token
        #: Send this to the billing provider as its idempotency key. It is
        #: the same on every attempt of the invoice.
        self.idempotency_key: str = claimed.idempotency_key
        #: 1 for the first claim of the invoice, counting failed attempts.
        self.attempt: int = claimed.attempt
        #: The lease's expiry by the service's clock, moved by each heartbeat.
        self.expires_at: datetime = _to_datetime(claimed.lease_expires_at)
        #: No heartbeat moves the expiry past this.
        self.hold_deadline: datetime = _to_datetime(claimed.hold_deadline)
        self._stopped = threading.Event()
        self._stop_reason: Optional[StopReason] = None
        # Held across each RPC on this lease, so that a heartbeat never
        # reaches the service after the completion or release.
        self._rpc_lock = threading.Lock()
        # Set once the lease is settled or lost: the heartbeat leaves it alone.
        self._settled = False

    @property
    def invoice_id(self) -> int:
        """The invoice's id in the coordinator."""
        return int(self.invoice.invoice_id)

    @property
    def stop_reason(self) -> Optional[StopReason]:
        """Why the work should stop, or None while it may go on."""
        return self._stop_reason

    def check(self) -> None:
        """Raises :class:`WorkStopped` if the work on this lease should stop.

        Call it right before the step that cannot be undone (the charge).
        """
        reason = self._stop_reason
        if reason is not None:
            raise WorkStopped(self.invoice_id, reason)

    def wait(self, timeout: float) -> bool:
        """Sleeps up to `timeout` seconds; returns True early if the work should stop."""
        return self._stopped.wait(timeout)

    def _request_stop(self, reason: StopReason) -> None:
        # A lost lease outranks a cancellation: there is nothing left to release.
        if self._stop_reason is not StopReason.LEASE_LOST:
            self._stop_reason = reason
        self._stopped.set()


#: A handler bills one invoice and returns the provider's reference for the
#: charge (kept with the invoice; may be empty).
Handler = Callable[[Lease], str]


@dataclass
class WorkerStats:
    """What a worker did, counted per lease."""

    claimed: int = 0
    completed: int = 0
    #: Released with reason FAILED (the handler raised).
    released_failed: int = 0
    #: Released with reason SHUTDOWN (the worker stopped, or a cancellation).
    released_shutdown: int = 0
    #: Given up because the service answered LEASE_LOST.
    lease_lost: int = 0
    #: Completions or releases that still failed after every retry; the
    #: lease expires and the invoice is billed again under the same key.
    gave_up: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


class Worker:
    """Claims invoices from billing-coordinator and bills them with `handler`.

    `target` is the service's address (``host:port``, plaintext) or a ready
    :class:`grpc.Channel` (for TLS or other options), which the worker then
    leaves open. Durations are in seconds.
    """

    def __init__(
        self,
        target: Union[str, grpc.Channel],
        handler: Handler,
        *,
        worker_id: Optional[str] = None,
        queues: Sequence[str] = (),
        batch_size: int = 10,
        concurrency: int = 4,
        lease_duration: float = 30.0,
        wait: float = 20.0,
        rpc_timeout: float = 10.0,
        retry_for: float = 120.0,
    ) -> None:
        if not 1 <= batch_size <= 1000:
            raise ValueError(f"batch_size must be 1 to 1000, not {batch_size}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if lease_duration <= 0 or wait < 0 or rpc_timeout <= 0 or retry_for < 0:
            raise ValueError("lease_duration and rpc_timeout must be positive, wait and retry_for not negative")
        if isinstance(target, str):
            self._channel: grpc.Channel = grpc.insecure_channel(target)
            self._owns_channel = True
        else:
            self._channel = target
            self._owns_channel = False
        self._stub = pb_grpc.CoordinatorServiceStub(self._channel)
        self._handler = handler
        #: Recorded by the service as the holder of every lease this worker takes.
        self.worker_id = worker_id or default_worker_id()
        self._queues = list(queues)
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._lease_duration = lease_duration
        self._wait = wait
        self._rpc_timeout = rpc_timeout
        self._retry_for = retry_for
        self._heartbeat_interval = max(lease_duration / 3, POLL_INTERVAL)
        self._held: dict[int, Lease] = {}
        self._held_lock = threading.Lock()
        self._stopping = False
        self._running = False
        #: Counts of what happened to each lease, updated as the worker runs.
        self.stats = WorkerStats()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping

    def stop(self) -> None:
        """Stops claiming; invoices being billed finish, the rest are released.

        Safe to call from a signal handler or any thread; :meth:`run` returns
        once every lease is settled.
        """
        self._stopping = True

    def install_signal_handlers(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Makes SIGTERM and SIGINT call :meth:`stop`. Call it from the main thread."""

        def on_signal(signum: int, frame: Optional[FrameType]) -> None:
            self.stop()

        for signum in signals:
            signal.signal(signum, on_signal)

    def run(self) -> WorkerStats:
        """Claims and bills until :meth:`stop`; returns the counts.

        Raises :class:`grpc.RpcError` if a claim is refused for a reason
        retrying cannot fix (INVALID_ARGUMENT: a bad worker id or duration).
        """
        self._running = True
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="billing-heartbeat", daemon=True)
        heartbeat.start()
        try:
            with ThreadPoolExecutor(max_workers=self._concurrency, thread_name_prefix="billing") as pool:
                self._claim_loop(pool)
        finally:
            self._running = False
            heartbeat.join()
            if self._owns_channel:
                self._channel.close()
        return self.stats

    def _claim_loop(self, pool: ThreadPoolExecutor) -> None:
        failures = 0
        while not self._stopping:
            try:
                claimed = self._claim()
            except grpc.RpcError as error:
                if not is_retryable(error):
                    raise
                failures += 1
                delay = _backoff(failures)
                log.warning("claiming failed (%s); trying again in %.1fs", code_of(error).name, delay)
                self._sleep_unless_stopping(delay)
                continue
            failures = 0
            if not claimed:
                continue
            leases = [Lease(c) for c in claimed]
            self.stats.add("claimed", len(leases))
            with self._held_lock:
                for lease in leases:
                    self._held[lease.invoice_id] = lease
            # One batch at a time: a lease still waiting for a thread is
            # kept alive by the heartbeat, and released if the worker stops.
            wait_for_all([pool.submit(self._process, lease) for lease in leases])

    def _claim(self) -> list[pb.ClaimedInvoice]:
        request = pb.ClaimInvoicesRequest(
            worker_id=self.worker_id,
            max_count=self._batch_size,
            lease_duration=_duration(self._lease_duration),
            queues=self._queues,
            wait=_duration(self._wait),
        )
        # The long-poll runs as a future so that stop() can cut it short.
        future = self._stub.ClaimInvoices.future(request, timeout=self._wait + self._rpc_timeout)
        answered = threading.Event()
        future.add_done_callback(lambda _: answered.set())
        stop_seen: Optional[float] = None
        while not answered.wait(POLL_INTERVAL):
            if not self._stopping:
                continue
            stop_seen = stop_seen or time.monotonic()
            if time.monotonic() - stop_seen >= CLAIM_STOP_GRACE and future.cancel():
                return []
        # Raises the call's RpcError if it failed. If it answered while we
        # were stopping, its leases are released by _process.
        response: pb.ClaimInvoicesResponse = future.result()
        return list(response.invoices)

    def _process(self, lease: Lease) -> None:
        try:
            self._bill(lease)
        except Exception:
            # A bug in this module; the lease expires and the invoice returns.
            log.exception("settling the lease on invoice %d failed", lease.invoice_id)
        finally:
            self._forget(lease)

    def _bill(self, lease: Lease) -> None:
        if self._stopping:
            self._release(lease, pb.RELEASE_REASON_SHUTDOWN)
            return
        if lease.stop_reason is StopReason.LEASE_LOST:
            self.stats.add("lease_lost")
            return
        if lease.stop_reason is StopReason.CANCEL_REQUESTED:
            self._release(lease, pb.RELEASE_REASON_SHUTDOWN)
            return
        try:
            reference = self._handler(lease)
        except WorkStopped as stopped:
            if stopped.reason is StopReason.LEASE_LOST:
                log.info("invoice %d: lease lost, work stopped", lease.invoice_id)
                self.stats.add("lease_lost")
            else:
                log.info("invoice %d: cancelled, work stopped", lease.invoice_id)
                self._release(lease, pb.RELEASE_REASON_SHUTDOWN)
        except BillingFailed as failed:
            log.info("invoice %d: billing failed: %s", lease.invoice_id, failed.error)
            self._release(lease, pb.RELEASE_REASON_FAILED, failed.error, failed.retry_after)
        except Exception as error:
            log.exception("invoice %d: the handler raised", lease.invoice_id)
            self._release(lease, pb.RELEASE_REASON_FAILED, f"{type(error).__name__}: {error}")
        else:
            # Completed even if the heartbeat saw the lease lost meanwhile:
            # the charge was made, and the service still accepts it as long
            # as nobody else has claimed the invoice since.
            self._complete(lease, reference or "")

    def _complete(self, lease: Lease, reference: str) -> None:
        self._stop_heartbeat(lease)
        request = pb.CompleteInvoiceRequest(
            invoice_id=lease.invoice_id, lease_token=lease.token, provider_reference=reference
        )
        try:
            self._call_with_retries(self._stub.CompleteInvoice, request)
        except grpc.RpcError as error:
            self._settle_failed(lease, "completing", error)
            return
        self.stats.add("completed")

    def _release(
        self,
        lease: Lease,
        reason: pb.ReleaseReason,
        error: str = "",
        retry_after: Optional[float] = None,
    ) -> None:
        self._stop_heartbeat(lease)
        request = pb.ReleaseClaimRequest(invoice_id=lease.invoice_id, lease_token=lease.token, reason=reason)
        if reason == pb.RELEASE_REASON_FAILED:
            request.error = _clean_error(error)
            if retry_after is not None:
                request.retry_after.CopyFrom(_duration(max(retry_after, 0.0)))
        try:
            self._call_with_retries(self._stub.ReleaseClaim, request)
        except grpc.RpcError as failure:
            self._settle_failed(lease, "releasing", failure)
            return
        if reason == pb.RELEASE_REASON_FAILED:
            self.stats.add("released_failed")
        else:
            self.stats.add("released_shutdown")

    def _settle_failed(self, lease: Lease, doing: str, error: grpc.RpcError) -> None:
        if is_lease_lost(error):
            log.warning("invoice %d: lease lost before %s it; it belongs to another worker now", lease.invoice_id, doing)
            self.stats.add("lease_lost")
        else:
            log.error("invoice %d: %s failed: %s %s", lease.invoice_id, doing, code_of(error).name, _details(error))
            self.stats.add("gave_up")

    def _call_with_retries(self, method: Callable[..., Response], request: Request) -> Response:
        """Calls `method`, retrying UNAVAILABLE, ABORTED and DEADLINE_EXCEEDED for up to retry_for seconds."""
        give_up_at = time.monotonic() + self._retry_for
        failures = 0
        while True:
            try:
                return method(request, timeout=self._rpc_timeout)
            except grpc.RpcError as error:
                failures += 1
                delay = _backoff(failures)
                if not is_retryable(error) or time.monotonic() + delay > give_up_at:
                    raise
                log.warning("%s; retrying in %.1fs with the same token", code_of(error).name, delay)
                time.sleep(delay)

    def _heartbeat_loop(self) -> None:
        next_beat = time.monotonic() + self._heartbeat_interval
        while self._running or self._held:
            if time.monotonic() < next_beat:
                time.sleep(POLL_INTERVAL)
                continue
            next_beat = time.monotonic() + self._heartbeat_interval
            with self._held_lock:
                leases = list(self._held.values())
            for lease in leases:
                self._extend(lease)

    def _extend(self, lease: Lease) -> None:
        request = pb.ExtendLeaseRequest(
            invoice_id=lease.invoice_id,
            lease_token=lease.token,
            lease_duration=_duration(self._lease_duration),
        )
        with lease._rpc_lock:
            if lease._settled:
                return
            try:
                response: pb.ExtendLeaseResponse = self._stub.ExtendLease(
                    request, timeout=min(self._rpc_timeout, self._heartbeat_interval)
                )
            except grpc.RpcError as error:
                if is_lease_lost(error) or code_of(error) == grpc.StatusCode.NOT_FOUND:
                    log.warning("invoice %d: lease lost (%s)", lease.invoice_id, _details(error))
                    lease._settled = True
                    lease._request_stop(StopReason.LEASE_LOST)
                else:
                    # The next beat tries again; the lease has two more
                    # beats' worth of time before it expires.
                    log.warning("invoice %d: heartbeat failed: %s", lease.invoice_id, code_of(error).name)
                return
        lease.expires_at = _to_datetime(response.lease_expires_at)
        if response.cancel_requested and lease.stop_reason is None:
            log.info("invoice %d: cancellation requested", lease.invoice_id)
            lease._request_stop(StopReason.CANCEL_REQUESTED)

    def _stop_heartbeat(self, lease: Lease) -> None:
        # Waits for a heartbeat in flight, so it cannot land after the settlement.
        with lease._rpc_lock:
            lease._settled = True

    def _forget(self, lease: Lease) -> None:
        with self._held_lock:
            self._held.pop(lease.invoice_id, None)

    def _sleep_unless_stopping(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < until:
            time.sleep(min(POLL_INTERVAL, until - time.monotonic()))


def default_worker_id() -> str:
    """``<host>/pid-<pid>``: stable for the process and readable in the audit trail."""
    return f"{socket.gethostname()}/pid-{os.getpid()}"


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


def _to_datetime(timestamp: object) -> datetime:
    return timestamp.ToDatetime(tzinfo=timezone.utc)  # type: ignore[attr-defined, no-any-return]


def _backoff(failures: int) -> float:
    """Exponential from 0.1 s up to 5 s, with equal jitter."""
    ceiling = min(5.0, 0.1 * 2 ** min(failures - 1, 10))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _clean_error(error: str) -> str:
    # The service refuses NUL and keeps at most 4096 bytes.
    encoded = error.replace("\x00", "").encode()[:MAX_ERROR_BYTES]
    return encoded.decode(errors="ignore")


def _details(error: grpc.RpcError) -> str:
    details = error.details() if isinstance(error, grpc.Call) else None
    return details or ""
