//! aesp-sidecar: an AESP enforcement sidecar for GRID (ALTAR) hosts.
//!
//! Read the modules in the order a call travels through them:
//! [`config`] → [`tls`] and [`listener`] (TLS 1.3, peer identity) → [`proxy`] (HTTP/2,
//! routing, the frame interceptor) → [`grpc`] (framing, status) → [`grid`] (method table,
//! upgrades) → [`decision`] (the one decision point) → [`upstream`] (pooled HTTP/2 client to
//! the host). [`sidecar`] assembles them; [`demo`] holds the reference GRID host, the
//! reference runtime and dev certificates.

// A `Denial` (the cold path) is larger than clippy likes in an `Err`; boxing it would buy nothing.
#![allow(clippy::result_large_err)]

pub mod adm;
pub mod client;
pub mod config;
pub mod decision;
pub mod demo;
pub mod grid;
pub mod grpc;
pub mod listener;
pub mod metrics;
pub mod proto;
pub mod proxy;
pub mod sidecar;
pub mod tls;
pub mod upstream;
