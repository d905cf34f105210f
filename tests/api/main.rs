//! Integration tests: the real gRPC server on a random port, each test with
//! its own fresh PostgreSQL database, asserting on answers and on the rows.

#[path = "../support/mod.rs"]
mod support;

mod helpers;

mod bad_input;
mod claim;
mod complete;
mod concurrency;
mod expiry;
mod lifecycle;
mod release_extend;
mod submit;
