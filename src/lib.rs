//! billing-coordinator: exclusive, expiring, fenced leases on invoices, so that
//! billing workers in any language can share one pending set without billing a
//! customer twice or losing an invoice when a worker dies.
//!
//! Three layers, each small: [`grpc`] decodes requests and encodes answers,
//! [`coordinator`] holds the rules, [`store`] is the only place that speaks
//! SQL. [`lease`] states the contract they all keep.

pub mod admin;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod fairness;
pub mod funnel;
pub mod grpc;
pub mod lease;
pub mod maintenance;
pub mod pruner;
pub mod rescuer;
pub mod startup;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod wakeup;

/// Code generated from `proto/billing/coordinator/v1/coordinator.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("billing.coordinator.v1");

    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/coordinator_descriptor.bin"));
}

pub use error::{Error, Result};
