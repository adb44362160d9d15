//! Where connections come in: the TLS 1.3 acceptor and the peer identity of each connection.

pub mod identity;

pub use identity::PeerIdentity;
