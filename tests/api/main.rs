//! Integration tests: the real gRPC server on a random port, each test with
//! its own fresh PostgreSQL database, asserting on answers and on the rows.

#[path = "../support/mod.rs"]
mod support;

mod helpers;

mod audit;
mod bad_input;
mod claim;
mod complete;
mod concurrency;
mod cursors;
mod expiry;
mod fairness;
mod fuzz;
mod lifecycle;
mod operator;
mod outage;
mod release_extend;
mod retries;
mod schema;
mod serialization;
mod submit;
