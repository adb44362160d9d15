//! Where connections come in: the acceptor (TCP, the TLS 1.3 handshake with a required
//! client certificate, HTTP/2 with its limits) and the peer identity of each connection,
//! computed once from its certificate. Each accepted connection is handed to the
//! [`crate::proxy`] with its identity.

pub(crate) mod accept;
pub mod identity;

pub use identity::PeerIdentity;
