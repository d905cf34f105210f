//! Shared helpers for integration tests; each test binary includes this with
//! `#[path = "../support/mod.rs"] mod support;`.

pub mod postgres;
pub mod service;
pub mod tools;
