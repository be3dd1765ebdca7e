//! Smoke tests of the real binary's TLS paths, on every machine (no Kubernetes needed): `run`
//! against HTTPS endpoints that are closed, untrusted or refuse the caller; `bridge` to a wss://
//! broker it cannot verify; `attach` against an HTTPS AWS endpoint it cannot verify. Each must
//! start without panicking and say clearly what is wrong. (`run` panicked at start on a real API
//! server: two rustls crypto providers were linked and none was installed.)

mod support;

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::tls::tls_certs;
use support::{Proc, free_port, start_python};

fn operator() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iot-operator"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AWS_REGION", "eu-west-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("NO_COLOR", "1");
    cmd
}

/// Runs the command until it exits or `timeout` passes (then SIGTERM); returns the exit status
/// (if it exited by itself) and everything it wrote.
fn run_for(mut cmd: Command, timeout: Duration, dir: &Path) -> (Option<ExitStatus>, String) {
    let log = dir.join(format!("out-{:08x}.log", fastrand::u32(..)));
    let out = std::fs::File::create(&log).expect("log");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("iot-operator starts");
    let mut proc = Proc::from_child(child, "iot-operator");
    let start = Instant::now();
    let mut status = None;
    while start.elapsed() < timeout {
        if let Some(s) = proc.try_wait() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if status.is_none() {
        proc.terminate_and_wait(Duration::from_secs(20));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // Into the test output, which tests/run.sh scans for the test secrets.
    eprintln!("{text}");
    assert!(!text.contains("panicked"), "the binary panicked:\n{text}");
    (status, text)
}

fn kubeconfig(dir: &Path, server: &str, ca: &Path) -> std::path::PathBuf {
    let path = dir.join(format!("kubeconfig-{:08x}", fastrand::u32(..)));
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "u", "user": {"token": "smoke-token-not-a-secret"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    });
    std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("kubeconfig");
    path
}

fn run_against(kubeconfig: &Path, dir: &Path) -> (Option<ExitStatus>, String) {
    let mut cmd = operator();
    cmd.args(["run", "--metrics-addr"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("KUBECONFIG", kubeconfig);
    run_for(cmd, Duration::from_secs(60), dir)
}

/// An HTTPS stub answering every request but /version with `code`.
fn stub(certs: &support::tls::TlsCerts, code: &str) -> (Proc, u16) {
    let d = certs.dir.path();
    let (proc, port) = start_python(
        "https_stub.py",
        &[
            d.join("server.crt").to_str().expect("path"),
            d.join("server.key").to_str().expect("path"),
            code,
        ],
    );
    (proc, port.parse().expect("port"))
}

#[test]
fn run_reports_an_unreachable_api_server() {
    let certs = tls_certs();
    let dir = certs.dir.path();
    let url = format!("https://127.0.0.1:{}", free_port());
    let (status, out) = run_against(&kubeconfig(dir, &url, &dir.join("ca.crt")), dir);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "the Kubernetes API server at {url}/ cannot be reached"
        )),
        "{out}"
    );
}

#[test]
fn run_reports_an_untrusted_api_server_certificate() {
    let certs = tls_certs();
    let other = tls_certs();
    let dir = certs.dir.path();
    let (_stub, port) = stub(&certs, "403");
    let url = format!("https://127.0.0.1:{port}");
    // The kubeconfig trusts another CA.
    let (status, out) = run_against(
        &kubeconfig(dir, &url, &other.dir.path().join("ca.crt")),
        dir,
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}");
    assert!(out.contains("cannot be reached"), "{out}");
    assert!(
        out.to_lowercase().contains("certificate"),
        "the TLS failure is named: {out}"
    );
}

#[test]
fn run_reports_forbidden_unauthorized_and_missing_crds() {
    let certs = tls_certs();
    let dir = certs.dir.path();
    for (code, wanted) in [
        (
            "403",
            "the operator may not list iotpolicybindings.iot.operator.dev in all namespaces",
        ),
        ("401", "rejected the operator's credentials (401)"),
        (
            "404",
            "the CustomResourceDefinition iotpolicybindings.iot.operator.dev is not installed",
        ),
    ] {
        let (_stub, port) = stub(&certs, code);
        let url = format!("https://127.0.0.1:{port}");
        let (status, out) = run_against(&kubeconfig(dir, &url, &dir.join("ca.crt")), dir);
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{code}: {out}");
        assert!(out.contains(wanted), "{code}: {out}");
        assert!(
            !out.contains("smoke-token-not-a-secret"),
            "the token was printed"
        );
    }
}

#[test]
fn bridge_to_an_untrusted_wss_broker_runs_and_reports_tls() {
    let certs = tls_certs();
    let dir = certs.dir.path();
    let (_stub, port) = stub(&certs, "403");
    let manifest = json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
        "metadata": {"name": "smoke", "namespace": "default"},
        "spec": {"source": {"mqtt": {"url": format!("wss://127.0.0.1:{port}/mqtt")}},
                 "sink": {"url": format!("mqtt://127.0.0.1:{}", free_port())},
                 "routes": [{"from": "a/#"}]}});
    let file = dir.join("bridge.yaml");
    std::fs::write(&file, serde_yaml::to_string(&manifest).expect("yaml")).expect("manifest");
    let mut cmd = operator();
    cmd.args(["bridge", "-f"])
        .arg(&file)
        .args(["--metrics-addr"])
        .arg(format!("127.0.0.1:{}", free_port()));
    // It keeps retrying (a broker may come back); after 5 s it is stopped with SIGTERM.
    let (status, out) = run_for(cmd, Duration::from_secs(5), dir);
    assert!(status.is_none(), "the bridge command gave up: {out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");
}

#[test]
fn attach_against_an_untrusted_https_aws_endpoint_reports_it() {
    let certs = tls_certs();
    let dir = certs.dir.path();
    let (_stub, port) = stub(&certs, "403");
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/iotpolicybinding-identities.yaml");
    let mut cmd = operator();
    cmd.args(["attach", "--dry-run", "-f"])
        .arg(example)
        .args(["--aws-endpoint-url"])
        .arg(format!("https://127.0.0.1:{port}"));
    let (status, out) = run_for(cmd, Duration::from_secs(120), dir);
    let code = status.and_then(|s| s.code());
    assert!(matches!(code, Some(c) if c != 0), "{code:?}: {out}");
    assert!(out.contains("error"), "{out}");
}
