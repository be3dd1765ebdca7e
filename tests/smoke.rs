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
    support::operator_command()
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

/// An API server that accepts connections and never answers (frozen, or behind a network that
/// drops its replies): `run` gives up within its call deadlines instead of waiting forever.
#[test]
fn run_gives_up_on_an_api_server_that_never_answers() {
    let certs = tls_certs();
    let dir = certs.dir.path();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    std::thread::spawn(move || {
        // Connections are kept open and never read or written.
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    let start = Instant::now();
    let (status, out) = run_against(&kubeconfig(dir, &url, &dir.join("ca.crt")), dir);
    let took = start.elapsed();
    eprintln!(
        "run against a silent API server gave up after {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}");
    assert!(out.contains("cannot be reached"), "{out}");
    // The 5 s connect deadline (it covers the TLS handshake); before it, the start-up check's
    // own 15 s limit was the first to end the wait.
    assert!(took < Duration::from_secs(12), "took {took:?}");
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

/// `attach --dry-run` of the identities example against `endpoint` as the AWS endpoint.
fn attach_dry_run(endpoint: &str, dir: &Path) -> (Option<ExitStatus>, String) {
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/iotpolicybinding-identities.yaml");
    let mut cmd = operator();
    cmd.args(["attach", "--dry-run", "-f"])
        .arg(example)
        .args(["--aws-endpoint-url", endpoint]);
    run_for(cmd, Duration::from_secs(120), dir)
}

#[test]
fn attach_against_an_untrusted_https_aws_endpoint_reports_it() {
    let certs = tls_certs();
    let dir = certs.dir.path();
    let (_stub, port) = stub(&certs, "403");
    let (status, out) = attach_dry_run(&format!("https://127.0.0.1:{port}"), dir);
    let code = status.and_then(|s| s.code());
    assert!(matches!(code, Some(c) if c != 0), "{code:?}: {out}");
    assert!(out.contains("error"), "{out}");
}

/// Manifests with a misspelled field, a wrong kind or a value the CRD refuses are refused by
/// `attach -f` and `bridge -f` before anything runs, naming the field (and the closest known
/// field for a typo), instead of the field being dropped in silence.
#[test]
fn cli_manifests_are_checked_against_the_crd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = "eu-west-1:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let binding = |spec: serde_json::Value| {
        json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "IotPolicyBinding",
               "metadata": {"name": "b", "namespace": "default"}, "spec": spec})
    };
    let bridge = |spec: serde_json::Value| {
        json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
               "metadata": {"name": "t", "namespace": "default"}, "spec": spec})
    };
    let mqtt = json!({"mqtt": {"url": "ws://127.0.0.1:1/mqtt"}});
    let sink = json!({"url": "mqtt://127.0.0.1:1"});
    let cases = [
        (
            "attach",
            binding(
                json!({"policy": {"name": "p"}, "principals": {"cognitoIdentityIds": [id], "cognitoIdentityPool": ["x"]}}),
            ),
            r#"spec.principals.cognitoIdentityPool: unknown field (did you mean "cognitoIdentityPools"?)"#,
        ),
        (
            "attach",
            binding(
                json!({"policy": {"name": "p", "documnet": {}}, "principals": {"cognitoIdentityIds": [id]}}),
            ),
            r#"spec.policy.documnet: unknown field (did you mean "document"?)"#,
        ),
        (
            "attach",
            binding(
                json!({"policy": {"name": "p"}, "principals": {"certificateArns": ["cert/abc"]}}),
            ),
            "spec.principals.certificateArns[0]: Invalid value: \"cert/abc\": should match",
        ),
        (
            "attach",
            bridge(json!({"source": mqtt, "sink": sink, "routes": [{"from": "a"}]})),
            r#"kind: expected IotPolicyBinding, found "TopicBridge""#,
        ),
        (
            "bridge",
            bridge(
                json!({"source": mqtt, "sink": sink, "routes": [{"from": "a", "diretion": "out"}]}),
            ),
            r#"spec.routes[0].diretion: unknown field (did you mean "direction"?)"#,
        ),
        (
            "bridge",
            bridge(
                json!({"source": {"awsIot": {"endpint": "x.iot.eu-west-1.amazonaws.com"}}, "sink": sink, "routes": [{"from": "a"}]}),
            ),
            r#"spec.source.awsIot.endpint: unknown field (did you mean "endpoint"?)"#,
        ),
        (
            "bridge",
            bridge(
                json!({"source": {"mqtt": {"url": "ws://127.0.0.1:1/mqtt"}, "persistentSesion": true}, "sink": sink, "routes": [{"from": "a"}]}),
            ),
            r#"spec.source.persistentSesion: unknown field (did you mean "persistentSession"?)"#,
        ),
    ];
    for (i, (command, manifest, wanted)) in cases.into_iter().enumerate() {
        let file = dir.path().join(format!("m{i}.yaml"));
        std::fs::write(&file, serde_yaml::to_string(&manifest).expect("yaml")).expect("manifest");
        let mut cmd = operator();
        cmd.arg(command).arg("-f").arg(&file);
        if command == "attach" {
            cmd.arg("--dry-run");
        }
        let (status, out) = run_for(cmd, Duration::from_secs(30), dir.path());
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(1),
            "{command} {i}: {out}"
        );
        assert!(
            out.contains(wanted),
            "{command} {i}: {wanted:?} not in {out}"
        );
    }
}

/// An endpoint that is not AWS and answers 404 (a plain web server) is not taken for a missing
/// policy: the error says the endpoint does not look like AWS IoT.
#[test]
fn attach_against_a_web_server_that_answers_404_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let child = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .arg("--directory")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 -m http.server");
    let _server = Proc::from_child(child, "http.server");
    assert!(support::wait_for_port(port, Duration::from_secs(10)));
    let (status, out) = attach_dry_run(&format!("http://127.0.0.1:{port}"), dir.path());
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}");
    assert!(!out.contains("PolicyNotFound"), "{out}");
    assert!(
        out.contains("does not look like an AWS IoT endpoint"),
        "{out}"
    );
}

/// `attach -f` with an identity pool prints whether the pool's Cognito roles may use AWS IoT
/// (setup step 3), naming the role and what it lacks. moto for IAM and Cognito, a stand-in for
/// GetIdentityPoolRoles (moto lacks it).
#[test]
fn attach_reports_a_pool_role_that_cannot_use_iot() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let moto = support::Moto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let roles_file = dir.path().join("roles.json");
    std::fs::write(&roles_file, "{}").unwrap();
    let (_stub, port) = start_python(
        "cognito_roles_stub.py",
        &[&moto.url(), roles_file.to_str().unwrap()],
    );
    let url = format!("http://127.0.0.1:{port}");
    let pool = rt.block_on(async {
        let config = support::test_sdk_config(&url);
        support::create_connect_policy(&aws_sdk_iot::Client::new(&config), "app").await;
        let iam = aws_sdk_iam::Client::new(&config);
        let role = support::iam_role(&iam, "auth_no_iot").await;
        let cognito = aws_sdk_cognitoidentity::Client::new(&config);
        let pool = cognito
            .create_identity_pool()
            .identity_pool_name("app")
            .allow_unauthenticated_identities(false)
            .send()
            .await
            .expect("pool")
            .identity_pool_id()
            .to_owned();
        std::fs::write(
            &roles_file,
            serde_json::json!({&pool: {"authenticated": role}}).to_string(),
        )
        .unwrap();
        pool
    });
    let manifest = dir.path().join("binding.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: iot.operator.dev/v1alpha1\nkind: IotPolicyBinding\nmetadata: {{name: app}}\nspec:\n  region: eu-west-1\n  policy: {{name: app}}\n  principals:\n    cognitoIdentityPools: [\"{pool}\"]\n"
        ),
    )
    .unwrap();
    let mut cmd = operator();
    cmd.args(["attach", "-f"])
        .arg(&manifest)
        .args(["--aws-endpoint-url", &url]);
    let (status, out) = run_for(cmd, Duration::from_secs(60), dir.path());
    assert!(status.is_some_and(|s| s.success()), "{out}");
    assert!(
        out.contains("cognito roles: PROBLEM: role arn:aws:iam::123456789012:role/auth_no_iot may not use iot:Connect, iot:Publish, iot:Subscribe, iot:Receive (authenticated role of"),
        "{out}"
    );
}
