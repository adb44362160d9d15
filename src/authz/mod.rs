//! Authorization: who may do what. Today the RBAC engine ([`rbac`]): roles with
//! inheritance, permissions on operations and tools, bindings of principals, IdP groups and
//! certificate kinds to roles per tenant, resolved into per-subject permission sets so a
//! check on the hot path is a lookup. The CEL policy engine, governance and budgets join it
//! here, one file per concern, each called from the one pipeline in `decision`.

// Nothing calls into this module yet: the decision pipeline, the config and the management
// API wire it next. Until then its items would all warn as unused.
#![allow(dead_code)]

pub mod rbac;
