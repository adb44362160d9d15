//! aesp-sidecar: an AESP enforcement sidecar for GRID (ALTAR) hosts.
//!
//! Read the modules in the order a call travels through them:
//! [`config`] → [`tls`] and [`listener`] (TLS 1.3, peer identity) → [`proxy`] (HTTP/2,
//! routing, the frame interceptor) → [`grpc`] (framing, status) → [`grid`] (method table,
//! upgrades) → `decision` (the one decision point, crate-private) → [`upstream`] (pooled
//! HTTP/2 client to the host). [`sidecar`] assembles them.
//!
//! Public are what the binary, the tests, the benches and the fuzz targets use: the config,
//! the assembled sidecar, the wire pieces (framing, upgrades, the interceptor body) and the
//! client helpers. `demo` (the reference GRID host, the reference runtime and dev
//! certificates) is public for the binary and the tests but hidden from the documentation:
//! it is not the library's face.

// A `Denial` (the cold path) is larger than clippy likes in an `Err`; boxing it would buy nothing.
#![allow(clippy::result_large_err)]

/// mimalloc instead of glibc's malloc: measured under load (bench/README.md, 2026-12-03),
/// glibc's arena locks were contended wherever memory is freed on another thread than
/// the one that allocated it (an audit record made on a worker, freed by the audit writer;
/// h2 buffers), and malloc/free were ~12 % of the process's CPU. Every binary linking this
/// library (the `aesp` binary, tests, benches) uses it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod adm;
pub(crate) mod admin;
pub mod audit;
pub mod authz;
pub mod client;
pub mod config;
pub mod cost;
pub(crate) mod decision;
/// The whole decision of a tool call, for the benchmarks (not an API).
#[doc(hidden)]
pub use decision::bench::WholeDecision;
#[doc(hidden)]
pub mod demo;
pub mod governance;
pub mod grid;
pub mod grpc;
pub mod identity;
pub mod ids;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod proto;
pub mod proxy;
pub mod sidecar;
pub mod store;
pub mod tenancy;
pub mod tls;
pub(crate) mod upstream;
