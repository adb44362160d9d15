//! Policies from files: one YAML file, or every `*.yaml` / `*.yml` of a directory (not its
//! subdirectories), in name order. A file, and so the whole set, is refused with every error
//! found; [`PolicySource::reload`] returns a new set only when the files changed and load, so
//! the caller keeps the set in force otherwise.

use super::engine::{Policy, PolicyError, PolicyErrors, PolicySet};
use super::spec::PolicyFile;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest policy file read, in bytes.
pub const MAX_FILE_LEN: u64 = 4 * 1024 * 1024;

/// The policies of one file's text; `file` names it in the errors. Every policy is
/// compiled; every error is reported.
pub fn parse(text: &str, file: &str) -> Result<Vec<Policy>, PolicyErrors> {
    let doc: PolicyFile = serde_norway::from_str(text).map_err(|e| PolicyError::Syntax {
        origin: file.to_string(),
        message: e.to_string(),
    })?;
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for (i, spec) in doc.policies.into_iter().enumerate() {
        match Policy::compile(spec, format!("{file}: policies[{i}]")) {
            Ok(p) => policies.push(p),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(PolicyErrors(errors))
    }
}

/// The files `path` stands for: itself, or the YAML files of the directory in name order.
pub fn files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let read_err = |e: std::io::Error| PolicyError::Read {
        origin: path.display().to_string(),
        message: e.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        let p = entry.map_err(read_err)?.path();
        let yaml = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml");
        if yaml && p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn read(file: &Path) -> Result<String, PolicyError> {
    let origin = file.display().to_string();
    let meta = std::fs::metadata(file).map_err(|e| PolicyError::Read {
        origin: origin.clone(),
        message: e.to_string(),
    })?;
    if meta.len() > MAX_FILE_LEN {
        return Err(PolicyError::Read {
            origin,
            message: format!("larger than {MAX_FILE_LEN} bytes"),
        });
    }
    std::fs::read_to_string(file).map_err(|e| PolicyError::Read {
        origin,
        message: e.to_string(),
    })
}

/// Loads a file or a directory into a set: all its policies, or every error of every file.
pub fn load(path: &Path) -> Result<PolicySet, PolicyErrors> {
    load_with_digest(path).map(|(set, _)| set)
}

fn load_with_digest(path: &Path) -> Result<(PolicySet, [u8; 32]), PolicyErrors> {
    let files = files(path)?;
    let mut digest = Sha256::new();
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for f in &files {
        match read(f) {
            Ok(text) => {
                digest.update(f.display().to_string().as_bytes());
                digest.update([0]);
                digest.update(text.as_bytes());
                digest.update([0]);
                match parse(&text, &f.display().to_string()) {
                    Ok(ps) => policies.extend(ps),
                    Err(e) => errors.extend(e.0),
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    let set = PolicySet::new(policies)?;
    Ok((set, digest.finalize().into()))
}

/// A file or directory of policies, and what was last loaded from it.
#[derive(Debug)]
pub struct PolicySource {
    path: PathBuf,
    digest: Option<[u8; 32]>,
}

impl PolicySource {
    /// Loads `path` for the first time.
    pub fn open(path: &Path) -> Result<(PolicySource, Arc<PolicySet>), PolicyErrors> {
        let (set, digest) = load_with_digest(path)?;
        tracing::info!(path = %path.display(), policies = set.len(), "policies loaded");
        Ok((
            PolicySource {
                path: path.to_path_buf(),
                digest: Some(digest),
            },
            Arc::new(set),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Forgets what was last loaded, so the next [`PolicySource::reload`] hands back the
    /// set even when the files did not change (a set that loaded but could not be put in
    /// force, an id clash with the API's policies, is reported again at the next check).
    pub fn forget(&mut self) {
        self.digest = None;
    }

    /// Reads the files again: `Ok(Some(set))` when they changed and load, `Ok(None)` when
    /// they are as last loaded, `Err` when they do not load (keep the set in force; the
    /// same broken files are reported again at the next call).
    pub fn reload(&mut self) -> Result<Option<Arc<PolicySet>>, PolicyErrors> {
        let (set, digest) = load_with_digest(&self.path)?;
        if self.digest == Some(digest) {
            return Ok(None);
        }
        self.digest = Some(digest);
        tracing::info!(path = %self.path.display(), policies = set.len(), "policies reloaded");
        Ok(Some(Arc::new(set)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "policies:\n  - {id: a, effect: DENY, condition: 'true'}\n";
    const OTHER: &str = "policies:\n  - {id: b, effect: DENY, condition: 'false'}\n";
    const BROKEN: &str = "policies:\n  - {id: c, effect: DENY, condition: 'nope == 1'}\n";

    #[test]
    fn reload_hands_back_a_set_only_when_the_files_changed_and_load() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, GOOD).unwrap_or_else(|e| panic!("{e}"));
        let (mut source, set) = PolicySource::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.policies()[0].id(), "a");
        // Unchanged: nothing new.
        assert!(matches!(source.reload(), Ok(None)));
        // Broken: an error naming the file, the policy and the position; nothing replaced.
        std::fs::write(&file, BROKEN).unwrap_or_else(|e| panic!("{e}"));
        let e = source.reload().map(|_| ()).unwrap_err().to_string();
        assert!(
            e.contains("p.yaml: policies[0]: policy \"c\": condition 1:1"),
            "{e}"
        );
        // Still broken: still an error (the caller keeps its set and reports again).
        assert!(source.reload().is_err());
        // Fixed and changed: the new set.
        std::fs::write(&file, OTHER).unwrap_or_else(|e| panic!("{e}"));
        let new = source.reload().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            new.map(|s| s.policies()[0].id().to_string()),
            Some("b".into())
        );
        // A new file in the directory is a change too.
        std::fs::write(dir.path().join("q.yml"), GOOD).unwrap_or_else(|e| panic!("{e}"));
        let new = source.reload().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(new.map(|s| s.len()), Some(2));
    }

    #[test]
    fn a_missing_path_and_an_unreadable_file_are_errors() {
        let e = load(Path::new("/nonexistent/policies"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/policies: cannot read"), "{e}");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("bad.yaml"), "policies: [")
            .unwrap_or_else(|e| panic!("{e}"));
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("bad.yaml: "), "{e}");
    }

    #[test]
    fn the_shipped_example_set_loads() {
        let set = load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/policies/cel"
        )))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.len(), 11);
    }

    #[test]
    fn a_set_is_shared_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<PolicySet>();
        shareable::<arc_swap::ArcSwap<PolicySet>>();
    }
}
