//! The two YAML documents an operator (or a management API) hands the sidecar: the sidecar
//! config and the ADM tool manifest. Both parsers must return errors, never panic, recurse
//! without bound or blow up on aliases.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match aesp_sidecar::config::Config::parse(&text, Path::new("/x/sidecar.yaml")) {
        Ok(c) => {
            // Relative paths resolve against the file's directory.
            assert!(c.tls.cert.is_absolute(), "{:?}", c.tls.cert);
            assert!(c.limits.max_message_bytes >= 1);
            let _ = format!("{c:?}");
        }
        Err(e) => {
            let s = e.to_string();
            assert!(s.starts_with("/x/sidecar.yaml: "), "{s}");
        }
    }
    match aesp_sidecar::adm::parse_manifest(&text) {
        Ok(decls) => {
            assert!(!decls.is_empty());
            // A manifest that parsed is valid by the crate's own rules.
            aesp_sidecar::adm::validate_declarations(&decls).expect("parsed but invalid");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
