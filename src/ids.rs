//! Identifiers that must never be swapped for one another: a tenant, a principal, the kind of
//! peer. Each is its own type, so a function taking `(PrincipalId, TenantId, PeerKind)`
//! cannot be handed them in the wrong order, and each is validated once, when it is made.
//!
//! The character set of tenant and principal ids (and peer kinds) is one segment of a SPIFFE
//! path as the sidecar accepts it: 1 to 128 ASCII letters, digits, `.`, `-` and `_`, the
//! first a letter or a digit (so `.` and `..`, and hidden-file names, are never ids: a host
//! that builds paths from them is safe).

use std::fmt;
use std::sync::Arc;

/// 1 to 128 letters, digits, `.`, `-`, `_`, the first a letter or a digit.
pub fn valid_segment(s: &str) -> bool {
    s.len() <= 128
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// `None` unless `s` is a valid segment (see the module header).
            pub fn new(s: &str) -> Option<Self> {
                valid_segment(s).then(|| $name(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }
    };
}

id_type!(
    /// The tenant a peer belongs to (`acme`).
    TenantId
);
id_type!(
    /// The principal a peer authenticates as (`alice`, `acme-runtime-1`).
    PrincipalId
);

/// What kind of peer holds a certificate: the `<kind>` segment of its SPIFFE ID.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum PeerKind {
    Client,
    Runtime,
    Admin,
    /// Another kind named by the SPIFFE path (validated like an id segment).
    Other(Arc<str>),
}

impl PeerKind {
    /// `None` unless `s` is a valid segment.
    pub fn new(s: &str) -> Option<PeerKind> {
        Some(match s {
            "client" => PeerKind::Client,
            "runtime" => PeerKind::Runtime,
            "admin" => PeerKind::Admin,
            other if valid_segment(other) => PeerKind::Other(Arc::from(other)),
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &str {
        match self {
            PeerKind::Client => "client",
            PeerKind::Runtime => "runtime",
            PeerKind::Admin => "admin",
            PeerKind::Other(s) => s,
        }
    }
}

impl fmt::Display for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_exactly_the_documented_character_set() {
        for (s, ok) in [
            ("acme", true),
            ("acme-runtime_1.eu", true),
            ("", false),
            (".", false),
            ("..", false),
            (".hidden", false),
            ("-dash", false),
            ("a..b", true),
            ("a/b", false),
            ("a b", false),
            ("é", false),
            (&"x".repeat(128), true),
            (&"x".repeat(129), false),
        ] {
            assert_eq!(TenantId::new(s).is_some(), ok, "{s:?}");
            assert_eq!(PrincipalId::new(s).is_some(), ok, "{s:?}");
            assert_eq!(PeerKind::new(s).is_some(), ok, "{s:?}");
        }
    }

    #[test]
    fn known_peer_kinds_are_their_own_variants() {
        assert_eq!(PeerKind::new("client"), Some(PeerKind::Client));
        assert_eq!(PeerKind::new("runtime"), Some(PeerKind::Runtime));
        assert_eq!(PeerKind::new("admin"), Some(PeerKind::Admin));
        assert_eq!(PeerKind::new("robot").unwrap().as_str(), "robot");
    }
}
