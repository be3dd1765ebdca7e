#!/usr/bin/env python3
"""Counts a maintainer watches in src/ (tests modules left out), for reviews of the code's shape:

- errors turned into text: `map_err(|e| ...)` closures that format `e` and do not keep it as a
  source (`Source::new`, `caused_by`, `with`, `#[source]` fields take it whole);
- functions of 100 lines or more;
- log calls that name the object themselves (`bridge = ` / `binding = ` in the call), against
  `#[instrument]` spans that name it once.

Usage: python3 scripts/code_counts.py [src-dir]   (heuristic: reads the text, no parser)
"""
import os
import re
import sys


def sources(root):
    for d, _, files in os.walk(root):
        for f in sorted(files):
            if f.endswith(".rs"):
                path = os.path.join(d, f)
                text = open(path, encoding="utf-8").read()
                cut = text.find("#[cfg(test)]\nmod tests")
                yield path, text if cut < 0 else text[:cut]


def closure_body(text, start):
    depth, k = 1, start
    while depth and k < len(text):
        depth += {"(": 1, ")": -1}.get(text[k], 0)
        k += 1
    return text[start:k]


def errors_to_text(root):
    hits = []
    for path, text in sources(root):
        for m in re.finditer(r"map_err\(\s*\|(\w+)\|", text):
            v = m.group(1)
            body = closure_body(text, m.start() + len("map_err("))
            formats = re.search(rf"\b{v}\.to_string\(\)|\{{{v}\}}|chain\(&{v}\)|{v}\.kind\(\)\.to_string", body)
            keeps = re.search(rf"Source::new\({v}\)|caused_by\([^;]*\b{v}\)|with\([^;]*\b{v}\)", body)
            if formats and not keeps:
                hits.append(f"{path}:{text[:m.start()].count(chr(10)) + 1}")
    return hits


def long_functions(root, limit=100):
    found = []
    for path, text in sources(root):
        lines = text.split("\n")
        i = 0
        while i < len(lines):
            line = lines[i]
            if re.match(r"\s*(pub(\([^)]*\))?\s+)?(async\s+)?fn\s+\w+", line):
                depth, started, j = 0, False, i
                while j < len(lines):
                    for ch in lines[j]:
                        if ch == "{":
                            depth, started = depth + 1, True
                        elif ch == "}":
                            depth -= 1
                    if started and depth == 0 or not started and lines[j].rstrip().endswith(";"):
                        break
                    j += 1
                if started and j - i + 1 >= limit:
                    found.append((j - i + 1, f"{path}:{i + 1} {line.strip()[:60]}"))
                i = j + 1 if started else i + 1
            else:
                i += 1
    return sorted(found, reverse=True)


def log_keys(root):
    calls = keyed = spans = 0
    for _, text in sources(root):
        calls += len(re.findall(r"tracing::(?:info|warn|debug|error|trace)!\(", text))
        keyed += len(re.findall(r"tracing::(?:info|warn|debug|error|trace)!\(\s*(?:bridge|binding) ?=", text))
        spans += len(re.findall(r"^\s*#\[(?:tracing::)?instrument", text, re.M))
        spans += len(re.findall(r"tracing::info_span!\(", text))
    return calls, keyed, spans


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "src"
    hits = errors_to_text(root)
    print(f"errors turned into text (source dropped): {len(hits)}")
    for h in hits:
        print(f"  {h}")
    longs = long_functions(root)
    print(f"functions of 100 lines or more: {len(longs)}")
    for n, where in longs:
        print(f"  {n:4} {where}")
    calls, keyed, spans = log_keys(root)
    print(f"log calls: {calls}; naming the object by hand: {keyed}; spans (#[instrument], info_span!): {spans}")


if __name__ == "__main__":
    main()
