//! Check 3, identity consistency: a `principal_id` or `tenant_id` a message claims must be
//! the verified one. Otherwise `IDENTITY_MISMATCH`, or, where the config says so, the claim
//! is overwritten (the upgrade writes the verified identity) and the facts say it was.

use super::Facts;
use crate::grid::upgrade::Claims;
use crate::grpc::{Denial, ErrorCode};

/// `facts` carries the verified (effective) identity, and records an overwrite.
pub(super) fn consistent(
    claims: &Claims,
    facts: &mut Facts,
    overwrite: bool,
) -> Result<(), Denial> {
    let principal = facts
        .principal_id
        .as_ref()
        .map_or("", |p| p.as_str())
        .to_string();
    let tenant = facts
        .tenant_id
        .as_ref()
        .map_or("", |t| t.as_str())
        .to_string();
    for (field, claimed, verified) in [
        ("principal_id", &claims.principal_id, principal.as_str()),
        ("tenant_id", &claims.tenant_id, tenant.as_str()),
    ] {
        let Some(c) = claimed else { continue };
        if c == verified {
            continue;
        }
        if overwrite {
            facts.overwrote_identity = true;
            continue;
        }
        return Err(Denial::new(
            ErrorCode::IdentityMismatch,
            format!("the message claims {field} {c:?} but the verified identity is {verified:?}"),
        )
        .detail("field", field)
        .detail("claimed", c.as_str())
        .detail("verified", verified));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Stage;
    use crate::grid::Route;
    use crate::ids::{PeerKind, PrincipalId, TenantId};
    use crate::listener::PeerIdentity;

    #[test]
    fn claims_must_match_the_verified_identity_unless_overwriting_is_configured() {
        let alice = PeerIdentity::new(
            PrincipalId::new("alice").unwrap(),
            TenantId::new("acme").unwrap(),
            PeerKind::Client,
            None,
            String::new(),
        );
        let c = |p: Option<&str>, t: Option<&str>| Claims {
            principal_id: p.map(str::to_string),
            tenant_id: t.map(str::to_string),
        };
        // (claims, overwrite) -> Err(field) or Ok(overwrote)
        let cases = [
            (c(None, None), false, Ok(false)),
            (c(Some("alice"), Some("acme")), false, Ok(false)),
            (c(Some("bob"), None), false, Err("principal_id")),
            (c(None, Some("globex")), false, Err("tenant_id")),
            (c(Some("bob"), Some("globex")), true, Ok(true)),
        ];
        for (claims, overwrite, want) in cases {
            let mut facts = Facts::new(Stage::Call, "/m", Route::Unknown, Some(&alice), "c");
            let got = consistent(&claims, &mut facts, overwrite);
            match (got, want) {
                (Ok(()), Ok(over)) => assert_eq!(facts.overwrote_identity, over),
                (Err(d), Err(field)) => {
                    assert_eq!(d.code, ErrorCode::IdentityMismatch);
                    assert_eq!(d.details["field"], field);
                }
                (got, want) => panic!("{claims:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
