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

/// Calls `path` with an empty message: what a client of a method the sidecar does not know
/// looks like.
pub async fn call_raw(channel: Channel, path: &str) -> Result<(), tonic::Status> {
    let path = http::uri::PathAndQuery::try_from(path)
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let mut g = tonic::client::Grpc::new(channel);
    g.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    g.unary(tonic::Request::new(()), path, codec)
        .await
        .map(|_| ())
}

/// A GRID client that reads responses as their AESP views (`EnterpriseError` in place of
/// `Error`), as an AESP-aware client does. Requests are the base GRID messages.
#[derive(Clone)]
pub struct AespGridClient {
    channel: Channel,
}

async fn ready(channel: &Channel) -> Result<tonic::client::Grpc<Channel>, tonic::Status> {
    let mut g = tonic::client::Grpc::new(channel.clone());
    g.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(g)
}

impl AespGridClient {
    pub fn new(channel: Channel) -> Self {
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
