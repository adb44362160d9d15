//! Who calls: the bearer token of a call, verified against the trusted issuers and mapped
//! to a [`Caller`] (principal, tenant, organization, clearance, roles, claims). The
//! workload's identity (its certificate) is computed once per connection in
//! [`crate::listener::identity`]; how the two combine is the pipeline's `authn` check.

pub mod own;
pub mod remote;
pub mod token;

pub use token::{Caller, TokenError, Verifier};
