//! Check 2, the method: a GRID method, or one listed for pass-through. Everything else,
//! the management port's methods included (until its services are served), is
//! `METHOD_NOT_ALLOWED`.

use crate::grid::Route;
use crate::grpc::{Denial, ErrorCode};

pub(super) fn served(method: &str, route: Route) -> Result<(), Denial> {
    let message = match route {
        Route::Grid(_) | Route::Passthrough => return Ok(()),
        Route::Management if crate::admin::serves(method) => return Ok(()),
        Route::Management => format!(
            "{method} is not served: of the Enterprise*Service management APIs, this release serves EnterpriseIdentityService"
        ),
        Route::Unknown => {
            format!("method {method} is not a GRID method and is not listed for pass-through")
        }
    };
    Err(Denial::new(ErrorCode::MethodNotAllowed, message).detail("method", method))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::GridMethod;

    #[test]
    fn grid_and_passthrough_methods_are_served_and_nothing_else() {
        for (route, served_ok) in [
            (Route::Grid(GridMethod::Connect), true),
            (Route::Passthrough, true),
            (Route::Unknown, false),
            (Route::Management, false),
        ] {
            let r = served("/x.Y/Z", route);
            assert_eq!(r.is_ok(), served_ok, "{route:?}");
            if let Err(d) = r {
                assert_eq!(d.code, ErrorCode::MethodNotAllowed);
                assert_eq!(d.details["method"], "/x.Y/Z");
            }
        }
    }
}
