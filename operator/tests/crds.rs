//! The CRD files under `crds/` must be what the Rust types generate (drift check),
//! and every field must be documented for `kubectl explain`.
//!
//! After changing the types: `UPDATE_CRDS=1 cargo test -p eventter-operator --test crds`
//! (writes `crds/` and the chart's copies, `charts/eventtermq/crds/`).

use std::path::PathBuf;

use eventter_operator::crd::{all_crds, crd_files};

fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("crds")
}

#[test]
fn crd_files_match_the_rust_types() {
    let update = std::env::var_os("UPDATE_CRDS").is_some();
    for (file, generated) in crd_files().unwrap() {
        let path = crds_dir().join(file);
        if update {
            std::fs::write(&path, &generated).unwrap();
            std::fs::write(crds_dir().join("../charts/eventtermq/crds").join(file), &generated).unwrap();
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "crds/{file} differs from the generated CRD; regenerate with \
             `UPDATE_CRDS=1 cargo test -p eventter-operator --test crds`"
        );
    }
}

/// Walks a schema and collects the paths of properties without a description.
fn undocumented(schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, property) in properties {
            let path = format!("{path}.{name}");
            if property.get("description").is_none() {
                out.push(path.clone());
            }
            undocumented(property, &path, out);
        }
    }
    if let Some(items) = schema.get("items") {
        undocumented(items, &format!("{path}[]"), out);
    }
}

#[test]
fn every_field_is_documented() {
    for crd in all_crds() {
        let value = serde_json::to_value(&crd).unwrap();
        let schema = &value["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = Vec::new();
        for part in ["spec", "status"] {
            undocumented(&schema["properties"][part], part, &mut missing);
        }
        assert!(missing.is_empty(), "{}: fields without description: {missing:?}", crd.spec.names.kind);
    }
}

#[test]
fn crds_have_status_subresource_short_names_and_columns() {
    for crd in all_crds() {
        let version = &crd.spec.versions[0];
        assert_eq!(crd.spec.group, "eventter.io");
        assert_eq!(version.name, "v1alpha1");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        assert!(!crd.spec.names.short_names.clone().unwrap_or_default().is_empty());
        assert!(version.additional_printer_columns.as_ref().is_some_and(|c| c.len() >= 3));
    }
}

#[test]
fn immutable_fields_carry_cel_rules() {
    let topic = serde_json::to_value(&all_crds()[1]).unwrap();
    let spec = &topic["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    for field in ["clusterRef", "namespace", "replicationFactor"] {
        let rules = &spec["properties"][field]["x-kubernetes-validations"];
        assert_eq!(rules[0]["rule"], "self == oldSelf", "{field}");
    }
    assert!(spec["x-kubernetes-validations"][0]["rule"].as_str().unwrap().contains("oldSelf.name"));
}

#[test]
fn optional_enums_list_no_null() {
    for (file, yaml) in crd_files().unwrap() {
        assert!(!yaml.contains("- null"), "{file} lists null in an enum");
        assert!(yaml.contains("nullable: true"), "{file}");
    }
}

/// `kubectl scale` and a HorizontalPodAutoscaler go through the scale subresource:
/// spec.replicas, the pods there are (status.replicas) and their selector.
#[test]
fn eventter_cluster_has_the_scale_subresource() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(eventter_operator::crd::EventterCluster::crd()).unwrap();
    let scale = &crd["spec"]["versions"][0]["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
}
