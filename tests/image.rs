//! The image as users make and run it: `podman build` of the repository's `Dockerfile`, then the
//! image run the way the chart's Deployment runs its container (read-only root filesystem, user
//! 65532, all capabilities dropped, the chart's arguments and environment, the ServiceAccount
//! token and CA mounted where the kubelet mounts them, `KUBERNETES_SERVICE_HOST`/`_PORT` set),
//! against the real API server of tests/support/control_plane.rs, relaying between two Mosquitto
//! brokers.
//!
//! No image registry is reachable here, so tests/images/base-images.sh first makes the two base
//! images the Dockerfile names, as local stand-ins from Debian's packages (made once, kept in
//! podman's storage). The build runs with `--pull=never`.
//!
//! Skipped loudly without podman (tests/run.sh installs it) or without a kube-apiserver (the
//! run test only). `IOT_OPERATOR_TEST_IMAGE=<name>` uses an image built elsewhere instead.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use iot_operator::api::TopicBridge;
use kube::Api;
use rumqttc::QoS;
use serde_json::{Value, json};
use support::control_plane::{self, ControlPlane, http_get};
use support::image::{ULIMITS, image, podman};
use support::mqtt::{Collector, publish_all};
use support::{Mosquitto, free_port};

#[test]
fn the_image_builds_from_the_dockerfile_and_is_small() {
    let built = match image() {
        Ok(Some(b)) => b,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    // The runtime carries glibc, libgcc and CA certificates: anything near a Debian base image
    // (over 70 MiB) means the build stage leaked into it.
    assert!(
        built.size_bytes < 60 * 1024 * 1024,
        "image {} is {} bytes",
        built.name,
        built.size_bytes
    );
    // No shell and no package manager in the runtime image.
    let out = podman()
        .args(["run", "--rm", "--pull=never", "--entrypoint", "/bin/sh"])
        .args(ULIMITS)
        .args([&built.name, "-c", "true"])
        .output()
        .expect("podman run");
    assert!(!out.status.success(), "the image has a shell");
    // The binary runs as user 65532 on a read-only root filesystem.
    let out = podman()
        .args([
            "run",
            "--rm",
            "--pull=never",
            "--read-only",
            "--user",
            "65532:65532",
        ])
        .args(ULIMITS)
        .args([&built.name, "--version"])
        .output()
        .expect("podman run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {version}"
    );
    let user = podman()
        .args([
            "image",
            "inspect",
            "--format",
            "{{.Config.User}}",
            &built.name,
        ])
        .output()
        .expect("podman image inspect");
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "65532:65532");
    eprintln!(
        "image size: {:.1} MiB ({} bytes); build {:.1} s",
        built.size_bytes as f64 / (1024.0 * 1024.0),
        built.size_bytes,
        built.seconds
    );
}

/// A container run by podman, removed (and its log printed) on drop.
struct Container {
    name: String,
}

impl Container {
    fn logs(&self) -> String {
        let out = podman().args(["logs", &self.name]).output();
        out.map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .unwrap_or_default()
    }

    fn running(&self) -> bool {
        podman()
            .args(["inspect", "--format", "{{.State.Running}}", &self.name])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        eprintln!("----- container {} log -----\n{}", self.name, self.logs());
        let _ = podman()
            .args(["rm", "-f", "-t", "5", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A directory the container's user (65532) can read, with these files (mode 0644); removed
/// when dropped (after the container, which the test declares later).
fn readable_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("iot-operator-mount-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    dir
}

/// The chart's default tenancy rule with the loopback test brokers allowed as sinks.
const LOOPBACK_SINKS: &str = r#"tenancy.rules=[{"namespaces":["*"],"bindPolicies":["{namespace}-*"],"managePolicies":[],"roles":[],"endpoints":["*"],"sinkEndpoints":["*.{namespace}.svc","127.0.0.1"],"operatorCredentials":false}]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_as_the_chart_runs_it_and_relays() {
    let built = match tokio::task::spawn_blocking(image)
        .await
        .expect("build task")
    {
        Ok(Some(b)) => b,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    let Some(cp) = control_plane::shared() else {
        return;
    };
    install_crds(cp).await;
    let ns = "image";
    let install = cp
        .install_chart(
            "iot-operator-image",
            &[
                "leaderElection.leaseName=image",
                &format!("watchNamespace={ns}"),
                LOOPBACK_SINKS,
            ],
        )
        .await;
    cp.namespace(ns).await;

    // Where the kubelet puts them: the projected token, the cluster CA and the namespace.
    let sa = readable_dir(&[
        ("token", &install.token),
        ("ca.crt", &cp.ca_pem),
        ("namespace", &install.namespace),
    ]);
    let tenancy = std::fs::read_to_string(&install.tenancy_file).expect("tenancy file");
    let tenancy = readable_dir(&[("tenancy.yaml", &tenancy)]);
    let api_port = cp.url.rsplit(':').next().expect("port").to_owned();
    let metrics_port = free_port();
    let name = format!("iot-operator-test-{:08x}", fastrand::u32(..));
    let pod = format!("{name}-pod");
    let mut cmd = podman();
    cmd.args(["run", "--detach", "--pull=never", "--name", &name])
        // The API server and the brokers listen on this machine's loopback.
        .args(["--network", "host"])
        // The chart's securityContext.
        .args(["--read-only", "--user", "65532:65532", "--cap-drop", "ALL"])
        .args(["--security-opt", "no-new-privileges"])
        .args(ULIMITS)
        .args([
            "-v",
            &format!(
                "{}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
                sa.path().display()
            ),
            "-v",
            &format!("{}:/etc/iot-operator:ro", tenancy.path().display()),
        ])
        .args(["-e", "KUBERNETES_SERVICE_HOST=127.0.0.1"])
        .args(["-e", &format!("KUBERNETES_SERVICE_PORT={api_port}")])
        .args(["-e", &format!("POD_NAME={pod}")])
        .args(["-e", &format!("POD_NAMESPACE={}", install.namespace)])
        .args(["-e", "AWS_EC2_METADATA_DISABLED=true"]);
    for (k, v) in &install.env {
        // The chart listens on 0.0.0.0:8080 in the pod's own network; here the host's.
        let v = if k == "IOT_OPERATOR_METRICS_ADDR" {
            format!("127.0.0.1:{metrics_port}")
        } else {
            v.clone()
        };
        cmd.args(["-e", &format!("{k}={v}")]);
    }
    cmd.arg(&built.name).args(&install.args);
    let out = cmd.output().expect("podman run");
    assert!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let container = Container { name };
    let started = Instant::now();

    // The start-up checks pass and the replica leads: /readyz says so.
    let ready = loop {
        match http_get(metrics_port, "/readyz") {
            Some((200, body)) if body.contains("leader") => break body,
            _ if !container.running() => panic!("the container exited:\n{}", container.logs()),
            _ if started.elapsed() > Duration::from_secs(60) => {
                panic!("not ready after 60 s:\n{}", container.logs())
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    eprintln!(
        "container ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        ready.trim()
    );

    let (source, sink) = (Mosquitto::start_logged(), Mosquitto::start_logged());
    let collector = Collector::start(sink.tcp_port, "collector-image", "cluster/#", false).await;
    let bridge = json!({"apiVersion": "iot.operator.dev/v1alpha1", "kind": "TopicBridge",
        "metadata": {"name": "feed", "namespace": ns},
        "spec": {"source": {"mqtt": {"url": source.tcp_url()}, "persistentSession": true},
                 "sink": {"url": sink.tcp_url()},
                 "routes": [{"from": "dev/#", "to": "cluster/{topic}", "qos": 1}]}});
    cp.create(&bridge).await.expect("TopicBridge created");
    let api: Api<TopicBridge> = Api::namespaced(cp.admin().await, ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let obj = api.get("feed").await.ok().map(|o| json!(o));
        let ready = obj.as_ref().and_then(|o| {
            o["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")
                .map(|c| (c["status"].clone(), c["reason"].clone()))
        });
        if ready == Some((json!("True"), json!("Connected"))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bridge is not Ready after 30 s: {obj:?}\n{}",
            container.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let messages = (0..200)
        .map(|i| (format!("dev/{i}"), i.to_string().into_bytes(), false))
        .collect();
    publish_all(source.tcp_port, "pub-image", messages, QoS::AtLeastOnce).await;
    assert!(
        collector
            .wait_for_distinct(200, Duration::from_secs(30))
            .await,
        "relayed {} of 200 through the container",
        collector.distinct()
    );

    // Its log is JSON lines (the chart's logFormat), with nothing the chart's RBAC forbids.
    let logs = container.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let parsed: Result<Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "not a JSON line: {line}");
    }
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(!logs.to_lowercase().contains("forbidden"), "{logs}");
    api.delete("feed", &Default::default())
        .await
        .expect("deleted");
}

async fn install_crds(cp: &ControlPlane) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    for entry in std::fs::read_dir(dir).expect("crds/") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("CRD file");
        let crd: Value = serde_yaml::from_str(&text).expect("CRD YAML");
        cp.apply(&crd).await.expect("CRD applied");
    }
    // Established before anything uses them.
    let client = cp.admin().await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in [
        "iotpolicybindings.iot.operator.dev",
        "topicbridges.iot.operator.dev",
    ] {
        loop {
            let established = crds
                .get(name)
                .await
                .ok()
                .and_then(|c| c.status)
                .is_some_and(|s| {
                    s.conditions
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            assert!(Instant::now() < deadline, "CRD {name} not established");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
