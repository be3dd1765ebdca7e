//! The layering of `src/` (see the list in `src/lib.rs`): each top-level module may import only
//! from the modules its rule names, and the engines name no Kubernetes, AWS SDK or metrics
//! library type. Reads the source text; a wrong-way `crate::` path or a forbidden crate fails
//! the test with the file and line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const LEAVES: &[&str] = &["backoff", "error", "ratelimit", "topic", "vocab"];
/// Crates only the Kubernetes side may name.
const KUBE: &[&str] = &["kube", "k8s_openapi"];
/// Crates the engines must not name: they take plain values and traits.
const OUTSIDE_ENGINES: &[&str] = &[
    "kube",
    "k8s_openapi",
    "aws_sdk_iot",
    "aws_sdk_cognitoidentity",
    "aws_sdk_iam",
    "aws_config",
    "prometheus_client",
    "hyper",
];

struct Rule {
    module: &'static str,
    /// Crate modules it may import, besides its own.
    may_import: Vec<&'static str>,
    /// External crates it must not name.
    forbidden_crates: &'static [&'static str],
}

fn rules() -> Vec<Rule> {
    let with = |extra: &[&'static str]| {
        let mut v: Vec<&'static str> = LEAVES.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let mut rules: Vec<Rule> = LEAVES
        .iter()
        .map(|m| Rule {
            module: m,
            may_import: Vec::new(),
            forbidden_crates: OUTSIDE_ENGINES,
        })
        .collect();
    rules.extend([
        Rule {
            module: "policy",
            may_import: with(&[]),
            forbidden_crates: OUTSIDE_ENGINES,
        },
        Rule {
            module: "relay",
            may_import: with(&[]),
            forbidden_crates: OUTSIDE_ENGINES,
        },
        Rule {
            module: "telemetry",
            may_import: with(&["policy", "relay"]),
            forbidden_crates: KUBE,
        },
        Rule {
            module: "aws",
            may_import: with(&["policy", "relay", "telemetry"]),
            forbidden_crates: KUBE,
        },
        Rule {
            module: "api",
            may_import: with(&[]),
            forbidden_crates: &[],
        },
        Rule {
            module: "tenancy",
            may_import: with(&["api"]),
            forbidden_crates: KUBE,
        },
        Rule {
            module: "convert",
            may_import: with(&["policy", "relay", "telemetry", "aws", "api", "tenancy"]),
            forbidden_crates: KUBE,
        },
        Rule {
            module: "controller",
            may_import: with(&[
                "policy",
                "relay",
                "telemetry",
                "aws",
                "api",
                "tenancy",
                "convert",
                "install_crypto_provider",
            ]),
            forbidden_crates: &[],
        },
        Rule {
            module: "cli",
            may_import: with(&[
                "policy",
                "relay",
                "telemetry",
                "aws",
                "api",
                "tenancy",
                "convert",
                "controller",
                "install_crypto_provider",
            ]),
            forbidden_crates: &[],
        },
        Rule {
            module: "fuzzing",
            may_import: with(&["policy", "relay", "api", "tenancy", "convert"]),
            forbidden_crates: &[],
        },
    ]);
    rules
}

/// The code of a line without its `//` comment (string literals with `//` in them are rare
/// enough in this code base to live with; a false alarm names the line).
fn code(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// Crate modules a source text imports, with line numbers: `crate::x` and `crate::{x, y}`.
fn crate_imports(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    // Joined so that `crate::{` groups over several lines are read whole.
    let mut joined = String::new();
    let mut line_of = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for _ in 0..=code(line).len() {
            line_of.push(n + 1);
        }
        joined.push_str(code(line));
        joined.push('\n');
    }
    let mut at = 0;
    while let Some(i) = joined[at..].find("crate::") {
        let start = at + i;
        at = start + "crate::".len();
        // `iot_operator::crate` is not a thing; `$crate::` in macros is not ours either.
        if start > 0 && joined[..start].ends_with('$') {
            continue;
        }
        let rest = &joined[at..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            let mut offset = at + 1;
            for item in group[..end].split(',') {
                let lead = item.len() - item.trim_start().len();
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push((line_of[offset + lead], name));
                }
                offset += item.len() + 1;
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push((line_of[start], name));
        }
    }
    found
}

/// External crates a source text names, with line numbers.
fn crate_mentions(text: &str, crates: &[&str]) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = code(line);
        for c in crates {
            let pat = format!("{c}::");
            let mut at = 0;
            while let Some(i) = line[at..].find(&pat) {
                let start = at + i;
                let before = line[..start].chars().last();
                if !before.is_some_and(|b| b.is_alphanumeric() || b == '_' || b == ':') {
                    found.push((n + 1, (*c).to_owned()));
                }
                at = start + pat.len();
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None` for lib.rs and main.rs).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

/// Every breach of the rules in the given files: "file:line: what".
fn breaches(src: &Path, files: &[(PathBuf, String)]) -> Vec<String> {
    let rules = rules();
    let mut out = Vec::new();
    for (path, text) in files {
        let Some(module) = module_of(src, path) else {
            continue;
        };
        let shown = path.display();
        let Some(rule) = rules.iter().find(|r| r.module == module) else {
            out.push(format!(
                "{shown}: module `{module}` has no layering rule in tests/layers.rs"
            ));
            continue;
        };
        for (line, target) in crate_imports(text) {
            if target != module && !rule.may_import.contains(&target.as_str()) {
                out.push(format!(
                    "{shown}:{line}: `{module}` imports `crate::{target}`, which is not below it"
                ));
            }
        }
        for (line, c) in crate_mentions(text, rule.forbidden_crates) {
            out.push(format!("{shown}:{line}: `{module}` names the crate `{c}`"));
        }
    }
    out
}

#[test]
fn every_module_imports_only_from_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let files: Vec<(PathBuf, String)> = paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read source");
            (p, text)
        })
        .collect();
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|(p, _)| module_of(&src, p))
        .collect();
    assert!(
        modules.contains("relay") && modules.contains("policy") && modules.len() >= 12,
        "the check did not find the source tree: {modules:?}"
    );
    let found = breaches(&src, &files);
    assert!(found.is_empty(), "wrong-way imports:\n{}", found.join("\n"));
}

#[test]
fn the_check_sees_wrong_way_imports_and_forbidden_crates() {
    let src = Path::new("/x/src");
    let files = vec![
        (
            src.join("relay/connection.rs"),
            "use crate::topic::TopicFilter;\nuse crate::{vocab::Secret,\n  telemetry::Metrics};\n// crate::api in a comment\nfn f() { let _ = kube::Client::try_default; }\n".to_owned(),
        ),
        (src.join("api/x.rs"), "use crate::relay::Endpoint;\n".to_owned()),
        (src.join("controller/x.rs"), "use crate::api::X; use kube::Api;\n".to_owned()),
        (src.join("newthing.rs"), "\n".to_owned()),
    ];
    let found = breaches(src, &files);
    assert_eq!(
        found,
        vec![
            "/x/src/relay/connection.rs:3: `relay` imports `crate::telemetry`, which is not below it",
            "/x/src/relay/connection.rs:5: `relay` names the crate `kube`",
            "/x/src/api/x.rs:1: `api` imports `crate::relay`, which is not below it",
            "/x/src/newthing.rs: module `newthing` has no layering rule in tests/layers.rs",
        ]
    );
}

/// Sibling modules of one directory (`connection`, `shared`, ... in `src/relay/`) a file
/// imports, through `super::x` or `crate::<dir>::x` paths, outside its `#[cfg(test)]` part.
fn sibling_imports(dir_module: &str, text: &str, siblings: &BTreeSet<String>) -> BTreeSet<String> {
    let code_part = text.split("#[cfg(test)]").next().unwrap_or(text);
    let joined: String = code_part.lines().map(code).collect::<Vec<_>>().join("\n");
    let mut found = BTreeSet::new();
    let crate_prefix = format!("crate::{dir_module}::");
    for prefix in ["super::", crate_prefix.as_str()] {
        for (i, _) in joined.match_indices(prefix) {
            let rest = &joined[i + prefix.len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                group[..end]
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or("").trim())
                    .collect()
            } else {
                vec![
                    rest.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .next()
                        .unwrap_or(""),
                ]
            };
            for n in names {
                if siblings.contains(n) {
                    found.insert(n.to_owned());
                }
            }
        }
    }
    found
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn cycle(graph: &std::collections::BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &std::collections::BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut c = path[i..].to_vec();
            c.push(node.to_owned());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// The sibling-import graph of the files directly in `dir` (a module directory of `src/`).
fn sibling_graph(dir: &Path) -> std::collections::BTreeMap<String, BTreeSet<String>> {
    let module = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("module dir") {
        let p = entry.expect("entry").path();
        let name = if p.is_dir() {
            p.file_name().and_then(|n| n.to_str()).map(str::to_owned)
        } else {
            p.file_stem()
                .and_then(|n| n.to_str())
                .filter(|n| *n != "mod")
                .map(str::to_owned)
        };
        let file = if p.is_dir() {
            p.join("mod.rs")
        } else {
            p.clone()
        };
        if let Some(name) = name
            && file.exists()
        {
            files.push((name, file));
        }
    }
    let siblings: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
    files
        .iter()
        .map(|(name, file)| {
            let text = std::fs::read_to_string(file).expect("source");
            let mut imports = sibling_imports(module, &text, &siblings);
            imports.remove(name);
            (name.clone(), imports)
        })
        .collect()
}

#[test]
fn modules_within_a_layer_import_each_other_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for entry in std::fs::read_dir(&src).expect("src") {
        let dir = entry.expect("entry").path();
        if !dir.is_dir() {
            continue;
        }
        let graph = sibling_graph(&dir);
        checked += graph.len();
        if let Some(c) = cycle(&graph) {
            panic!("import cycle in {}: {}", dir.display(), c.join(" -> "));
        }
    }
    println!("{checked} modules in the layers' directories, no import cycle");
    assert!(checked > 30, "only {checked} modules seen");
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    let siblings: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let a = sibling_imports("relay", "use super::b::X;\n", &siblings);
    let b = sibling_imports(
        "relay",
        "use super::{c, Context};\nuse crate::relay::a::Y;\n",
        &siblings,
    );
    let c = sibling_imports(
        "relay",
        "// use super::a;\n#[cfg(test)]\nmod tests { use super::a; }\n",
        &siblings,
    );
    assert_eq!(b, ["a", "c"].iter().map(|s| s.to_string()).collect());
    assert!(c.is_empty(), "{c:?}");
    let graph = [("a", a), ("b", b), ("c", c)]
        .into_iter()
        .map(|(n, i)| (n.to_owned(), i))
        .collect();
    assert_eq!(
        cycle(&graph),
        Some(vec!["a".to_owned(), "b".to_owned(), "a".to_owned()])
    );
}
