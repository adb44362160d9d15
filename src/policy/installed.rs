//! The set in force: the policies of the files (`policies.path`, hot-reloaded) and those
//! managed through `EnterprisePolicyService` (persisted in the control store), merged into
//! the one [`PolicySet`] every call reads. Either half is replaced on its own; the merge is
//! rebuilt and swapped in whole, under one lock, so a file reload never drops the API's
//! policies and an API change never drops the files'. An id in both halves is refused: the
//! half being replaced keeps its previous value and the set in force stays as it was.

use super::{PolicyErrors, PolicySet};
use arc_swap::ArcSwap;
use std::sync::{Arc, Mutex};

/// Both halves and where their merge is put in force.
pub struct Installed {
    halves: Mutex<Halves>,
    into: Arc<ArcSwap<PolicySet>>,
}

struct Halves {
    files: Arc<PolicySet>,
    api: Arc<PolicySet>,
}

impl std::fmt::Debug for Installed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installed")
            .field("in_force", &self.into.load())
            .finish_non_exhaustive()
    }
}

impl Installed {
    /// Merges `files` and `api` and puts the merge in force in `into`; refused (nothing put
    /// in force) when an id is in both.
    pub fn new(
        files: Arc<PolicySet>,
        api: Arc<PolicySet>,
        into: Arc<ArcSwap<PolicySet>>,
    ) -> Result<Installed, PolicyErrors> {
        let merged = PolicySet::merged(&files, &api)?;
        into.store(Arc::new(merged));
        Ok(Installed {
            halves: Mutex::new(Halves { files, api }),
            into,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Halves> {
        // A panic while the lock was held left both halves as they were (they are replaced
        // only after the merge succeeded), so the state is usable.
        self.halves.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file policies now.
    pub fn files(&self) -> Arc<PolicySet> {
        self.lock().files.clone()
    }

    /// The API-managed policies now.
    pub fn api(&self) -> Arc<PolicySet> {
        self.lock().api.clone()
    }

    /// The merged set in force now.
    pub fn in_force(&self) -> Arc<PolicySet> {
        self.into.load_full()
    }

    /// Replaces the file half (a reload); refused when it clashes with the API's ids.
    pub fn set_files(&self, files: Arc<PolicySet>) -> Result<(), PolicyErrors> {
        let mut h = self.lock();
        let merged = PolicySet::merged(&files, &h.api)?;
        self.into.store(Arc::new(merged));
        h.files = files;
        Ok(())
    }

    /// Replaces the API half with what `change` makes of it; refused when the result
    /// clashes with the files' ids (or `change` refuses).
    pub fn update_api<E: From<PolicyErrors>>(
        &self,
        change: impl FnOnce(&PolicySet) -> Result<PolicySet, E>,
    ) -> Result<(), E> {
        let mut h = self.lock();
        let api = Arc::new(change(&h.api)?);
        let merged = PolicySet::merged(&h.files, &api)?;
        self.into.store(Arc::new(merged));
        h.api = api;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    fn set(yaml: &str, origin: &str) -> Arc<PolicySet> {
        let ps = parse(yaml, origin).unwrap_or_else(|e| panic!("{e}"));
        Arc::new(PolicySet::new(ps).unwrap_or_else(|e| panic!("{e}")))
    }

    fn ids(s: &PolicySet) -> Vec<String> {
        s.policies().iter().map(|p| p.id().to_string()).collect()
    }

    const A: &str = "policies:\n  - {id: a, effect: DENY, condition: 'true'}\n";
    const B: &str = "policies:\n  - {id: b, effect: DENY, condition: 'false'}\n";
    const AC: &str = "policies:\n  - {id: a, effect: DENY, condition: 'false'}\n  - {id: c, effect: DENY, condition: 'false'}\n";

    #[test]
    fn either_half_is_replaced_without_dropping_the_other_and_clashes_are_refused() {
        let into = Arc::new(ArcSwap::from_pointee(PolicySet::empty()));
        let inst = Installed::new(set(A, "f.yaml"), set(B, "api"), into.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ids(&into.load()), ["a", "b"]);

        // A file reload that clashes with the API's `b`: refused, nothing changes.
        let e = inst
            .set_files(set(B, "g.yaml"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate id"), "{e}");
        assert_eq!(ids(&into.load()), ["a", "b"]);
        assert_eq!(ids(&inst.files()), ["a"]);

        // A file reload without clash keeps the API's policies.
        inst.set_files(Arc::new(PolicySet::empty()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ids(&into.load()), ["b"]);

        // An API change that clashes with the files is refused; one that does not applies.
        inst.set_files(set(AC, "f.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let r: Result<(), PolicyErrors> = inst.update_api(|api| {
            let p = parse(A, "api").unwrap_or_else(|e| panic!("{e}"));
            Ok(api.with(p.into_iter().next().unwrap_or_else(|| panic!("one"))))
        });
        assert!(r.is_err());
        assert_eq!(ids(&into.load()), ["a", "b", "c"]);
        assert_eq!(ids(&inst.api()), ["b"]);
        let r: Result<(), PolicyErrors> = inst.update_api(|api| Ok(api.without("b")));
        assert!(r.is_ok());
        assert_eq!(ids(&inst.in_force()), ["a", "c"]);

        // A clash at start is refused.
        assert!(Installed::new(set(A, "f.yaml"), set(A, "api"), into).is_err());
    }
}
