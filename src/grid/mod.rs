//! GRID: the method table, the protobuf wire walker and the base → enterprise upgrades.

pub mod method;
pub mod upgrade;
pub mod wire;

pub use method::{GridMethod, Route, route};
