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

/// The demo's configuration with every port picked by the OS and `upstream` at `upstream`.
pub fn config_text(upstream: &str, extra: &str) -> String {
    let mut t = demo::DEMO_CONFIG
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("127.0.0.1:9443", "127.0.0.1:0")
        .replace("http://127.0.0.1:50051", upstream)
        .replace("shutdown_grace_seconds: 5", "shutdown_grace_seconds: 10");
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
        Stack::start_edited(|t| t + extra, with_runtime).await
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

    pub fn tls(&self, stem: &str) -> ClientTls {
        ClientTls::from_files(
            &self.files.path("ca.crt"),
            &self.files.path(&format!("{stem}.crt")),
            &self.files.path(&format!("{stem}.key")),
            "localhost",
        )
        .unwrap()
    }

    /// A tonic channel through the sidecar with the certificate `stem` (acme, globex, ...).
    pub async fn channel(&self, stem: &str) -> Channel {
        client::channel(&self.endpoint, Some(&self.tls(stem)))
            .await
            .unwrap()
    }

    /// A plain h2c channel straight to the host, bypassing the sidecar.
    pub async fn direct(&self) -> Channel {
        client::channel(&format!("http://{}", self.host.local_addr), None)
            .await
            .unwrap()
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

    /// A raw HTTP/2 connection over mTLS, for frames no gRPC library would send.
    pub async fn raw(&self, stem: &str) -> RawH2 {
        RawH2::connect(self.sidecar.data_addr, self.client_config(Some(stem))).await
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

    pub async fn stop(self) {
        if let Some(rt) = self.runtime {
            rt.shutdown().await;
        }
        self.sidecar.shutdown().await;
        self.host.shutdown().await;
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
}

impl RawH2 {
    pub async fn connect(addr: std::net::SocketAddr, cc: rustls::ClientConfig) -> RawH2 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cc))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        RawH2 { sender }
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
        let mut req = Request::builder()
            .method("POST")
            .uri(format!("https://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .unwrap();
        self.sender.ready().await.unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req))
            .await
            .expect("response in time")
            .unwrap();
        let (parts, mut body) = resp.into_parts();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(f) = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("body in time")
        {
            let Ok(f) = f else { break };
            match f.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        RawResponse {
            headers: parts.headers,
            data,
            trailers,
        }
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
        .filter(|l| l.starts_with(&format!("{name}{{")))
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
