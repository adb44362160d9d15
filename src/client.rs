//! Client side helpers shared by `aesp call`, the demo scenario and the tests: an mTLS
//! channel to the sidecar and the decoding of its rich errors.

use crate::grpc::status::ENTERPRISE_ERROR_TYPE_URL;
use crate::proto::aesp::EnterpriseError;
use crate::proto::rpc;
use anyhow::Context;
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Client TLS material in PEM.
#[derive(Clone)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The name the server certificate must carry (`localhost` for the dev set).
    pub domain: String,
}

impl ClientTls {
    pub fn from_files(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
        domain: &str,
    ) -> anyhow::Result<Self> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        };
        Ok(ClientTls {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            domain: domain.to_string(),
        })
    }
}

/// A `ToolCall` of `tool` with JSON object `args` in `session`.
pub fn tool_call(
    session: &str,
    tool: &str,
    args: &serde_json::Value,
) -> Result<crate::proto::grid::ToolCall, String> {
    Ok(crate::proto::grid::ToolCall {
        session_id: session.to_string(),
        function_call: Some(crate::proto::adm::FunctionCall {
            name: tool.to_string(),
            args: Some(crate::adm::json_to_struct(args)?),
            call_id: String::new(),
        }),
        ..Default::default()
    })
}

/// A tonic channel to `endpoint` (`https://...` with `tls`, or `http://...` without).
pub async fn channel(endpoint: &str, tls: Option<&ClientTls>) -> anyhow::Result<Channel> {
    crate::tls::install_default_provider();
    let mut ep = Channel::from_shared(endpoint.to_string())
        .with_context(|| format!("invalid endpoint {endpoint}"))?;
    if let Some(t) = tls {
        ep = ep
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&t.ca_pem))
                    .identity(Identity::from_pem(&t.cert_pem, &t.key_pem))
                    .domain_name(t.domain.clone()),
            )
            .context("invalid TLS configuration")?;
    }
    ep.connect()
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))
}

/// Adds `authorization: Bearer <token>` to every request, when there is a token.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel whose requests carry a bearer token (or none).
pub type GridChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// `channel` with `token` (the JWT itself, surrounding whitespace ignored) on every request.
pub fn with_token(channel: Channel, token: Option<&str>) -> anyhow::Result<GridChannel> {
    let bearer = match token.map(str::trim) {
        None | Some("") => Bearer(None),
        Some(t) => {
            let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?;
            v.set_sensitive(true);
            Bearer(Some(v))
        }
    };
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel, bearer,
    ))
}

/// The `EnterpriseError` in a status's `grpc-status-details-bin`, if any.
pub fn enterprise_error(status: &tonic::Status) -> Option<EnterpriseError> {
    let s = rpc::Status::decode(status.details()).ok()?;
    s.details
        .iter()
        .find(|a| a.type_url == ENTERPRISE_ERROR_TYPE_URL)
        .and_then(|a| EnterpriseError::decode(&a.value[..]).ok())
}

/// One line per field of an `EnterpriseError`, for people.
pub fn describe(e: &EnterpriseError) -> String {
    let mut out = format!(
        "EnterpriseError {}: {}\n  correlation_id: {}",
        e.code, e.message, e.correlation_id
    );
    let mut details: Vec<_> = e.details.iter().collect();
    details.sort();
    for (k, v) in details {
        out.push_str(&format!("\n  details.{k}: {v}"));
    }
    for (k, v) in [
        ("compliance_impact", &e.compliance_impact),
        ("security_implication", &e.security_implication),
        ("remediation_steps", &e.remediation_steps),
    ] {
        if !v.is_empty() {
            out.push_str(&format!("\n  {k}: {v}"));
        }
    }
    out
}

/// Describes a failed call: its gRPC status and the decoded `EnterpriseError`.
pub fn describe_status(status: &tonic::Status) -> String {
    match enterprise_error(status) {
        Some(e) => format!("gRPC {:?}\n{}", status.code(), describe(&e)),
        None => format!("gRPC {:?}: {}", status.code(), status.message()),
    }
}

/// `parts` joined by ": " without the consecutive repeats nested transport errors make
/// ("invalid peer certificate: UnknownIssuer: invalid peer certificate: UnknownIssuer").
fn join_causes(parts: impl IntoIterator<Item = String>) -> String {
    let mut out: Vec<String> = Vec::new();
    for p in parts {
        if out.last().is_some_and(|last| last.ends_with(&p)) {
            continue;
        }
        out.push(p);
    }
    out.join(": ")
}

/// An error and its `source()` chain on one line, outermost first, without repeats.
pub fn error_chain<'a>(
    chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    join_causes(chain.into_iter().map(|e| e.to_string()))
}

/// The transport error under a status, if the status did not come from the server but
/// from the connection (tonic keeps the hyper / rustls / io error as its source).
pub fn transport_cause(status: &tonic::Status) -> Option<String> {
    let first = std::error::Error::source(status)?;
    Some(error_chain(std::iter::successors(Some(first), |e| {
        e.source()
    })))
}

/// Whether the first certificate in `pem` is a CA certificate (basic constraints CA:TRUE),
/// which no server accepts as a client certificate (rustls: `CaUsedAsEndEntity`).
pub fn is_ca_certificate(pem: &[u8]) -> bool {
    use rustls_pki_types::pem::PemObject;
    let Some(Ok(der)) = rustls_pki_types::CertificateDer::pem_slice_iter(pem).next() else {
        return false;
    };
    x509_parser::parse_x509_certificate(&der)
        .ok()
        .and_then(|(_, c)| c.basic_constraints().ok().flatten().map(|b| b.value.ca))
        .unwrap_or(false)
}

/// `host:port` of an `http(s)://` endpoint.
fn authority(endpoint: &str) -> Option<(String, u16)> {
    let uri: http::Uri = endpoint.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Some((host.to_string(), port))
}

const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether the server at `endpoint` answers an HTTP/2 preface with a TLS record (an alert):
/// a plaintext client talking to a TLS port.
async fn speaks_tls(endpoint: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some((host, port)) = authority(endpoint) else {
        return false;
    };
    let probe = async {
        let mut tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut first = [0u8; 1];
        tcp.read_exact(&mut first).await?;
        // TLS record content types: 21 = alert, 22 = handshake.
        Ok::<bool, std::io::Error>(matches!(first[0], 21 | 22))
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Ok(true))
    )
}

/// Repeats the TLS handshake with `tls` outside tonic and waits briefly for the server's
/// verdict on the client certificate (in TLS 1.3 it comes after the client's handshake is
/// done, as the first thing read): the server's refusal, e.g. "received fatal alert:
/// CertificateUnknown", or `None` when the server accepted.
async fn tls_refusal(endpoint: &str, tls: &ClientTls) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let (host, port) = authority(endpoint)?;
    let cc = crate::tls::client_config_from_pem(&tls.ca_pem, Some((&tls.cert_pem, &tls.key_pem)))
        .ok()?;
    let name = rustls_pki_types::ServerName::try_from(tls.domain.clone()).ok()?;
    let probe = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let mut s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cc))
            .connect(name, tcp)
            .await?;
        let mut first = [0u8; 1];
        s.read(&mut first).await.map(|_| ())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Err(e)) => Some(e.to_string()),
        _ => None,
    }
}

/// What to do about an error connecting to `endpoint`, given its cause chain as text.
pub fn connect_hint(chain: &str, endpoint: &str) -> Option<String> {
    let hint = if chain.contains("Connection refused") {
        format!(
            "nothing listens at {endpoint}: is the sidecar running (`aesp demo`, `aesp serve`)? --endpoint picks another address"
        )
    } else if chain.contains("UnknownIssuer") {
        "--ca must be the CA that issued the server's certificate (the demo's: ca.crt)".into()
    } else if chain.contains("not valid for name") {
        "--domain must be a name the server's certificate carries (the demo's: localhost)".into()
    } else if chain.contains("KeyMismatch") || chain.contains("keys may not be consistent") {
        "--key is not the private key of --cert".into()
    } else if chain.contains("HttpsUriWithoutTlsSupport") || chain.contains("InvalidContentType") {
        "the endpoint does not speak TLS: use http:// for a plaintext (h2c) server".into()
    } else {
        return None;
    };
    Some(format!("hint: {hint}"))
}

/// For a call that failed in the transport (not a denial or a tool error): the underlying
/// cause and a hint, one `  cause: ...` / `  hint: ...` line each. `cert_file` names the
/// client certificate in the hint. Probes the endpoint again to find out what tonic's error
/// does not say (its cause is often only "connection closed").
pub async fn explain_transport_failure(
    status: &tonic::Status,
    endpoint: &str,
    tls: Option<&ClientTls>,
    cert_file: &std::path::Path,
) -> Option<String> {
    let cause = transport_cause(status)?;
    let mut lines = vec![format!("  cause: {cause}")];
    if endpoint.starts_with("http://") {
        if speaks_tls(endpoint).await {
            lines.push(format!(
                "  hint: the endpoint speaks TLS: use https:// ({})",
                endpoint.replacen("http://", "https://", 1)
            ));
        }
        return Some(lines.join("\n"));
    }
    let Some(t) = tls else {
        return Some(lines.join("\n"));
    };
    let Some(refusal) = tls_refusal(endpoint, t).await else {
        return Some(lines.join("\n"));
    };
    if !cause.contains(&refusal) {
        lines.push(format!(
            "  cause: the server ended the TLS connection: {refusal}"
        ));
    }
    if is_ca_certificate(&t.cert_pem) {
        lines.push(format!(
            "  hint: the server refused the client certificate: {} is a CA certificate \
             (CaUsedAsEndEntity); use a leaf certificate issued by that CA (the demo's: \
             acme.crt, globex.crt, runtime.crt, admin.crt)",
            cert_file.display()
        ));
    } else if refusal.contains("alert") {
        lines.push(format!(
            "  hint: the server refused the client certificate {}: it must be a leaf \
             certificate issued by a CA the sidecar trusts (tls.client_ca)",
            cert_file.display()
        ));
    }
    Some(lines.join("\n"))
}

/// Calls `path` with an empty message: what a client of a method the sidecar does not know
/// looks like.
pub async fn call_raw<C>(channel: C, path: &str) -> Result<(), tonic::Status>
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <C::ResponseBody as http_body::Body>::Error: Into<tonic::codegen::StdError>,
{
    let path = http::uri::PathAndQuery::try_from(path)
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let mut g = tonic::client::Grpc::new(channel);
    g.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.into().to_string()))?;
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    g.unary(tonic::Request::new(()), path, codec)
        .await
        .map(|_| ())
}

/// A GRID client that reads responses as their AESP views (`EnterpriseError` in place of
/// `Error`), as an AESP-aware client does. Requests are the base GRID messages.
#[derive(Clone)]
pub struct AespGridClient {
    channel: GridChannel,
}

async fn ready(channel: &GridChannel) -> Result<tonic::client::Grpc<GridChannel>, tonic::Status> {
    let mut g = tonic::client::Grpc::new(channel.clone());
    g.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(g)
}

impl AespGridClient {
    /// A client without a token.
    pub fn new(channel: Channel) -> Self {
        AespGridClient {
            channel: tonic::service::interceptor::InterceptedService::new(
                channel,
                Bearer::default(),
            ),
        }
    }

    /// A client whose calls carry a bearer token.
    pub fn with_token(channel: GridChannel) -> Self {
        AespGridClient { channel }
    }

    async fn unary<Q, R>(
        &self,
        path: &'static str,
        req: tonic::Request<Q>,
    ) -> Result<R, tonic::Status>
    where
        Q: Message + Send + Sync + 'static,
        R: Message + Default + Send + Sync + 'static,
    {
        let mut g = ready(&self.channel).await?;
        let codec = tonic_prost::ProstCodec::<Q, R>::default();
        g.unary(req, http::uri::PathAndQuery::from_static(path), codec)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn create_session(
        &self,
        req: impl tonic::IntoRequest<crate::proto::grid::CreateSession>,
    ) -> Result<crate::proto::aesp::EnterpriseCreateSessionAck, tonic::Status> {
        self.unary("/altar.grid.v1.GridHost/CreateSession", req.into_request())
            .await
    }

    pub async fn destroy_session(
        &self,
        req: impl tonic::IntoRequest<crate::proto::grid::DestroySession>,
    ) -> Result<crate::proto::aesp::EnterpriseDestroySessionAck, tonic::Status> {
        self.unary("/altar.grid.v1.GridHost/DestroySession", req.into_request())
            .await
    }

    pub async fn execute_tool(
        &self,
        req: impl tonic::IntoRequest<crate::proto::grid::ToolCall>,
    ) -> Result<crate::proto::aesp::EnterpriseToolResult, tonic::Status> {
        self.unary("/altar.grid.v1.GridHost/ExecuteTool", req.into_request())
            .await
    }

    pub async fn execute_tool_stream(
        &self,
        req: impl tonic::IntoRequest<crate::proto::grid::ToolCall>,
    ) -> Result<tonic::Streaming<crate::proto::aesp::EnterpriseStreamChunk>, tonic::Status> {
        let mut g = ready(&self.channel).await?;
        let codec = tonic_prost::ProstCodec::<
            crate::proto::grid::ToolCall,
            crate::proto::aesp::EnterpriseStreamChunk,
        >::default();
        g.server_streaming(
            req.into_request(),
            http::uri::PathAndQuery::from_static("/altar.grid.v1.GridHost/ExecuteToolStream"),
            codec,
        )
        .await
        .map(tonic::Response::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_drop_the_repeats_that_nested_transport_errors_make() {
        let parts = [
            "cannot connect to https://127.0.0.1:8443",
            "transport error",
            "invalid peer certificate: UnknownIssuer",
            "invalid peer certificate: UnknownIssuer",
            "UnknownIssuer",
        ];
        assert_eq!(
            join_causes(parts.map(String::from)),
            "cannot connect to https://127.0.0.1:8443: transport error: invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn a_ca_certificate_is_told_from_a_leaf() {
        let ca = crate::demo::certs::Ca::new("test CA").unwrap();
        let leaf = ca.issue("leaf", None, &["localhost"], &[]).unwrap();
        assert!(is_ca_certificate(ca.cert_pem().as_bytes()));
        assert!(!is_ca_certificate(leaf.cert_pem.as_bytes()));
        assert!(!is_ca_certificate(b"not a certificate"));
    }

    #[test]
    fn connect_errors_get_a_hint_naming_the_flag_to_fix() {
        let e = "https://127.0.0.1:1";
        for (chain, flag) in [
            (
                "tcp connect error: Connection refused (os error 111)",
                "--endpoint",
            ),
            ("invalid peer certificate: UnknownIssuer", "--ca"),
            ("certificate not valid for name \"x\"", "--domain"),
            ("keys may not be consistent: KeyMismatch", "--key"),
        ] {
            let hint = connect_hint(chain, e).unwrap();
            assert!(hint.starts_with("hint: ") && hint.contains(flag), "{hint}");
        }
        assert_eq!(connect_hint("something else", e), None);
    }

    #[test]
    fn endpoints_give_host_and_port() {
        assert_eq!(
            authority("https://127.0.0.1:8443"),
            Some(("127.0.0.1".into(), 8443))
        );
        assert_eq!(authority("http://[::1]:50051"), Some(("::1".into(), 50051)));
        assert_eq!(
            authority("https://localhost"),
            Some(("localhost".into(), 443))
        );
    }
}
