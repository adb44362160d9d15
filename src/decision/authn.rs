//! Check 1, authentication: the connection has a verified identity (today from the client
//! certificate; tokens join it here).

use crate::grpc::{Denial, ErrorCode};
use crate::listener::PeerIdentity;
use crate::listener::identity::IdentityError;

/// The verified identity, or `AUTHENTICATION_REQUIRED` saying why there is none.
pub(super) fn verified_identity<'a>(
    identity: Result<&'a PeerIdentity, &IdentityError>,
) -> Result<&'a PeerIdentity, Denial> {
    identity.map_err(unauthenticated)
}

/// The refusal of a connection without a usable identity.
pub(crate) fn unauthenticated(why: &IdentityError) -> Denial {
    Denial::new(
        ErrorCode::AuthenticationRequired,
        "no usable identity on this connection",
    )
    .detail("reason", why.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{PeerKind, PrincipalId, TenantId};

    #[test]
    fn a_connection_without_identity_is_refused_with_the_reason() {
        let alice = PeerIdentity::new(
            PrincipalId::new("alice").unwrap(),
            TenantId::new("acme").unwrap(),
            PeerKind::Client,
            None,
            String::new(),
        );
        assert!(verified_identity(Ok(&alice)).is_ok());
        for why in [
            IdentityError::NoCertificate,
            IdentityError::Unmapped {
                subject: "CN=x".into(),
            },
        ] {
            let d = verified_identity(Err(&why)).unwrap_err();
            assert_eq!(d.code, ErrorCode::AuthenticationRequired);
            assert_eq!(d.details["reason"], why.to_string());
        }
    }
}
