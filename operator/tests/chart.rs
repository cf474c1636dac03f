//! The Helm chart ships copies of the CRDs (`charts/eventtermq/crds/`, Helm's
//! install-before-templates directory). They must stay byte-equal to `crds/`, which the
//! `crds` test keeps equal to the Rust types.
//!
//! `UPDATE_CRDS=1 cargo test -p eventter-operator --test crds` writes both.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Names of the `*.yaml` files in `dir`.
fn yaml_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .collect()
}

#[test]
fn chart_crds_are_the_repository_crds() {
    let repo_crds = repo_root().join("crds");
    let chart_crds = repo_root().join("charts").join("eventtermq").join("crds");
    let expected = yaml_files(&repo_crds);
    assert!(!expected.is_empty(), "no CRD files in {}", repo_crds.display());
    assert_eq!(
        yaml_files(&chart_crds),
        expected,
        "charts/eventtermq/crds/ must hold exactly the files of crds/; run `cp crds/*.yaml charts/eventtermq/crds/`"
    );
    for file in &expected {
        let want = std::fs::read(repo_crds.join(file)).unwrap();
        let have = std::fs::read(chart_crds.join(file)).unwrap();
        assert!(
            have == want,
            "charts/eventtermq/crds/{file} differs from crds/{file}; run `cp crds/*.yaml charts/eventtermq/crds/`"
        );
    }
}
