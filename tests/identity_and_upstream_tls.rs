//! Identity from certificates without a SPIFFE ID, and a host reached over TLS.

mod common;

use aesp_sidecar::client::{self, AespGridClient, ClientTls};
use aesp_sidecar::demo::{certs, host};
use aesp_sidecar::proto::grid;

fn write(dir: &std::path::Path, name: &str, pem: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p
}

#[tokio::test]
async fn subject_mapping_gives_an_identity_and_unmapped_certificates_get_none() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs::Ca::new("test CA").unwrap();
    write(dir.path(), "ca.crt", &ca.cert_pem());
    common::permissive_rbac(dir.path());
    let server = ca.issue("localhost", None, &["localhost"], &[]).unwrap();
    write(dir.path(), "server.crt", &server.cert_pem);
    write(dir.path(), "server.key", &server.key_pem);
    let host = host::spawn(host::HostOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();
    let extra = "  subjects:\n    - subject_cn: legacy-billing\n      principal: billing\n      tenant: acme\n";
    let cfg = common::certificates_only(&common::config_text(
        &format!("http://{}", host.local_addr),
        "",
    ))
    .replace(
        "  organization_id: example-org\n",
        &format!("  organization_id: example-org\n{extra}"),
    );
    let p = write(dir.path(), "sidecar.yaml", &cfg);
    let sidecar =
        aesp_sidecar::sidecar::Sidecar::start(aesp_sidecar::config::Config::load(&p).unwrap())
            .await
            .unwrap();
    let endpoint = format!("https://127.0.0.1:{}", sidecar.data_addr.port());

    let tls_for = |leaf: &certs::Leaf| ClientTls {
        ca_pem: ca.cert_pem().into_bytes(),
        cert_pem: leaf.cert_pem.clone().into_bytes(),
        key_pem: leaf.key_pem.clone().into_bytes(),
        domain: "localhost".into(),
    };
    let mapped = ca.issue("legacy-billing", None, &[], &[]).unwrap();
    let c = AespGridClient::new(
        client::channel(&endpoint, Some(&tls_for(&mapped)))
            .await
            .unwrap(),
    );
    c.create_session(grid::CreateSession::default())
        .await
        .unwrap();
    let sc = host.state.security_contexts();
    assert_eq!(
        (sc[0].principal_id.as_str(), sc[0].tenant_id.as_str()),
        ("billing", "acme")
    );

    for leaf in [
        ca.issue("stranger", None, &[], &[]).unwrap(),
        // A SPIFFE ID of another trust domain, and one that does not follow the scheme.
        ca.issue(
            "x",
            Some("spiffe://elsewhere.example/tenant/acme/client/eve"),
            &[],
            &[],
        )
        .unwrap(),
        ca.issue("x", Some("spiffe://aesp.local/workload/eve"), &[], &[])
            .unwrap(),
    ] {
        let c = AespGridClient::new(
            client::channel(&endpoint, Some(&tls_for(&leaf)))
                .await
                .unwrap(),
        );
        let err = c
            .create_session(grid::CreateSession::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let e = client::enterprise_error(&err).unwrap();
        assert_eq!(e.code, "AUTHENTICATION_REQUIRED");
        assert!(!e.details["reason"].is_empty());
    }
    assert_eq!(common::denials(&sidecar, "AUTHENTICATION_REQUIRED"), 3);
    assert_eq!(
        host.state.security_contexts().len(),
        1,
        "refused calls never reached the host"
    );
    sidecar.shutdown().await;
    host.shutdown().await;
}

#[tokio::test]
async fn the_host_can_be_reached_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (files, _) = certs::ensure(dir.path()).unwrap();
    // The host presents the dev server certificate (localhost).
    let id = tonic::transport::Identity::from_pem(
        files.read("server.crt").unwrap(),
        files.read("server.key").unwrap(),
    );
    let host = host::spawn_tls(
        host::HostOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        },
        tonic::transport::ServerTlsConfig::new().identity(id),
    )
    .await
    .unwrap();
    let upstream = format!(
        "https://127.0.0.1:{}\n  ca: ca.crt\n  server_name: localhost",
        host.local_addr.port()
    );
    let cfg = common::certificates_only(&common::config_text(&upstream, ""));
    let p = dir.path().join("sidecar.yaml");
    std::fs::write(&p, cfg).unwrap();
    let sidecar =
        aesp_sidecar::sidecar::Sidecar::start(aesp_sidecar::config::Config::load(&p).unwrap())
            .await
            .unwrap();
    let tls = ClientTls::from_files(
        &files.path("ca.crt"),
        &files.path("acme.crt"),
        &files.path("acme.key"),
        "localhost",
    )
    .unwrap();
    let c = AespGridClient::new(
        client::channel(
            &format!("https://127.0.0.1:{}", sidecar.data_addr.port()),
            Some(&tls),
        )
        .await
        .unwrap(),
    );
    let ack = c
        .create_session(grid::CreateSession::default())
        .await
        .unwrap();
    assert!(!ack.session_id.is_empty());
    assert_eq!(host.state.security_contexts()[0].tenant_id, "acme");
    sidecar.shutdown().await;
    host.shutdown().await;
}
