"""A fake payment provider for running the example workers locally.

It speaks the small API the examples call, in the style of real providers:

    POST /v1/charges
    Idempotency-Key: <the invoice's idempotency key>
    {"customer": "cus_42", "amount": 1999, "currency": "EUR", "metadata": {...}}

    200 {"id": "ch_1", "replayed": false}

A second request with a key it has seen is absorbed: the answer is the first
charge again, with ``"replayed": true`` and the header ``Idempotent-Replayed:
true``, and nobody is charged twice. The same key with a different amount,
currency or customer is refused with 409. ``GET /v1/charges`` lists what was
charged. Standard library only:

    python3 clients/fake_provider.py --port 8080
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Ledger:
    """Charges by idempotency key, and how many repeats each absorbed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._charges: dict[str, dict[str, Any]] = {}
        self.replays = 0

    def charge(self, key: str, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        terms = {name: request.get(name) for name in ("customer", "amount", "currency")}
        with self._lock:
            first = self._charges.get(key)
            if first is None:
                charge = {"id": f"ch_{len(self._charges) + 1}", **terms, "metadata": request.get("metadata", {})}
                self._charges[key] = charge
                return 200, {**charge, "replayed": False}
            if {name: first[name] for name in terms} != terms:
                return 409, {"error": "idempotency key reused with different parameters"}
            self.replays += 1
            return 200, {**first, "replayed": True}

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"charges": len(self._charges), "replays_absorbed": self.replays}


def handler_for(ledger: Ledger) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            if self.path != "/v1/charges":
                self._answer(404, {"error": "not found"})
                return
            key = self.headers.get("Idempotency-Key", "")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            except ValueError:
                self._answer(400, {"error": "the body must be JSON"})
                return
            if not key or not isinstance(body, dict):
                self._answer(400, {"error": "an Idempotency-Key header and a JSON object are required"})
                return
            status, answer = ledger.charge(key, body)
            replayed = bool(answer.get("replayed"))
            self._answer(status, answer, {"Idempotent-Replayed": "true"} if replayed else {})

        def do_GET(self) -> None:
            if self.path == "/v1/charges":
                self._answer(200, ledger.summary())
            else:
                self._answer(404, {"error": "not found"})

        def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake payment provider with idempotency keys.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    ledger = Ledger()
    server = ThreadingHTTPServer((args.host, args.port), handler_for(ledger))
    print(f"fake provider on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    print(json.dumps(ledger.summary()), flush=True)


if __name__ == "__main__":
    main()
