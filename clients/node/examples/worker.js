// An example billing worker: claims invoices and charges them at a payment
// provider.
//
// The provider speaks a small HTTP API in the style of real ones
// (`POST /v1/charges` with an `Idempotency-Key` header); clients/fake_provider.py
// serves it. The invoice's idempotency key is what makes a retry safe: an
// attempt that charged and then lost its lease (the worker died, or stalled)
// is followed by one that sends the same key, and the provider answers with
// the first charge instead of making a second.
//
//   node examples/worker.js --target localhost:50051 --provider http://127.0.0.1:8080

import { parseArgs } from 'node:util';

import { BillingFailed, Worker, defaultWorkerId } from '../src/index.js';

const { values: args } = parseArgs({
  options: {
    target: { type: 'string', default: process.env.BC_TARGET ?? 'localhost:50051' },
    provider: { type: 'string', default: process.env.BC_PROVIDER_URL ?? 'http://127.0.0.1:8080' },
    'worker-id': { type: 'string', default: defaultWorkerId() },
    queue: { type: 'string', multiple: true, default: [] },
    'batch-size': { type: 'string', default: '10' },
    concurrency: { type: 'string', default: '4' },
    lease: { type: 'string', default: '30' },
    wait: { type: 'string', default: '20' },
    'provider-timeout': { type: 'string', default: '10' },
  },
});
const workerId = args['worker-id'];
const chargesUrl = `${args.provider.replace(/\/+$/, '')}/v1/charges`;
const providerTimeout = Number(args['provider-timeout']) * 1000;

/** Charges the invoice and returns the provider's charge id. */
async function charge(lease) {
  const { invoice } = lease;
  // Abandoned when the lease is lost, or on timeout.
  const abandon = new AbortController();
  const onLost = () => abandon.abort(lease.signal.reason);
  lease.signal.addEventListener('abort', onLost, { once: true });
  const timer = setTimeout(() => abandon.abort(new Error('provider timeout')), providerTimeout);
  let response;
  let body;
  try {
    response = await fetch(chargesUrl, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'Idempotency-Key': lease.idempotencyKey },
      body: JSON.stringify({
        customer: invoice.customerId,
        // Minor units stay far below 2^53.
        amount: Number(invoice.amountMinor),
        currency: invoice.currency,
        metadata: { invoice_id: lease.invoiceId, worker_id: workerId },
      }),
      signal: abandon.signal,
    });
    body = response.ok ? await response.json() : undefined;
  } catch (error) {
    if (lease.signal.aborted) throw error;
    // Timed out or cut off: the charge may or may not have been made. The
    // next attempt sends the same idempotency key, so the provider will not
    // make it twice.
    throw new BillingFailed(`provider call failed, outcome unknown: ${error.message}`);
  } finally {
    clearTimeout(timer);
    lease.signal.removeEventListener('abort', onLost);
  }
  if (!response.ok) {
    // The provider refused (a declined card, a rate limit): try again later,
    // when it says so if it does.
    const retryAfter = Number(response.headers.get('retry-after'));
    throw new BillingFailed(`provider answered ${response.status}: ${(await response.text()).slice(0, 200)}`, {
      retryAfter: Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter : undefined,
    });
  }
  return String(body.id);
}

const worker = new Worker({
  address: args.target,
  workerId,
  queues: args.queue,
  batchSize: Number(args['batch-size']),
  concurrency: Number(args.concurrency),
  leaseDuration: Number(args.lease),
  wait: Number(args.wait),
  handler: async (lease) => {
    // The lease may have been lost or cancelled while it waited its turn:
    // the last moment to stop is before the charge.
    lease.check();
    return charge(lease);
  },
});
worker.installSignalHandlers();
console.error(`worker ${workerId} claiming from ${args.target}`);
const stats = await worker.run();
console.error(
  `worker ${workerId} stopped: ${stats.claimed} claimed, ${stats.completed} completed, ` +
    `${stats.releasedFailed} released failed, ${stats.releasedShutdown} released on shutdown, ` +
    `${stats.leaseLost} lost, ${stats.gaveUp} given up`,
);
