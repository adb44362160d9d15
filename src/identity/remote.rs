//! An issuer's keys fetched over HTTPS: its JWK set at a `jwks_uri`, or found through its
//! OpenID Connect discovery document (`/.well-known/openid-configuration` → `jwks_uri`).
//!
//! - HTTPS only: `http://` is refused when the configuration is loaded, and so is a
//!   discovery document whose `jwks_uri` is not `https://`. Redirects are not followed.
//! - Every request (the discovery document, then the JWK set) has a timeout
//!   (`auth.fetch_timeout_seconds`) covering connect, TLS, headers and body, and a body
//!   larger than [`MAX_BODY`] is refused.
//! - The IdP's certificate must chain to the issuer's `ca_file`, or else to the system's
//!   roots.
//! - The discovery document's `issuer` must equal the configured issuer exactly (OpenID
//!   Connect Discovery 1.0, §4.3): a document naming another issuer is refused.
//! - A JWK set is taken when at least one of its keys is usable: encryption keys
//!   (`"use": "enc"`) are left out, and keys of unsupported types or algorithms are left out
//!   with a warning; a set with no usable key, an unparsable body, a wrong status or a
//!   mismatched issuer is an error, and the keys in force stay (a bad answer never replaces
//!   good keys).
//!
//! [`keep_fresh`] runs for each such issuer: it fetches at start, again every
//! `auth.jwks_refresh_seconds`, when a token names a `kid` the issuer does not know (at most
//! once every 10 s), and, while the issuer has no keys at all (the IdP was down at start),
//! with a backoff from 1 s up to a minute. Fetches happen off the request path: a token
//! whose `kid` is unknown is refused (`INVALID_CREDENTIALS`) and wakes the fetch; once the
//! new keys are in, the same token verifies.

use crate::identity::token::{Issuer, KeyError, Verifier, VerifyKey};
use crate::metrics::Metrics;
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The largest discovery document or JWK set accepted: 1 MiB.
pub const MAX_BODY: usize = 1024 * 1024;

/// The least time between two fetches woken by unknown `kid`s.
pub const KID_REFETCH_INTERVAL: Duration = Duration::from_secs(10);

/// The longest wait between two fetches while an issuer has no keys at all.
const NO_KEYS_RETRY_MAX: Duration = Duration::from_secs(60);

/// Where an issuer's keys are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The JWK set itself.
    JwksUri(Uri),
    /// The discovery document, whose `jwks_uri` names the JWK set.
    Discovery(Uri),
}

impl Location {
    pub fn url(&self) -> &Uri {
        match self {
            Location::JwksUri(u) | Location::Discovery(u) => u,
        }
    }
}

/// Why a URL is not one keys may be fetched from.
pub fn check_url(text: &str) -> Result<Uri, String> {
    let uri: Uri = text
        .parse()
        .map_err(|e| format!("expected an https:// URL, got {text:?}: {e}"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            return Err(format!(
                "expected an https:// URL, got {text:?}: keys fetched over plain HTTP could be replaced by anyone on the path"
            ));
        }
        _ => return Err(format!("expected an https:// URL, got {text:?}")),
    }
    let Some(authority) = uri.authority() else {
        return Err(format!(
            "expected an https:// URL with a host, got {text:?}"
        ));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "expected an https:// URL without user information, got {text:?}"
        ));
    }
    if authority.host().is_empty() {
        return Err(format!(
            "expected an https:// URL with a host, got {text:?}"
        ));
    }
    Ok(uri)
}

/// Why a fetch did not give keys.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: no complete answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("{url}: cannot connect: {why}")]
    Connect { url: String, why: String },
    #[error("{url}: TLS handshake failed: {why}")]
    Tls { url: String, why: String },
    #[error("{url}: HTTP exchange failed: {why}")]
    Http { url: String, why: String },
    #[error("{url}: answered HTTP {status}, expected 200")]
    Status { url: String, status: u16 },
    #[error("{url}: the body is larger than {MAX_BODY} bytes")]
    TooLarge { url: String },
    #[error("{url}: not an OpenID Connect discovery document: {why}")]
    NotDiscovery { url: String, why: String },
    #[error(
        "{url}: the discovery document names issuer {got:?}, not the configured {want:?}; its keys are not trusted"
    )]
    IssuerMismatch {
        url: String,
        got: String,
        want: String,
    },
    #[error("{url}: the discovery document's jwks_uri is not usable: {why}")]
    BadJwksUri { url: String, why: String },
    #[error(transparent)]
    Keys(#[from] KeyError),
}

/// An issuer's published keys: where they are, how to reach them, and the wake-up a token
/// with an unknown `kid` sends to [`keep_fresh`].
#[derive(Debug)]
pub struct RemoteKeys {
    pub location: Location,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    wake: tokio::sync::Notify,
}

/// Aborts a spawned task when dropped (the connection driver of a fetch that timed out).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(serde::Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl RemoteKeys {
    /// `tls` trusts the IdP's CA (see [`crate::tls::idp_client_config`]).
    pub fn new(location: Location, tls: Arc<rustls::ClientConfig>, timeout: Duration) -> Self {
        RemoteKeys {
            location,
            tls,
            timeout,
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Asks [`keep_fresh`] for a fetch (a token named an unknown `kid`). Never blocks.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The issuer's keys now: the discovery document first when there is one, then the JWK
    /// set it names.
    pub async fn fetch(&self, issuer: &str) -> Result<Vec<VerifyKey>, FetchError> {
        let jwks_uri = match &self.location {
            Location::JwksUri(u) => u.clone(),
            Location::Discovery(u) => {
                let body = self.get(u).await?;
                let doc: Discovery =
                    serde_json::from_slice(&body).map_err(|e| FetchError::NotDiscovery {
                        url: u.to_string(),
                        why: e.to_string(),
                    })?;
                if doc.issuer != issuer {
                    return Err(FetchError::IssuerMismatch {
                        url: u.to_string(),
                        got: doc.issuer,
                        want: issuer.to_string(),
                    });
                }
                check_url(&doc.jwks_uri).map_err(|why| FetchError::BadJwksUri {
                    url: u.to_string(),
                    why,
                })?
            }
        };
        let body = self.get(&jwks_uri).await?;
        let text = std::str::from_utf8(&body).map_err(|e| KeyError::NotJwks {
            path: jwks_uri.to_string(),
            why: e.to_string(),
        })?;
        Ok(parse_published_jwks(text, &jwks_uri.to_string())?)
    }

    /// The body of a `GET url` answered 200, within the timeout and [`MAX_BODY`].
    async fn get(&self, url: &Uri) -> Result<Bytes, FetchError> {
        match tokio::time::timeout(self.timeout, self.get_unbounded(url)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout {
                url: url.to_string(),
                secs: self.timeout.as_secs(),
            }),
        }
    }

    async fn get_unbounded(&self, url: &Uri) -> Result<Bytes, FetchError> {
        let u = || url.to_string();
        let authority = url.authority().ok_or_else(|| FetchError::Connect {
            url: u(),
            why: "no host".into(),
        })?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(443);
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| FetchError::Connect {
                url: u(),
                why: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
            FetchError::Tls {
                url: u(),
                why: format!("{host:?} is not a server name: {e}"),
            }
        })?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| FetchError::Tls {
                url: u(),
                why: e.to_string(),
            })?;
        let http = |e: hyper::Error| FetchError::Http {
            url: u(),
            why: e.to_string(),
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
                .await
                .map_err(http)?;
        let _driver = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let req = http::Request::get(path)
            .header(http::header::HOST, authority.as_str())
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("aesp-sidecar/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| FetchError::Http {
                url: u(),
                why: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        if resp.status() != http::StatusCode::OK {
            return Err(FetchError::Status {
                url: u(),
                status: resp.status().as_u16(),
            });
        }
        let declared = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return Err(FetchError::TooLarge { url: u() });
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge { url: u() }
                } else {
                    FetchError::Http {
                        url: u(),
                        why: e.to_string(),
                    }
                }
            })?;
        Ok(body.to_bytes())
    }
}

/// The usable signature keys of a JWK set an IdP publishes (see the module doc). `origin`
/// names it in errors and logs.
pub fn parse_published_jwks(text: &str, origin: &str) -> Result<Vec<VerifyKey>, KeyError> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_str(text).map_err(|e| KeyError::NotJwks {
        path: origin.to_string(),
        why: e.to_string(),
    })?;
    let mut keys = Vec::with_capacity(set.keys.len());
    let mut left_out = Vec::new();
    for (index, value) in set.keys.into_iter().enumerate() {
        let kid = value
            .get("kid")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("no kid")
            .to_string();
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(j) => j,
            Err(e) => {
                left_out.push(format!("key {index} ({kid}): {e}"));
                continue;
            }
        };
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        match VerifyKey::from_jwk(&jwk) {
            Ok(k) => keys.push(k),
            Err(why) => left_out.push(format!("key {index} ({kid}): {why}")),
        }
    }
    if !left_out.is_empty() {
        tracing::warn!(jwks = %origin, left_out = ?left_out, "keys of the JWK set that cannot verify tokens were left out");
    }
    if keys.is_empty() {
        return Err(KeyError::Empty {
            path: origin.to_string(),
        });
    }
    Ok(keys)
}

/// The `kid`s of a key set, for logs.
fn kids(keys: &[VerifyKey]) -> Vec<String> {
    keys.iter()
        .map(|k| k.kid.clone().unwrap_or_else(|| "(no kid)".into()))
        .collect()
}

/// Keeps the keys of `verifier.issuers()[index]` (an issuer with [`RemoteKeys`]) fresh until
/// `shutdown`: see the module doc for when it fetches. `every` zero: no periodic fetch.
/// `first` is told when the first fetch has ended, whatever its outcome.
pub async fn keep_fresh(
    verifier: Arc<Verifier>,
    index: usize,
    every: Duration,
    metrics: Arc<Metrics>,
    first: tokio::sync::oneshot::Sender<()>,
    shutdown: CancellationToken,
) {
    let Some(issuer) = verifier.issuers().get(index) else {
        return;
    };
    let Some(remote) = issuer.remote() else {
        return;
    };
    let name = issuer.issuer.as_str();
    let ok = metrics.jwks_fetches.with_label_values(&[name, "ok"]);
    let failed = metrics.jwks_fetches.with_label_values(&[name, "error"]);
    let in_force = metrics.jwks_keys.with_label_values(&[name]);
    let mut first = Some(first);
    let mut retry = Duration::from_secs(1);
    loop {
        let started = tokio::time::Instant::now();
        let fetched = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = remote.fetch(name) => r,
        };
        match fetched {
            Ok(keys) => {
                ok.inc();
                retry = Duration::from_secs(1);
                let before = kids(&issuer.keys());
                let after = kids(&keys);
                in_force.set(i64::try_from(keys.len()).unwrap_or(i64::MAX));
                issuer.set_keys(keys);
                if before != after {
                    tracing::info!(issuer = %name, from = %remote.location.url(), kids = ?after, "issuer keys fetched");
                }
            }
            Err(e) => {
                failed.inc();
                log_failure(issuer, &e);
            }
        }
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
        // Wake-ups that came while fetching are answered by this fetch.
        let _ = tokio::time::timeout(Duration::ZERO, remote.wake.notified()).await;
        let wait = if issuer.keys().is_empty() {
            let w = retry;
            retry = (retry * 2).min(NO_KEYS_RETRY_MAX);
            Some(w)
        } else if every.is_zero() {
            None
        } else {
            Some(every)
        };
        let next = wait.map(|w| tokio::time::Instant::now() + w);
        let scheduled = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = scheduled => {}
            _ = remote.wake.notified() => {
                // An unknown kid: fetch now, or once the rate limit allows (and no later
                // than the fetch already scheduled).
                let at = started + KID_REFETCH_INTERVAL;
                let at = next.map_or(at, |n| n.min(at));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
        }
    }
}

fn log_failure(issuer: &Issuer, e: &FetchError) {
    let n = issuer.keys().len();
    if n == 0 {
        tracing::warn!(issuer = %issuer.issuer, error = %e, "cannot fetch the issuer's keys; it has none yet, so its tokens are refused (INVALID_CREDENTIALS) until a fetch succeeds; retrying");
    } else {
        tracing::warn!(issuer = %issuer.issuer, error = %e, keys_in_force = n, "cannot fetch the issuer's keys; keeping the keys in force");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_with_a_host_are_accepted() {
        assert!(check_url("https://idp.example/.well-known/openid-configuration").is_ok());
        assert!(check_url("https://127.0.0.1:8443/jwks").is_ok());
        let e = check_url("http://idp.example/jwks").unwrap_err();
        assert!(e.contains("https://") && e.contains("plain HTTP"), "{e}");
        assert!(check_url("ftp://idp.example/jwks").is_err());
        assert!(check_url("/jwks").is_err());
        assert!(check_url("https://user:pw@idp.example/jwks").is_err());
        assert!(check_url("not a url").is_err());
    }

    #[test]
    fn a_published_set_keeps_its_signature_keys_and_leaves_out_the_rest() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let enc = jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let mut sig = serde_json::to_value(
            Jwk::from_encoding_key(&enc, jsonwebtoken::Algorithm::ES256).unwrap(),
        )
        .unwrap();
        sig["kid"] = "sig-1".into();
        let mut encryption = sig.clone();
        encryption["kid"] = "enc-1".into();
        encryption["use"] = "enc".into();
        let set = serde_json::json!({"keys": [
            sig,
            encryption,
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "AKP", "alg": "ML-DSA-44", "kid": "future", "pub": "AAAA"},
        ]});
        let keys = parse_published_jwks(&set.to_string(), "test").unwrap();
        assert_eq!(kids(&keys), ["sig-1"]);
        // Nothing usable, or not a set: an error (the keys in force stay).
        let none = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
        assert!(matches!(
            parse_published_jwks(&none.to_string(), "test"),
            Err(KeyError::Empty { .. })
        ));
        assert!(matches!(
            parse_published_jwks("<html>", "test"),
            Err(KeyError::NotJwks { .. })
        ));
        assert!(matches!(
            parse_published_jwks("{\"keys\": []}", "test"),
            Err(KeyError::Empty { .. })
        ));
    }
}
