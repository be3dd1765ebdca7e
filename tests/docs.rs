//! The documentation a newcomer reads: every relative link of README.md, BENCHMARKS.md and
//! docs/*.md points at a file that exists, and every `#anchor` at a heading of that file.

#[path = "support/markdown.rs"]
mod markdown;

use std::path::{Path, PathBuf};

use markdown::anchors;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn documents() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md"), root().join("BENCHMARKS.md")];
    for entry in std::fs::read_dir(root().join("docs")).expect("docs/") {
        let p = entry.expect("entry").path();
        if p.extension().is_some_and(|e| e == "md") {
            files.push(p);
        }
    }
    files
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let link = regex::Regex::new(r"\]\(([^)\s]+)\)").expect("regex");
    let mut checked = 0;
    let mut broken = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("document");
        for c in link.captures_iter(&text) {
            let target = &c[1];
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (path, frag) = target.split_once('#').unwrap_or((target, ""));
            let file = if path.is_empty() {
                doc.clone()
            } else {
                doc.parent().expect("dir").join(path)
            };
            checked += 1;
            if !file.exists() {
                broken.push(format!("{}: {target} (no such file)", doc.display()));
            } else if !frag.is_empty() && !anchors(&file).iter().any(|a| a == frag) {
                broken.push(format!("{}: {target} (no such heading)", doc.display()));
            }
        }
    }
    println!("docs: {checked} relative links checked");
    assert!(checked > 20, "only {checked} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_keeps_what_a_newcomer_needs() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    for section in [
        "## Install",
        "## Quickstart",
        "## Documentation",
        "## Development",
    ] {
        assert!(
            readme.lines().any(|l| l.starts_with(section)),
            "README has no {section}"
        );
    }
    assert!(readme.contains("bash tests/run.sh"), "the test command");
}
