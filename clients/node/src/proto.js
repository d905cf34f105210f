// Loads the coordinator's protobuf API at run time, so the client always
// speaks the proto it ships with: `proto/` inside a packed package (copied by
// `npm pack`), or the repository's own `proto/` two levels up.

import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const PROTO_FILE = 'billing/coordinator/v1/coordinator.proto';
const here = dirname(fileURLToPath(import.meta.url));

/** The directory holding `billing/coordinator/v1/coordinator.proto`. */
export function protoRoot() {
  const candidates = [join(here, '..', 'proto'), join(here, '..', '..', '..', 'proto')];
  const found = candidates.find((dir) => existsSync(join(dir, PROTO_FILE)));
  if (!found) {
    throw new Error(`cannot find ${PROTO_FILE} in ${candidates.join(' or ')}`);
  }
  return found;
}

let cached;

/**
 * The `billing.coordinator.v1` package: `CoordinatorService` is a client
 * constructor, `new CoordinatorService(address, credentials)`.
 *
 * Messages use camelCase field names. 64-bit integers (`invoiceId`,
 * `amountMinor`) are strings, so no id ever loses precision; enums are their
 * names (`'INVOICE_STATE_PENDING'`).
 */
export function coordinatorPackage() {
  if (!cached) {
    const definition = protoLoader.loadSync(PROTO_FILE, {
      includeDirs: [protoRoot()],
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    cached = grpc.loadPackageDefinition(definition).billing.coordinator.v1;
  }
  return cached;
}
