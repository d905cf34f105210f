// A worker library for billing-coordinator.
//
// `Worker` runs the claim loop the service's lease contract asks for; your
// handler only bills one invoice:
//
// * It claims a batch with a long-poll (`wait`), so an idle worker makes one
//   call every `wait` seconds instead of spinning.
// * A heartbeat extends every lease it holds, from claim to settlement, every
//   third of the lease duration. When the service answers LEASE_LOST, the
//   lease's `signal` aborts: pass it to the provider call (fetch takes it), so
//   the work stops; the invoice is someone else's now, and their attempt sends
//   the same idempotency key. When an operator asked to cancel the invoice,
//   `lease.check()` throws, so a charge not yet started is not made.
// * The handler's outcome settles the lease: a returned provider reference
//   completes the invoice; a `BillingFailed` (or any other error) releases it
//   as failed; an abort after a cancellation releases it without counting the
//   attempt. Completions and releases are retried on UNAVAILABLE, ABORTED and
//   DEADLINE_EXCEEDED with the same token, which the service makes safe.
// * `stop()` (or SIGTERM, after `installSignalHandlers()`) stops claiming,
//   lets invoices already being billed finish, and releases the ones not yet
//   started with reason SHUTDOWN, so they go to another worker at once. A
//   long-poll in flight gets two seconds to answer before it is cut short.

import { hostname } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';

import * as grpc from '@grpc/grpc-js';

import { coordinatorPackage } from './proto.js';
import { codeName, isLeaseLost, isRetryable } from './status.js';

export { coordinatorPackage } from './proto.js';
export { ERROR_DOMAIN, REASON_LEASE_LOST, errorInfo, isLeaseLost, isRetryable } from './status.js';

/** Why a lease's work should stop. */
export const StopReason = Object.freeze({
  /** The lease is not live any more: do not charge, the invoice is someone else's. */
  LEASE_LOST: 'LEASE_LOST',
  /** An operator asked to cancel: stop before charging if you still can. */
  CANCEL_REQUESTED: 'CANCEL_REQUESTED',
});

/**
 * Throw from a handler when the charge failed and should be tried again. The
 * lease is released with reason FAILED, which counts the attempt; the invoice
 * is claimable again after `retryAfter` seconds, or the service's backoff.
 * Throw it too when the outcome is unknown (a timeout): the next attempt
 * sends the same idempotency key, so the provider will not charge twice.
 */
export class BillingFailed extends Error {
  /** @param {string} message @param {{retryAfter?: number}} [options] */
  constructor(message, { retryAfter } = {}) {
    super(message);
    this.name = 'BillingFailed';
    this.retryAfter = retryAfter;
  }
}

/** Thrown by `lease.check()` when the work on a lease should stop. */
export class WorkStopped extends Error {
  constructor(invoiceId, reason) {
    super(`invoice ${invoiceId}: ${reason}`);
    this.name = 'WorkStopped';
    this.reason = reason;
  }
}

/** One claimed invoice and the lease on it, as a handler sees it. */
export class Lease {
  constructor(claimed) {
    /** The invoice as the service returned it with the claim (camelCase fields). */
    this.invoice = claimed.invoice;
    /** The invoice's id, a string (int64). */
    this.invoiceId = claimed.invoice.invoiceId;
    /** The fencing token; the worker passes it back on every write. */
    this.token = claimed.leaseToken;
    /** Send this to the billing provider as its idempotency key. */
    this.idempotencyKey = claimed.idempotencyKey;
    /** 1 for the first claim of the invoice, counting failed attempts. */
    this.attempt = claimed.attempt;
    /** The lease's expiry by the service's clock, moved by each heartbeat. */
    this.expiresAt = toDate(claimed.leaseExpiresAt);
    this.#lost = new AbortController();
    /**
     * Aborts (with reason `StopReason.LEASE_LOST`) when the lease is lost.
     * A cancellation does not abort it: a charge already under way should
     * finish, and a charge made is completed.
     */
    this.signal = this.#lost.signal;
  }

  #lost;
  /** An operator asked to cancel the invoice. */
  cancelRequested = false;
  /** Set once the lease is settled or lost: the heartbeat leaves it alone. */
  settled = false;
  /** The heartbeat call in flight, awaited before the lease is settled. */
  beat = Promise.resolve();
  beating = false;

  /** Why the work should stop, or undefined while it may go on. */
  get stopReason() {
    if (this.signal.aborted) return StopReason.LEASE_LOST;
    return this.cancelRequested ? StopReason.CANCEL_REQUESTED : undefined;
  }

  /** Throws `WorkStopped` if the work should stop; call it right before the charge. */
  check() {
    const reason = this.stopReason;
    if (reason) {
      throw new WorkStopped(this.invoiceId, reason);
    }
  }

  markLost() {
    this.#lost.abort(StopReason.LEASE_LOST);
  }
}

/** `<host>/pid-<pid>`: stable for the process and readable in the audit trail. */
export function defaultWorkerId() {
  return `${hostname()}/pid-${process.pid}`;
}

// How long a claim in flight may still answer after stop(). A claim that
// found work answers within milliseconds, and its leases are then released;
// one still open after this is long-polling an empty queue, and cutting it
// short loses nothing (cancelling a claim the service has just granted would
// strand its leases until they expire).
const CLAIM_STOP_GRACE_MS = 2000;

const stderrLogger = {
  info: (...args) => console.error(new Date().toISOString(), 'INFO', ...args),
  warn: (...args) => console.error(new Date().toISOString(), 'WARN', ...args),
  error: (...args) => console.error(new Date().toISOString(), 'ERROR', ...args),
};

export class Worker {
  /**
   * @param {object} options
   * @param {string} options.address the service's `host:port`
   * @param {(lease: Lease) => Promise<string>} options.handler bills one
   *   invoice and returns the provider's reference for the charge
   * @param {string} [options.workerId] recorded as the lease holder
   * @param {string[]} [options.queues] claim only from these queues
   * @param {number} [options.batchSize] invoices per claim (1 to 1000)
   * @param {number} [options.concurrency] invoices billed at once
   * @param {number} [options.leaseDuration] seconds
   * @param {number} [options.wait] long-poll wait of a claim, seconds
   * @param {number} [options.rpcTimeout] seconds
   * @param {number} [options.retryFor] how long to retry a completion or release, seconds
   * @param {grpc.ChannelCredentials} [options.credentials] plaintext unless given
   * @param {{info: Function, warn: Function, error: Function}} [options.logger]
   */
  constructor({
    address,
    handler,
    workerId = defaultWorkerId(),
    queues = [],
    batchSize = 10,
    concurrency = 4,
    leaseDuration = 30,
    wait = 20,
    rpcTimeout = 10,
    retryFor = 120,
    credentials = grpc.credentials.createInsecure(),
    logger = stderrLogger,
  }) {
    if (!(batchSize >= 1 && batchSize <= 1000)) throw new RangeError(`batchSize must be 1 to 1000, not ${batchSize}`);
    if (!(concurrency >= 1)) throw new RangeError(`concurrency must be at least 1, not ${concurrency}`);
    if (!(leaseDuration > 0 && rpcTimeout > 0 && wait >= 0 && retryFor >= 0)) {
      throw new RangeError('leaseDuration and rpcTimeout must be positive, wait and retryFor not negative');
    }
    const { CoordinatorService } = coordinatorPackage();
    this.client = new CoordinatorService(address, credentials);
    this.handler = handler;
    this.workerId = workerId;
    this.queues = queues;
    this.batchSize = batchSize;
    this.concurrency = concurrency;
    this.leaseDuration = leaseDuration;
    this.wait = wait;
    this.rpcTimeout = rpcTimeout;
    this.retryFor = retryFor;
    this.log = logger;
    this.heartbeatInterval = Math.max(leaseDuration / 3, 0.1);
    /** @type {Map<string, Lease>} */
    this.held = new Map();
    this.stopping = false;
    this.claimCall = undefined;
    /** Counts of what happened to each lease. */
    this.stats = { claimed: 0, completed: 0, releasedFailed: 0, releasedShutdown: 0, leaseLost: 0, gaveUp: 0 };
  }

  /** Stops claiming; invoices being billed finish, the rest are released. */
  stop() {
    if (this.stopping) return;
    this.stopping = true;
    setTimeout(() => this.claimCall?.cancel(), CLAIM_STOP_GRACE_MS).unref();
  }

  /** Makes SIGTERM and SIGINT call `stop()`. */
  installSignalHandlers(signals = ['SIGTERM', 'SIGINT']) {
    for (const signal of signals) {
      process.on(signal, () => this.stop());
    }
  }

  /** Claims and bills until `stop()`; resolves to the counts. */
  async run() {
    const heartbeat = setInterval(() => this.#heartbeat(), this.heartbeatInterval * 1000);
    try {
      let failures = 0;
      while (!this.stopping) {
        let claimed;
        try {
          claimed = await this.#claim();
        } catch (error) {
          if (this.stopping && error.code === grpc.status.CANCELLED) break;
          if (!isRetryable(error)) throw error;
          failures += 1;
          const delay = backoff(failures);
          this.log.warn(`claiming failed (${codeName(error)}); trying again in ${delay.toFixed(1)}s`);
          await this.#sleepUnlessStopping(delay);
          continue;
        }
        failures = 0;
        const leases = claimed.map((c) => new Lease(c));
        this.stats.claimed += leases.length;
        for (const lease of leases) this.held.set(lease.invoiceId, lease);
        // One batch at a time: a lease still waiting for its turn is kept
        // alive by the heartbeat, and released if the worker stops.
        await forEachConcurrently(leases, this.concurrency, (lease) => this.#process(lease));
      }
    } finally {
      clearInterval(heartbeat);
      this.client.close();
    }
    return this.stats;
  }

  #claim() {
    const request = {
      workerId: this.workerId,
      maxCount: this.batchSize,
      leaseDuration: duration(this.leaseDuration),
      queues: this.queues,
      wait: duration(this.wait),
    };
    return new Promise((resolve, reject) => {
      // Kept so that stop() can cut the long-poll short. A claim answered
      // while stopping is still processed: its leases are released.
      this.claimCall = this.client.claimInvoices(request, { deadline: deadline(this.wait + this.rpcTimeout) }, (error, response) => {
        this.claimCall = undefined;
        if (error) reject(error);
        else resolve(response.invoices);
      });
    });
  }

  async #process(lease) {
    try {
      await this.#bill(lease);
    } catch (error) {
      // A bug in this module; the lease expires and the invoice returns.
      this.log.error(`settling the lease on invoice ${lease.invoiceId} failed:`, error);
    } finally {
      this.held.delete(lease.invoiceId);
    }
  }

  async #bill(lease) {
    if (this.stopping || lease.stopReason === StopReason.CANCEL_REQUESTED) {
      return this.#release(lease, 'RELEASE_REASON_SHUTDOWN');
    }
    if (lease.stopReason === StopReason.LEASE_LOST) {
      this.stats.leaseLost += 1;
      return;
    }
    let reference;
    try {
      reference = await this.handler(lease);
    } catch (error) {
      if (lease.stopReason === StopReason.LEASE_LOST) {
        // Stopped by the lease's signal, or failed after it aborted: either
        // way there is nothing left to settle.
        this.log.info(`invoice ${lease.invoiceId}: lease lost, work stopped`);
        this.stats.leaseLost += 1;
        return;
      }
      if (error instanceof WorkStopped) {
        this.log.info(`invoice ${lease.invoiceId}: cancelled, work stopped`);
        return this.#release(lease, 'RELEASE_REASON_SHUTDOWN');
      }
      if (error instanceof BillingFailed) {
        this.log.info(`invoice ${lease.invoiceId}: billing failed: ${error.message}`);
        return this.#release(lease, 'RELEASE_REASON_FAILED', error.message, error.retryAfter);
      }
      this.log.error(`invoice ${lease.invoiceId}: the handler threw:`, error);
      return this.#release(lease, 'RELEASE_REASON_FAILED', `${error?.name ?? 'Error'}: ${error?.message ?? error}`);
    }
    // Completed even if the heartbeat saw the lease lost meanwhile: the
    // charge was made, and the service still accepts it as long as nobody
    // else has claimed the invoice since.
    return this.#complete(lease, reference ?? '');
  }

  async #complete(lease, reference) {
    await this.#stopHeartbeat(lease);
    const request = { invoiceId: lease.invoiceId, leaseToken: lease.token, providerReference: reference };
    try {
      await this.#callWithRetries('completeInvoice', request);
      this.stats.completed += 1;
    } catch (error) {
      this.#settleFailed(lease, 'completing', error);
    }
  }

  async #release(lease, reason, error = '', retryAfter = undefined) {
    await this.#stopHeartbeat(lease);
    const request = { invoiceId: lease.invoiceId, leaseToken: lease.token, reason };
    if (reason === 'RELEASE_REASON_FAILED') {
      request.error = cleanError(error);
      if (retryAfter !== undefined && retryAfter !== null) request.retryAfter = duration(Math.max(retryAfter, 0));
    }
    try {
      await this.#callWithRetries('releaseClaim', request);
      if (reason === 'RELEASE_REASON_FAILED') this.stats.releasedFailed += 1;
      else this.stats.releasedShutdown += 1;
    } catch (failure) {
      this.#settleFailed(lease, 'releasing', failure);
    }
  }

  #settleFailed(lease, doing, error) {
    if (isLeaseLost(error)) {
      this.log.warn(`invoice ${lease.invoiceId}: lease lost before ${doing} it; it belongs to another worker now`);
      this.stats.leaseLost += 1;
    } else {
      this.log.error(`invoice ${lease.invoiceId}: ${doing} failed: ${codeName(error)} ${error?.details ?? error}`);
      this.stats.gaveUp += 1;
    }
  }

  /** Calls `method`, retrying UNAVAILABLE, ABORTED and DEADLINE_EXCEEDED for up to retryFor seconds. */
  async #callWithRetries(method, request) {
    const giveUpAt = Date.now() + this.retryFor * 1000;
    for (let failures = 1; ; failures += 1) {
      try {
        return await unary(this.client, method, request, this.rpcTimeout);
      } catch (error) {
        const delay = backoff(failures);
        if (!isRetryable(error) || Date.now() + delay * 1000 > giveUpAt) throw error;
        this.log.warn(`${codeName(error)}; retrying in ${delay.toFixed(1)}s with the same token`);
        await sleep(delay * 1000);
      }
    }
  }

  #heartbeat() {
    for (const lease of this.held.values()) {
      // A lease whose last beat is still in flight waits for the next tick.
      if (lease.settled || lease.beating) continue;
      lease.beating = true;
      lease.beat = this.#extend(lease).finally(() => {
        lease.beating = false;
      });
    }
  }

  async #extend(lease) {
    if (lease.settled) return;
    const request = { invoiceId: lease.invoiceId, leaseToken: lease.token, leaseDuration: duration(this.leaseDuration) };
    try {
      const response = await unary(this.client, 'extendLease', request, Math.min(this.rpcTimeout, this.heartbeatInterval));
      lease.expiresAt = toDate(response.leaseExpiresAt);
      if (response.cancelRequested && !lease.cancelRequested) {
        this.log.info(`invoice ${lease.invoiceId}: cancellation requested`);
        lease.cancelRequested = true;
      }
    } catch (error) {
      if (isLeaseLost(error) || error.code === grpc.status.NOT_FOUND) {
        this.log.warn(`invoice ${lease.invoiceId}: lease lost (${error.details})`);
        lease.settled = true;
        lease.markLost();
      } else {
        // The next beat tries again; the lease has two more beats' worth of time.
        this.log.warn(`invoice ${lease.invoiceId}: heartbeat failed: ${codeName(error)}`);
      }
    }
  }

  // Waits for a heartbeat in flight, so it cannot land after the settlement.
  async #stopHeartbeat(lease) {
    lease.settled = true;
    await lease.beat;
  }

  async #sleepUnlessStopping(seconds) {
    const until = Date.now() + seconds * 1000;
    while (!this.stopping && Date.now() < until) {
      await sleep(Math.min(100, until - Date.now()));
    }
  }
}

function unary(client, method, request, timeoutSeconds) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline(timeoutSeconds) }, (error, response) => {
      if (error) reject(error);
      else resolve(response);
    });
  });
}

async function forEachConcurrently(items, limit, fn) {
  const queue = [...items];
  const runners = Array.from({ length: Math.min(limit, queue.length) }, async () => {
    while (queue.length > 0) await fn(queue.shift());
  });
  await Promise.all(runners);
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function duration(seconds) {
  const whole = Math.floor(seconds);
  return { seconds: String(whole), nanos: Math.round((seconds - whole) * 1e9) };
}

function toDate(timestamp) {
  return timestamp ? new Date(Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6)) : undefined;
}

/** Exponential from 0.1 s up to 5 s, with equal jitter, in seconds. */
function backoff(failures) {
  const ceiling = Math.min(5, 0.1 * 2 ** Math.min(failures - 1, 10));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

// The service refuses NUL and keeps at most 4096 bytes of a release's error.
function cleanError(error) {
  const bytes = Buffer.from(String(error).replaceAll('\u0000', ''), 'utf8').subarray(0, 4096);
  return bytes.toString('utf8').replace(/\uFFFD$/, '');
}
