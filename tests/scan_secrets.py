#!/usr/bin/env python3
"""Fails when a test secret (tests/test-secrets.txt) appears in the output of a test run.

Usage: scan_secrets.py <test-output.log>

Guards against a vacuous pass: every listed secret must still be used by some test source, and
the log must hold the operator's own debug logs and the test summaries.
"""
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent
secrets = [
    line.strip()
    for line in (root / "tests/test-secrets.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
sources = "".join(p.read_text() for p in (root / "tests").rglob("*.rs"))
unused = [s for s in secrets if s not in sources]
if unused:
    sys.exit(f"scan_secrets: listed secrets no test uses any more: {unused}")

log_path = pathlib.Path(sys.argv[1])
text = log_path.read_text(errors="replace")
operator_lines = sum(1 for line in text.splitlines() if "iot_operator" in line)
summaries = text.count("test result: ok.")
if operator_lines < 100 or summaries < 10:
    sys.exit(
        f"scan_secrets: {log_path} does not look like a full run "
        f"({operator_lines} operator log lines, {summaries} test summaries)"
    )

found = []
for number, line in enumerate(text.splitlines(), 1):
    for s in secrets:
        if s in line:
            found.append((number, s))
if found:
    for number, s in found[:20]:
        print(f"{log_path}:{number}: contains the test secret {s[:6]}...", file=sys.stderr)
    sys.exit(f"scan_secrets: {len(found)} line(s) leak a test secret")
print(
    f"scan_secrets: {len(secrets)} secrets, {len(text.splitlines())} lines "
    f"({operator_lines} operator log lines, {summaries} test binaries): none leaked"
)
