"""An example billing worker: claims invoices and charges them at a payment provider.

The provider here speaks a small HTTP API in the style of real ones
(``POST /v1/charges`` with an ``Idempotency-Key`` header); ``fake_provider.py``
beside this file serves it. The invoice's idempotency key is what makes a
retry safe: an attempt that charged and then lost its lease (the worker died,
or stalled) is followed by one that sends the same key, and the provider
answers with the first charge instead of making a second.

    python examples/worker.py --target localhost:50051 --provider http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from typing import Optional

from billing_coordinator_client import BillingFailed, Lease, Worker, default_worker_id

log = logging.getLogger("example-worker")


class Provider:
    """A client for the provider's charge endpoint."""

    def __init__(self, base_url: str, worker_id: str, timeout: float) -> None:
        self._url = base_url.rstrip("/") + "/v1/charges"
        self._worker_id = worker_id
        self._timeout = timeout

    def charge(self, lease: Lease) -> str:
        """Charges the invoice and returns the provider's charge id."""
        invoice = lease.invoice
        body = {
            "customer": invoice.customer_id,
            "amount": invoice.amount_minor,
            "currency": invoice.currency,
            "metadata": {"invoice_id": str(invoice.invoice_id), "worker_id": self._worker_id},
        }
        request = urllib.request.Request(
            self._url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Idempotency-Key": lease.idempotency_key},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                charge = json.load(response)
        except urllib.error.HTTPError as error:
            # The provider refused (a declined card, a rate limit): try again
            # later, when it says so if it does.
            raise BillingFailed(
                f"provider answered {error.code}: {error.read(200).decode(errors='replace')}",
                retry_after=_seconds(error.headers.get("Retry-After")),
            ) from error
        except (OSError, ValueError) as error:
            # Timed out or cut off: the charge may or may not have been made.
            # The next attempt sends the same idempotency key, so the provider
            # will not make it twice.
            raise BillingFailed(f"provider call failed, outcome unknown: {error}") from error
        return str(charge["id"])


def _seconds(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=os.environ.get("BC_TARGET", "localhost:50051"), help="the coordinator's host:port")
    parser.add_argument("--provider", default=os.environ.get("BC_PROVIDER_URL", "http://127.0.0.1:8080"), help="the provider's base URL")
    parser.add_argument("--worker-id", default=default_worker_id(), help="recorded as the lease holder")
    parser.add_argument("--queue", action="append", default=[], help="claim only from this queue (repeatable)")
    parser.add_argument("--batch-size", type=int, default=10, help="invoices per claim")
    parser.add_argument("--concurrency", type=int, default=4, help="invoices billed at once")
    parser.add_argument("--lease", type=float, default=30.0, help="lease duration, seconds")
    parser.add_argument("--wait", type=float, default=20.0, help="long-poll wait of a claim, seconds")
    parser.add_argument("--provider-timeout", type=float, default=10.0, help="seconds")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    provider = Provider(args.provider, args.worker_id, args.provider_timeout)

    def bill(lease: Lease) -> str:
        # The lease may have been lost or cancelled while it waited for a
        # thread: the last moment to stop is before the charge.
        lease.check()
        return provider.charge(lease)

    worker = Worker(
        args.target,
        bill,
        worker_id=args.worker_id,
        queues=args.queue,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        lease_duration=args.lease,
        wait=args.wait,
    )
    worker.install_signal_handlers()
    log.info("worker %s claiming from %s", worker.worker_id, args.target)
    stats = worker.run()
    log.info(
        "worker %s stopped: %d claimed, %d completed, %d released failed, %d released on shutdown, "
        "%d lost, %d given up",
        worker.worker_id,
        stats.claimed,
        stats.completed,
        stats.released_failed,
        stats.released_shutdown,
        stats.lease_lost,
        stats.gave_up,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
