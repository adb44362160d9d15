//! The sidecar configurations shipped in `deploy/` stay valid as the config format evolves.

use aesp_sidecar::config::Config;
use std::path::Path;

fn check(text: &str, name: &str) -> Config {
    Config::parse(text, Path::new(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn shipped_configurations_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let envoy =
        std::fs::read_to_string(root.join("deploy/envoy/sidecar-behind-envoy.yaml")).unwrap();
    let c = check(&envoy, "sidecar-behind-envoy.yaml");
    assert_eq!(c.upstream.authority.as_str(), "127.0.0.1:10000");

    let cm =
        std::fs::read_to_string(root.join("deploy/kubernetes/sidecar-configmap.yaml")).unwrap();
    let mut found = 0;
    for doc in serde_norway::Deserializer::from_str(&cm) {
        let v: serde_norway::Value = serde::Deserialize::deserialize(doc).unwrap();
        if let Some(text) = v
            .get("data")
            .and_then(|d| d.get("sidecar.yaml"))
            .and_then(|t| t.as_str())
        {
            let c = check(text, "sidecar-configmap.yaml");
            assert_eq!(c.runtime.deployment_environment, "PROD");
            found += 1;
            // The RBAC seed it names ships in the same ConfigMap, and loads.
            let rbac = v
                .get("data")
                .and_then(|d| d.get("rbac.yaml"))
                .and_then(|t| t.as_str())
                .expect("the ConfigMap carries rbac.yaml");
            aesp_sidecar::authz::rbac::Rbac::parse(rbac, Path::new("rbac.yaml"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    assert_eq!(found, 1, "the ConfigMap carries sidecar.yaml");
    check(aesp_sidecar::demo::DEMO_CONFIG, "demo sidecar.yaml");
}
