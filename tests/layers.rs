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
