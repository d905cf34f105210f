// How the service's errors read to a worker.
//
// billing-coordinator refuses a write made with a lease that is no longer
// live with FAILED_PRECONDITION and a google.rpc.ErrorInfo whose reason is
// LEASE_LOST, carried in the `grpc-status-details-bin` trailer as a
// google.rpc.Status. Transport and database trouble is UNAVAILABLE, ABORTED
// or, seen from the client, DEADLINE_EXCEEDED: completing, releasing and
// extending with the same token are safe to retry after any of them.

import { status as Code } from '@grpc/grpc-js';
import protobuf from 'protobufjs';

export const ERROR_DOMAIN = 'billing-coordinator';
export const REASON_LEASE_LOST = 'LEASE_LOST';

const DETAILS_KEY = 'grpc-status-details-bin';
const ERROR_INFO_TYPE = 'type.googleapis.com/google.rpc.ErrorInfo';

// google.rpc.Status and google.rpc.ErrorInfo, as googleapis defines them.
const rpc = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
          },
        },
      },
    },
  },
});
const Status = rpc.lookupType('google.rpc.Status');
const ErrorInfo = rpc.lookupType('google.rpc.ErrorInfo');

const RETRYABLE = new Set([Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.ABORTED]);

/**
 * The google.rpc.ErrorInfo the service attached to a failed call, if any.
 *
 * @param {import('@grpc/grpc-js').ServiceError} error
 * @returns {{reason: string, domain: string, metadata: Record<string, string>} | undefined}
 */
export function errorInfo(error) {
  const raw = error?.metadata?.get(DETAILS_KEY)?.[0];
  if (!Buffer.isBuffer(raw)) {
    return undefined;
  }
  let status;
  try {
    status = Status.decode(raw);
  } catch {
    return undefined;
  }
  for (const detail of status.details) {
    if (detail.type_url === ERROR_INFO_TYPE) {
      const info = ErrorInfo.toObject(ErrorInfo.decode(detail.value), { defaults: true });
      if (info.domain === ERROR_DOMAIN) {
        return info;
      }
    }
  }
  return undefined;
}

/** True when the service says the lease is no longer live. */
export function isLeaseLost(error) {
  return error?.code === Code.FAILED_PRECONDITION && errorInfo(error)?.reason === REASON_LEASE_LOST;
}

/** True for failures after which the same call may simply be sent again. */
export function isRetryable(error) {
  return RETRYABLE.has(error?.code);
}

/** The status code's name, for logs: `UNAVAILABLE`. */
export function codeName(error) {
  return Object.keys(Code).find((name) => Code[name] === error?.code) ?? String(error?.code ?? error);
}

