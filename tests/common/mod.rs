//! The test stack: dev certificates from rcgen, the reference GRID host on loopback h2c, the
//! sidecar in front of it with mTLS 1.3, and the reference runtime connected through the
//! sidecar, all on 127.0.0.1 with ports picked by the OS.

#![allow(dead_code)]

use aesp_sidecar::client::{self, ClientTls};
use aesp_sidecar::config::Config;
use aesp_sidecar::demo::{self, certs, host, runtime};
use aesp_sidecar::sidecar::Sidecar;
use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub files: certs::DevFiles,
    pub host: host::HostHandle,
    pub sidecar: Sidecar,
    pub runtime: Option<runtime::RuntimeHandle>,
    pub endpoint: String,
}

/// `text` (a config) with tokens required of nobody: peers authenticate by certificate
/// alone. For tests of certificate identity and of HTTP/2 behaviour.
pub fn certificates_only(text: &str) -> String {
    let start = text.find("\nauth:\n").expect("an auth section") + 1;
    let end = start + text[start..].find("\nrbac:\n").expect("rbac follows auth") + 1;
    format!(
        "{}auth:\n  tokens_required: []\n{}",
        &text[..start],
        &text[end..]
    )
}

/// An RBAC file for tests of other CAs and identities: every client may open sessions, run
/// any tool and call any pass-through method in its own tenant; every runtime may connect.
pub const PERMISSIVE_RBAC: &str = "\
roles:
  - name: anything
    permissions: [grid.session.create, grid.session.destroy, grid.tool.execute, \"tool:*:execute\", \"passthrough:*\"]
  - name: runtime
    permissions: [grid.runtime.connect]
bindings:
  - {kind: client, tenant: \"*\", roles: [anything]}
  - {kind: runtime, tenant: \"*\", roles: [runtime]}
";

/// Writes [`PERMISSIVE_RBAC`] as `dir/rbac.yaml`, and the demo's tool contracts and host
/// manifest (`tool-contracts.yaml`, `grid-manifest.yaml`) its `governance:` section names.
pub fn permissive_rbac(dir: &std::path::Path) {
    std::fs::write(dir.join("rbac.yaml"), PERMISSIVE_RBAC).unwrap();
    std::fs::write(dir.join("tool-contracts.yaml"), certs::CONTRACTS_SEED).unwrap();
    std::fs::write(dir.join("grid-manifest.yaml"), certs::HOST_MANIFEST).unwrap();
}

/// The demo's configuration with every port picked by the OS and `upstream` at `upstream`.
/// `extra` is appended; a leading `limits:` block in it is merged into the demo's `limits:`
/// section (for example `"limits:\n  idle_timeout_seconds: 1\n"`), and likewise a leading
/// `tls:` block into the demo's `tls:` section.
pub fn config_text(upstream: &str, extra: &str) -> String {
    let t = demo::DEMO_CONFIG
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("127.0.0.1:9443", "127.0.0.1:0")
        .replace("http://127.0.0.1:50051", upstream)
        .replace("shutdown_grace_seconds: 5", "shutdown_grace_seconds: 10");
    with_extra(t, extra)
}

/// `t` with `extra` appended; a leading `limits:` or `tls:` block of `extra` is merged into
/// that section of `t` instead.
pub fn with_extra(mut t: String, extra: &str) -> String {
    let mut extra = extra;
    for (section, anchor) in [("limits:\n", "limits:\n"), ("tls:\n", "tls:\n")] {
        if let Some(rest) = extra.strip_prefix(section) {
            let end = rest
                .lines()
                .take_while(|l| l.starts_with("  "))
                .map(|l| l.len() + 1)
                .sum::<usize>()
                .min(rest.len());
            t = t.replacen(anchor, &format!("{anchor}{}", &rest[..end]), 1);
            extra = &rest[end..];
        }
    }
    t.push_str(extra);
    t
}

/// `text` with `lines` (each indented, ending in a newline) inserted at the top of its
/// top-level section `section` (`limits`, `tls`, ...), for keys inside sections the demo
/// config already has. Panics when there is no such section.
pub fn in_section(text: &str, section: &str, lines: &str) -> String {
    let head = format!("\n{section}:");
    let at = text
        .find(&head)
        .unwrap_or_else(|| panic!("no {section}: section in the config"));
    let eol = at
        + 1
        + text[at + 1..]
            .find('\n')
            .expect("a newline after the section")
        + 1;
    format!("{}{lines}{}", &text[..eol], &text[eol..])
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with("", true).await
    }

    /// `extra` is appended to the sidecar's YAML (top-level keys not already present).
    pub async fn start_with(extra: &str, with_runtime: bool) -> Stack {
        Stack::start_edited(|t| with_extra(t, extra), with_runtime).await
    }

    /// The sidecar's YAML is the test config passed through `edit` (see [`in_section`]).
    pub async fn start_edited(edit: impl FnOnce(String) -> String, with_runtime: bool) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = certs::ensure(dir.path()).unwrap();
        let host = host::spawn(host::HostOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
        let cfg_path = dir.path().join("sidecar.yaml");
        std::fs::write(
            &cfg_path,
            edit(config_text(&format!("http://{}", host.local_addr), "")),
        )
        .unwrap();
        let cfg = Config::load(&cfg_path).unwrap();
        let sidecar = Sidecar::start(cfg).await.unwrap();
        Stack::assemble(dir, files, host, sidecar, with_runtime).await
    }

    /// Starts again on the directory of a stopped stack (its certificates, `sidecar.yaml`
    /// and `state/` kept): a new reference host, the sidecar pointed at it, and the
    /// reference runtime when `with_runtime`.
    pub async fn restart(dir: tempfile::TempDir, with_runtime: bool) -> Stack {
        let (files, _) = certs::ensure(dir.path()).unwrap();
        let host = host::spawn(host::HostOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
        let cfg_path = dir.path().join("sidecar.yaml");
        let text = std::fs::read_to_string(&cfg_path).unwrap();
        let text = regex::Regex::new(r"address: http://127\.0\.0\.1:\d+")
            .unwrap()
            .replace(
                &text,
                format!("address: http://{}", host.local_addr).as_str(),
            )
            .into_owned();
        std::fs::write(&cfg_path, text).unwrap();
        let sidecar = Sidecar::start(Config::load(&cfg_path).unwrap())
            .await
            .unwrap();
        Stack::assemble(dir, files, host, sidecar, with_runtime).await
    }

    /// The stack of a started host and sidecar, with the reference runtime connected through
    /// the sidecar when `with_runtime`.
    async fn assemble(
        dir: tempfile::TempDir,
        files: certs::DevFiles,
        host: host::HostHandle,
        sidecar: Sidecar,
        with_runtime: bool,
    ) -> Stack {
        let endpoint = format!("https://127.0.0.1:{}", sidecar.data_addr.port());
        let mut stack = Stack {
            dir,
            files,
            host,
            sidecar,
            runtime: None,
            endpoint,
        };
        if with_runtime {
            let t = stack.tls("runtime");
            let rt = runtime::spawn(runtime::RuntimeOptions {
                endpoint: stack.endpoint.clone(),
                tls: Some(runtime::RuntimeTls {
                    ca_pem: t.ca_pem,
                    cert_pem: t.cert_pem,
                    key_pem: t.key_pem,
                    domain: t.domain,
                }),
                runtime_id: "acme-runtime-1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
            rt.wait_announced(Duration::from_secs(10)).await.unwrap();
            stack.runtime = Some(rt);
        }
        stack
    }

    /// A tonic channel to the management listener with the certificate `stem` and its
    /// demo token.
    pub async fn management(&self, stem: &str) -> client::GridChannel {
        let ep = format!(
            "https://127.0.0.1:{}",
            self.sidecar.management_addr.unwrap().port()
        );
        let ch = client::channel(&ep, Some(&self.tls(stem))).await.unwrap();
        client::with_token(ch, self.token(stem).as_deref()).unwrap()
    }

    pub fn tls(&self, stem: &str) -> ClientTls {
        ClientTls::from_files(
            &self.files.path("ca.crt"),
            &self.files.path(&format!("{stem}.crt")),
            &self.files.path(&format!("{stem}.key")),
            "localhost",
        )
        .unwrap()
    }

    /// The demo token of `stem` (`acme.jwt`, ...), if there is one.
    pub fn token(&self, stem: &str) -> Option<String> {
        std::fs::read_to_string(self.files.path(&format!("{stem}.jwt")))
            .ok()
            .map(|t| t.trim().to_string())
    }

    /// A tonic channel through the sidecar with the certificate `stem` (acme, globex, ...)
    /// and its demo token, as a client of the demo would call.
    pub async fn channel(&self, stem: &str) -> client::GridChannel {
        let ch = client::channel(&self.endpoint, Some(&self.tls(stem)))
            .await
            .unwrap();
        client::with_token(ch, self.token(stem).as_deref()).unwrap()
    }

    /// The same without a token.
    pub async fn channel_without_token(&self, stem: &str) -> Channel {
        client::channel(&self.endpoint, Some(&self.tls(stem)))
            .await
            .unwrap()
    }

    /// A plain h2c channel straight to the host, bypassing the sidecar (no token).
    pub async fn direct(&self) -> client::GridChannel {
        let ch = client::channel(&format!("http://{}", self.host.local_addr), None)
            .await
            .unwrap();
        client::with_token(ch, None).unwrap()
    }

    pub fn client_config(&self, stem: Option<&str>) -> rustls::ClientConfig {
        let ca = std::fs::read(self.files.path("ca.crt")).unwrap();
        let pair = stem.map(|s| {
            (
                std::fs::read(self.files.path(&format!("{s}.crt"))).unwrap(),
                std::fs::read(self.files.path(&format!("{s}.key"))).unwrap(),
            )
        });
        aesp_sidecar::tls::client_config_from_pem(&ca, pair.as_ref().map(|(c, k)| (&c[..], &k[..])))
            .unwrap()
    }

    /// A raw HTTP/2 connection over mTLS, for frames no gRPC library would send. Its calls
    /// carry the demo token of `stem` unless they set `authorization` themselves.
    pub async fn raw(&self, stem: &str) -> RawH2 {
        let mut r = RawH2::connect(self.sidecar.data_addr, self.client_config(Some(stem))).await;
        r.token = self.token(stem);
        r
    }

    /// Opens `GridRuntime/Connect` as runtime `stem`, sends `data` as one DATA frame, keeps
    /// the stream open until the host has seen an announcement (or 2 s passed) plus
    /// `linger`, then ends it and returns everything the runtime received.
    pub async fn connect_runtime_raw(
        &self,
        stem: &str,
        headers: &[(&'static str, &'static str)],
        data: Vec<u8>,
        linger: Duration,
    ) -> RawResponse {
        let mut raw = self.raw(stem).await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(Ok(http_body::Frame::data(Bytes::from(data))))
            .await
            .unwrap();
        let headers = headers.to_vec();
        let call = tokio::spawn(async move {
            raw.call_streaming("/altar.grid.v1.GridRuntime/Connect", &headers, rx)
                .await
        });
        for _ in 0..100 {
            if !self.host.state.announcements().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(linger).await;
        drop(tx);
        call.await.unwrap()
    }

    /// Stops everything; the directory (certificates, `state/`) is handed back, still there.
    pub async fn stop(self) -> tempfile::TempDir {
        if let Some(rt) = self.runtime {
            rt.shutdown().await;
        }
        self.sidecar.shutdown().await;
        self.host.shutdown().await;
        self.dir
    }
}

/// What came back on a raw call.
#[derive(Debug)]
pub struct RawResponse {
    pub headers: HeaderMap,
    pub data: Vec<u8>,
    pub trailers: Option<HeaderMap>,
}

impl RawResponse {
    /// `grpc-status` from the trailers, or from the headers of a trailers-only response.
    pub fn grpc_status(&self) -> Option<i32> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok())
    }

    pub fn enterprise_error(&self) -> Option<aesp_sidecar::proto::aesp::EnterpriseError> {
        let v = self
            .trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status-details-bin"))
            .or_else(|| self.headers.get("grpc-status-details-bin"))?;
        aesp_sidecar::grpc::status::decode_enterprise_error(v.as_bytes())
    }

    /// The gRPC messages of the response body.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut d = aesp_sidecar::grpc::FrameDecoder::new(1 << 24);
        let mut out = Vec::new();
        d.push(Bytes::from(self.data.clone()), &mut out).unwrap();
        out.iter().map(|m| m.payload().to_vec()).collect()
    }
}

type RawBody = http_body_util::StreamBody<
    tokio_stream::wrappers::ReceiverStream<
        Result<http_body::Frame<Bytes>, std::convert::Infallible>,
    >,
>;

pub struct RawH2 {
    sender: hyper::client::conn::http2::SendRequest<RawBody>,
    /// Sent as `authorization: Bearer` unless a call sets `authorization` itself (an empty
    /// value there sends none).
    pub token: Option<String>,
}

impl RawH2 {
    pub async fn connect(addr: std::net::SocketAddr, cc: rustls::ClientConfig) -> RawH2 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cc))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        RawH2::over(tls).await
    }

    /// HTTP/2 over an established TLS connection.
    pub async fn over(tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> RawH2 {
        let (sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        RawH2 {
            sender,
            token: None,
        }
    }

    /// Sends `chunks` as separate DATA frames on `path` and collects the whole response.
    pub async fn call(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        chunks: Vec<Vec<u8>>,
    ) -> RawResponse {
        let (tx, rx) = tokio::sync::mpsc::channel(chunks.len().max(1));
        for c in chunks {
            tx.send(Ok(http_body::Frame::data(Bytes::from(c))))
                .await
                .unwrap();
        }
        drop(tx);
        self.call_streaming(path, headers, rx).await
    }

    pub async fn call_streaming(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        rx: tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, std::convert::Infallible>>,
    ) -> RawResponse {
        self.try_call_streaming(path, headers, rx)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`RawH2::call`], with a connection that fails (closed by the sidecar, say) as an
    /// error instead of a panic.
    pub async fn try_call(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        chunks: Vec<Vec<u8>>,
    ) -> Result<RawResponse, String> {
        let (tx, rx) = tokio::sync::mpsc::channel(chunks.len().max(1));
        for c in chunks {
            tx.send(Ok(http_body::Frame::data(Bytes::from(c))))
                .await
                .map_err(|e| e.to_string())?;
        }
        drop(tx);
        self.try_call_streaming(path, headers, rx).await
    }

    pub async fn try_call_streaming(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        rx: tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, std::convert::Infallible>>,
    ) -> Result<RawResponse, String> {
        let mut req = Request::builder()
            .method("POST")
            .uri(format!("https://localhost{path}"))
            .header("te", "trailers");
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("content-type", "application/grpc");
        }
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            && let Some(t) = &self.token
        {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            if k.eq_ignore_ascii_case("authorization") && v.is_empty() {
                continue;
            }
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .map_err(|e| format!("request: {e}"))?;
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req))
            .await
            .map_err(|_| "no response in time".to_string())?
            .map_err(|e| format!("request failed: {e}"))?;
        let (parts, mut body) = resp.into_parts();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(f) = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .map_err(|_| "no body in time".to_string())?
        {
            let Ok(f) = f else { break };
            match f.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        Ok(RawResponse {
            headers: parts.headers,
            data,
            trailers,
        })
    }
}

/// Frames `payload` as one uncompressed gRPC message.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    aesp_sidecar::grpc::frame::encode_frame(payload).to_vec()
}

/// The value of counter `name` whose labels include every `(label, value)` of `labels`, as
/// the sidecar's `/metrics` renders it (0 when the series was never touched).
pub fn counter(sidecar: &Sidecar, name: &str, labels: &[(&str, &str)]) -> u64 {
    let text = sidecar.metrics.render();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `aesp_denials_total` for `code`.
pub fn denials(sidecar: &Sidecar, code: &str) -> u64 {
    counter(sidecar, "aesp_denials_total", &[("code", code)])
}

/// `GET path` on the admin port (plain HTTP/1.1): the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}
