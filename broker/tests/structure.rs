//! The shape of the broker library (`broker/src`) and the binary's (`cli/src`), checked
//! on every test run (run it alone with
//! `cargo test -p eventtermq-broker --test structure -- --nocapture` to print the
//! module graphs):
//!
//! - no import circles: no top-level module uses one that uses it back (directly or
//!   through others), and within a module no submodule uses a sibling that uses it back
//!   (a submodule may use its parent's items);
//! - one door to other nodes: the broker builds gRPC clients only in `peers/`;
//! - `tonic::Status` appears only in `api/` (the server side) and `peers/` (the client
//!   side); the data path speaks `RequestError`.
//!
//! It reads the `use` lines and paths of the sources (comments stripped): a short
//! script, not a parser, so it errs on the side of seeing a reference.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The source trees checked: the broker library and the `eventtermq` binary's crate.
fn crates() -> [PathBuf; 2] {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    [here.join("src"), here.join("../cli/src")]
}

/// Every `.rs` file under `dir`, with its module path relative to the crate root.
fn files(dir: &Path, module: &[String], out: &mut Vec<(Vec<String>, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            let mut m = module.to_vec();
            m.push(name);
            files(&path, &m, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            if module.is_empty() && name == "main" {
                continue; // the binary, not the library
            }
            let mut m = module.to_vec();
            if !matches!(name.as_str(), "mod" | "lib") {
                m.push(name);
            }
            out.push((m, code_only(&std::fs::read_to_string(&path).unwrap())));
        }
    }
}

/// The source without line comments (doc comments mention paths that are not uses).
fn code_only(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Identifiers that follow `prefix` (e.g. `crate::`) in `code`, including those in a
/// `prefix{a, b::c}` group.
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `eventtermq_proto::...` when looking for `proto::`
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(group.split(',').map(|p| ident(p.trim())).filter(|p| !p.is_empty()));
        } else {
            let id = ident(rest);
            if !id.is_empty() {
                out.push(id);
            }
        }
    }
    out
}

/// Edges between top-level modules, and between sibling submodules of each module.
fn graphs(all: &[(Vec<String>, String)]) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let modules: BTreeSet<Vec<String>> = all.iter().map(|(m, _)| m.clone()).collect();
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (module, code) in all {
        let Some(top) = module.first() else { continue };
        let top_edges = out.entry("crate".into()).or_default().entry(top.clone()).or_default();
        // In a top-level module's own file, `super::x` is `crate::x`.
        let supers = if module.len() == 1 { paths_after(code, "super::") } else { Vec::new() };
        for target in paths_after(code, "crate::").into_iter().chain(supers) {
            if target != *top && modules.contains(&vec![target.clone()]) {
                top_edges.insert(target);
            }
        }
        // Siblings: `super::x` from `top::a`, or `crate::top::x`.
        if module.len() >= 2 {
            let from = module[1].clone();
            let mut targets = paths_after(code, "crate::")
                .into_iter()
                .filter(|t| t == top)
                .flat_map(|_| paths_after(code, &format!("crate::{top}::")))
                .collect::<Vec<_>>();
            if module.len() == 2 {
                targets.extend(paths_after(code, "super::"));
            }
            let edges = out.entry(top.clone()).or_default().entry(from.clone()).or_default();
            for t in targets {
                if t != from && modules.contains(&vec![top.clone(), t.clone()]) {
                    edges.insert(t);
                }
            }
        }
    }
    out
}

/// One cycle of `graph` if there is any, as the list of its nodes.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for next in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

fn sources_of(root: &Path) -> Vec<(Vec<String>, String)> {
    let mut all = Vec::new();
    files(root, &[], &mut all);
    all
}

/// The broker library's sources.
fn sources() -> Vec<(Vec<String>, String)> {
    sources_of(&crates()[0])
}

#[test]
fn no_import_circles() {
    let mut circles = Vec::new();
    for root in crates() {
        let name = root.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().to_string());
        let name = name.unwrap_or_default();
        for (scope, graph) in graphs(&sources_of(&root)) {
            println!("{name} {scope}:");
            for (from, to) in &graph {
                println!("  {from} -> {}", to.iter().cloned().collect::<Vec<_>>().join(", "));
            }
            if let Some(c) = cycle(&graph) {
                circles.push(format!("{name} {scope}: {}", c.join(" -> ")));
            }
        }
    }
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
}

/// Files (as `module/path`) whose code `matches`, outside the `allowed` top-level modules.
fn offenders(matches: impl Fn(&str) -> bool, allowed: &[&str]) -> Vec<String> {
    sources()
        .into_iter()
        .filter(|(m, code)| matches(code) && !m.first().is_some_and(|t| allowed.contains(&t.as_str())))
        .map(|(m, _)| m.join("/"))
        .collect()
}

fn uses_tonic_status(code: &str) -> bool {
    code.contains("tonic::Status")
        || code.lines().any(|l| l.trim_start().starts_with("use tonic::") && l.contains("Status"))
}

#[test]
fn grpc_clients_are_built_only_in_peers() {
    let found = offenders(|code| code.contains("Client::new"), &["peers"]);
    assert!(found.is_empty(), "gRPC clients built outside peers/: {found:?}");
}

#[test]
fn tonic_status_stays_in_api_and_peers() {
    let found = offenders(uses_tonic_status, &["api", "peers"]);
    assert!(found.is_empty(), "tonic::Status outside api/ and peers/: {found:?}");
}

#[test]
fn the_checks_see_what_they_look_for() {
    assert_eq!(paths_after("use crate::{a, b::c};\nlet x = crate::d::e;", "crate::"), ["a", "b", "d"]);
    assert_eq!(paths_after("eventtermq_proto::v1", "proto::"), Vec::<String>::new());
    let graph = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(cycle(&graph), Some(vec!["a".into(), "b".into(), "a".into()]));
    assert!(uses_tonic_status("use tonic::{Request, Status};") && !uses_tonic_status("use tonic::Request;"));
    assert!(crates().iter().all(|c| !sources_of(c).is_empty()));
}
