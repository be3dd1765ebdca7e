//! A one-node Kubernetes cluster for the tests: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kube-proxy (iptables) and a kubelet on Debian's containerd and runc, pods on
//! a Linux bridge with the CNI bridge and host-local plugins. Everything listens on the bridge's
//! address ([`BRIDGE_IP`], on a bridge the test makes) or on loopback: pods reach the API server
//! through the `kubernetes` Service (kube-proxy's DNAT), and nothing leaves this machine.
//!
//! The Kubernetes binaries are found as the control-plane tests find kube-apiserver
//! (`$KUBEBUILDER_ASSETS`, `/usr/local/kubebuilder/bin`, `PATH`); no registry ships them. Needs
//! root, containerd, runc, the CNI plugins, iptables, podman and gcc (the sandbox image is
//! made here). Without one of them [`Cluster::start`] says loudly what is missing and the tests
//! skip.
//!
//! One cluster at a time per machine: its bridge, subnet and state folder have fixed names, and
//! a start first clears what a killed run left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::control_plane::{binaries, minor_version, tied_command};
use super::tls::openssl;
use super::{Proc, free_port};

/// The bridge the pods hang on, made by the test; its address is the node's.
pub const BRIDGE: &str = "iotop-test0";
pub const BRIDGE_IP: &str = "10.213.7.1";
const POD_CIDR: &str = "10.213.7.0/24";
/// The sandbox image, made here from tests/images/pause.c.
pub const PAUSE_IMAGE: &str = "localhost/iot-operator-test/pause:1";
const STATE: &str = "/var/tmp/iot-operator-test-node";
const NODE: &str = "node0";

pub struct Cluster {
    pub dir: PathBuf,
    /// `https://<BRIDGE_IP>:<port>`
    pub url: String,
    /// A cluster-admin kubeconfig (for kubectl and helm).
    pub kubeconfig: PathBuf,
    pub containerd_sock: PathBuf,
    procs: Vec<Proc>,
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn kube_bin(name: &str) -> Option<PathBuf> {
    let apiserver = binaries().ok()?.kube_apiserver;
    let beside = apiserver.parent()?.join(name);
    beside.is_file().then_some(beside).or_else(|| which(name))
}

/// Runs a command to completion; its output when it fails.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd:?} failed: {text}"))
    }
}

fn sh(script: &str) -> Result<String, String> {
    run(Command::new("bash").args(["-c", script]))
}

/// What this machine lacks for a node, if anything.
pub fn missing() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for tool in [
        "containerd",
        "runc",
        "ctr",
        "iptables",
        "ip",
        "podman",
        "gcc",
    ] {
        if which(tool).is_none() {
            return Some(format!("no {tool} (tests/run.sh installs it)"));
        }
    }
    if !Path::new("/usr/lib/cni/bridge").exists() {
        return Some("no CNI plugins in /usr/lib/cni (containernetworking-plugins)".into());
    }
    for name in [
        "kube-apiserver",
        "kubelet",
        "kube-controller-manager",
        "kube-scheduler",
        "kube-proxy",
    ] {
        if kube_bin(name).is_none() {
            return Some(format!(
                "no {name} beside kube-apiserver ($KUBEBUILDER_ASSETS, /usr/local/kubebuilder/bin) or on PATH"
            ));
        }
    }
    None
}

/// Removes what a cluster left: containers (their shims outlive containerd), mounts, network
/// namespaces, kube-proxy's rules, the bridge and the state folder.
fn clear_leftovers() {
    let sock = format!("{STATE}/containerd.sock");
    let _ = sh(&format!(
        "pkill -9 -f 'containerd-shim-runc-v2 .*-address {sock}' ; \
         pkill -9 -f -- '--root-dir={STATE}/' ; pkill -9 -f 'containerd --config {STATE}/' ; true"
    ));
    std::thread::sleep(Duration::from_millis(300));
    // Mounts under the state folder, deepest first.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(STATE))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", p]).status();
    }
    if let Some(proxy) = kube_bin("kube-proxy") {
        let _ = Command::new(proxy)
            .arg("--cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let _ = sh(&format!("ip link del {BRIDGE} 2>/dev/null; true"));
    let _ = std::fs::remove_dir_all(STATE);
}

impl Cluster {
    /// Starts the cluster; `Err` says what failed.
    pub fn start() -> Result<Cluster, String> {
        let started = Instant::now();
        clear_leftovers();
        let dir = PathBuf::from(STATE);
        std::fs::create_dir_all(dir.join("net.d")).map_err(|e| e.to_string())?;
        let d = |f: &str| dir.join(f).display().to_string();

        // The bridge first: the API server and kubelet listen on its address.
        sh(&format!(
            "ip link add {BRIDGE} type bridge && ip addr add {BRIDGE_IP}/24 dev {BRIDGE} && ip link set {BRIDGE} up \
             && sysctl -qw net.ipv4.ip_forward=1 && (modprobe br_netfilter 2>/dev/null; true) \
             && (sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null; true)"
        ))?;

        // Certificates: a CA, the API server's (its bridge address, the Service address and
        // names), the API server's client certificate for the kubelet, a ServiceAccount key.
        for args in [
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=iot-operator-test-ca",
            ][..],
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=kube-apiserver",
            ],
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "kubelet-client.key",
                "-out",
                "kubelet-client.csr",
                "-subj",
                "/O=system:masters/CN=kube-apiserver-kubelet-client",
            ],
            &["genrsa", "-out", "sa.key", "2048"],
            &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
        ] {
            openssl(&dir, args);
        }
        std::fs::write(
            dir.join("server.ext"),
            format!(
                "subjectAltName=IP:{BRIDGE_IP},IP:127.0.0.1,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")
            .map_err(|e| e.to_string())?;
        for (csr, crt, ext) in [
            ("server.csr", "server.crt", "server.ext"),
            ("kubelet-client.csr", "kubelet-client.crt", "client.ext"),
        ] {
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    crt,
                    "-days",
                    "2",
                    "-extfile",
                    ext,
                ],
            );
        }
        let admin_token = format!("admin-{:016x}", fastrand::u64(..));
        let node_token = format!("node-{:016x}", fastrand::u64(..));
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "{admin_token},admin,admin-uid,system:masters\n{node_token},system:node:{NODE},node-uid,system:nodes\n"
            ),
        )
        .map_err(|e| e.to_string())?;

        let mut procs = Vec::new();
        let bins = binaries()?;
        let (etcd_port, etcd_peer, port) = (free_port(), free_port(), free_port());
        let mut etcd = tied_command(&bins.etcd);
        etcd.args([
            "--name=node",
            &format!("--data-dir={}", d("etcd")),
            &format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
            &format!("--initial-cluster=node=http://127.0.0.1:{etcd_peer}"),
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]);
        procs.push(spawn(etcd, &dir, "etcd")?);

        let mut api = tied_command(&bins.kube_apiserver);
        api.args([
            &format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            &format!("--bind-address={BRIDGE_IP}"),
            &format!("--advertise-address={BRIDGE_IP}"),
            &format!("--secure-port={port}"),
            &format!("--cert-dir={}", d("apiserver-certs")),
            &format!("--tls-cert-file={}", d("server.crt")),
            &format!("--tls-private-key-file={}", d("server.key")),
            &format!("--client-ca-file={}", d("ca.crt")),
            &format!("--token-auth-file={}", d("tokens.csv")),
            &format!("--kubelet-client-certificate={}", d("kubelet-client.crt")),
            &format!("--kubelet-client-key={}", d("kubelet-client.key")),
            "--kubelet-preferred-address-types=InternalIP",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            &format!("--service-account-key-file={}", d("sa.pub")),
            &format!("--service-account-signing-key-file={}", d("sa.key")),
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=0",
        ]);
        procs.push(spawn(api, &dir, "kube-apiserver")?);
        let url = format!("https://{BRIDGE_IP}:{port}");
        let kubeconfig = write_kubeconfig(&dir, "admin", &url, &admin_token)?;
        let node_kubeconfig = write_kubeconfig(&dir, "node", &url, &node_token)?;
        let mut cluster = Cluster {
            dir: dir.clone(),
            url,
            kubeconfig,
            containerd_sock: dir.join("containerd.sock"),
            procs,
        };
        cluster.wait("the API server is ready", Duration::from_secs(90), |c| {
            c.kubectl(&["get", "--raw", "/readyz"]).is_ok()
        })?;

        // containerd with its own state and socket: cgroupfs, the CNI bridge, our sandbox image,
        // and restrict_oom_score_adj (processes here cannot lower oom_score_adj below 0).
        std::fs::write(
            dir.join("containerd.toml"),
            format!(
                r#"version = 2
root = "{STATE}/containerd/root"
state = "{STATE}/containerd/state"
[grpc]
  address = "{STATE}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{STATE}/net.d"
"#
            ),
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("net.d/10-iotop.conflist"),
            format!(
                r#"{{"cniVersion": "0.4.0", "name": "iotop-test", "plugins": [
  {{"type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {{"type": "host-local", "dataDir": "{STATE}/ipam", "ranges": [[{{"subnet": "{POD_CIDR}", "gateway": "{BRIDGE_IP}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}]}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
]}}"#
            ),
        )
        .map_err(|e| e.to_string())?;
        let mut containerd = tied_command(&which("containerd").ok_or("no containerd")?);
        containerd.args(["--config", &d("containerd.toml")]);
        cluster.procs.push(spawn(containerd, &dir, "containerd")?);
        cluster.wait("containerd answers", Duration::from_secs(30), |c| {
            c.ctr(&["version"]).is_ok()
        })?;
        cluster.make_pause_image()?;

        std::fs::write(
            dir.join("kubelet.yaml"),
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
address: {BRIDGE_IP}
port: {kubelet_port}
healthzBindAddress: 127.0.0.1
healthzPort: {healthz_port}
readOnlyPort: 0
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {STATE}/ca.crt}}
authorization: {{mode: Webhook}}
clusterDomain: cluster.local
resolvConf: ""
evictionHard: {{"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
"#,
                kubelet_port = free_port(),
                healthz_port = free_port(),
            ),
        )
        .map_err(|e| e.to_string())?;
        let kubelet_bin = kube_bin("kubelet").ok_or("no kubelet")?;
        let mut kubelet = tied_command(&kubelet_bin);
        // A CRI runtime is the only kind since 1.24 and the flag is gone in 1.27; before 1.27
        // it is given, since a pre-release 1.24 still defaults to the removed dockershim.
        if minor_version(&kubelet_bin).is_some_and(|m| m < 27) {
            kubelet.arg("--container-runtime=remote");
        }
        kubelet.args([
            &format!("--kubeconfig={}", node_kubeconfig.display()),
            &format!("--config={}", d("kubelet.yaml")),
            &format!("--container-runtime-endpoint=unix://{STATE}/containerd.sock"),
            &format!("--node-ip={BRIDGE_IP}"),
            &format!("--hostname-override={NODE}"),
            &format!("--root-dir={STATE}/kubelet"),
            &format!("--cert-dir={STATE}/kubelet-pki"),
            "--v=1",
        ]);
        cluster.procs.push(spawn(kubelet, &dir, "kubelet")?);

        let kc = cluster.kubeconfig.display().to_string();
        let mut kcm = tied_command(&kube_bin("kube-controller-manager").ok_or("no kcm")?);
        kcm.args([
            &format!("--kubeconfig={kc}"),
            &format!("--authentication-kubeconfig={kc}"),
            &format!("--authorization-kubeconfig={kc}"),
            "--leader-elect=false",
            &format!("--root-ca-file={}", d("ca.crt")),
            &format!("--service-account-private-key-file={}", d("sa.key")),
            "--controllers=*,-nodeipam,-csrsigning,-cloud-node-lifecycle,-service",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--v=0",
        ]);
        cluster
            .procs
            .push(spawn(kcm, &dir, "kube-controller-manager")?);
        let mut scheduler = tied_command(&kube_bin("kube-scheduler").ok_or("no scheduler")?);
        scheduler.args([
            &format!("--kubeconfig={kc}"),
            &format!("--authentication-kubeconfig={kc}"),
            &format!("--authorization-kubeconfig={kc}"),
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
        ]);
        cluster
            .procs
            .push(spawn(scheduler, &dir, "kube-scheduler")?);
        std::fs::write(
            dir.join("kube-proxy.yaml"),
            format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                 clientConnection: {{kubeconfig: {kc}}}\nmode: iptables\nclusterCIDR: {POD_CIDR}\n\
                 bindAddress: {BRIDGE_IP}\nhealthzBindAddress: 127.0.0.1:{}\nmetricsBindAddress: 127.0.0.1:{}\n\
                 conntrack: {{maxPerCore: 0}}\n",
                free_port(),
                free_port()
            ),
        )
        .map_err(|e| e.to_string())?;
        let mut proxy = tied_command(&kube_bin("kube-proxy").ok_or("no kube-proxy")?);
        proxy.args([
            &format!("--config={}", d("kube-proxy.yaml")),
            &format!("--hostname-override={NODE}"),
        ]);
        cluster.procs.push(spawn(proxy, &dir, "kube-proxy")?);

        cluster.wait("the node is Ready", Duration::from_secs(90), |c| {
            c.kubectl(&[
                "get",
                "node",
                NODE,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .is_ok_and(|s| s.trim() == "True")
        })?;
        cluster.wait(
            "the default ServiceAccount and kube-root-ca.crt exist",
            Duration::from_secs(60),
            |c| {
                c.kubectl(&["-n", "default", "get", "serviceaccount", "default"])
                    .is_ok()
                    && c.kubectl(&["-n", "default", "get", "configmap", "kube-root-ca.crt"])
                        .is_ok()
            },
        )?;
        cluster.wait(
            "kube-proxy routes the kubernetes Service",
            Duration::from_secs(60),
            |_| sh("iptables-save -t nat | grep -q 'default/kubernetes:https cluster IP'").is_ok(),
        )?;
        eprintln!(
            "node cluster: {} with node {NODE} Ready in {:.1} s",
            cluster.url,
            started.elapsed().as_secs_f64()
        );
        Ok(cluster)
    }

    fn make_pause_image(&self) -> Result<(), String> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/images/pause.c");
        let ctx = self.dir.join("pause");
        std::fs::create_dir_all(&ctx).map_err(|e| e.to_string())?;
        run(Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(ctx.join("pause"))
            .arg(&src))?;
        std::fs::write(
            ctx.join("Containerfile"),
            "FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT [\"/pause\"]\n",
        )
        .map_err(|e| e.to_string())?;
        run(Command::new("podman")
            .args([
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "build",
                "-q",
                "-t",
            ])
            .arg(PAUSE_IMAGE)
            .arg(&ctx))?;
        self.load_image(PAUSE_IMAGE)
    }

    /// Copies an image from podman's storage into the node's containerd (namespace `k8s.io`,
    /// the one the kubelet uses), as `docker save | ctr images import` would.
    pub fn load_image(&self, image: &str) -> Result<(), String> {
        let tar = self.dir.join("image.tar");
        let _ = std::fs::remove_file(&tar);
        run(Command::new("podman")
            .args(["save", "--format", "oci-archive", "-o"])
            .arg(&tar)
            .arg(image))?;
        // podman names the manifest in the archive's index (org.opencontainers.image.ref.name),
        // so ctr takes the name from there. `--index-name` would give the same name to a second
        // image (the archive's index) that then replaces the first while both are unpacked: a
        // CI run lost that race ("content digest ... not found").
        let out = self.ctr(&["images", "import", tar.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_file(&tar);
        out?;
        let names = self.ctr(&["images", "ls", "-q"])?;
        if names.lines().any(|n| n == image) {
            Ok(())
        } else {
            Err(format!(
                "{image} is not in the node's containerd after the import; it holds: {names}"
            ))
        }
    }

    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        run(Command::new("ctr")
            .args([
                "-a",
                self.containerd_sock.to_str().unwrap_or_default(),
                "-n",
                "k8s.io",
            ])
            .args(args))
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        run(Command::new("kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args))
    }

    /// Polls `ok` every 250 ms; `Err` after `timeout`, with the logs of the components.
    pub fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&Cluster) -> bool,
    ) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if ok(self) {
                return Ok(());
            }
            let exited = self
                .procs
                .iter_mut()
                .find_map(|p| p.try_wait().map(|status| (p.name, status)));
            if let Some((name, status)) = exited {
                return Err(format!(
                    "{name} exited ({status}) while waiting for {what}:\n{}",
                    self.log_tail(name)
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(format!(
            "{what}: not within {timeout:?}\nkubelet:\n{}\ncontainerd:\n{}",
            self.log_tail("kubelet"),
            self.log_tail("containerd")
        ))
    }

    pub fn log_tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The kubelet first, so that it restarts nothing; then every process and what they made.
        for p in self.procs.iter_mut().rev() {
            p.kill();
        }
        clear_leftovers();
    }
}

fn spawn(mut cmd: Command, dir: &Path, name: &'static str) -> Result<Proc, String> {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("starting {name}: {e}"))?;
    Ok(Proc::from_child(child, name))
}

fn write_kubeconfig(dir: &Path, name: &str, url: &str, token: &str) -> Result<PathBuf, String> {
    let path = dir.join(format!("{name}.kubeconfig"));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: test\n    user: {name}\ncurrent-context: {name}\n",
        dir.join("ca.crt").display()
    );
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    Ok(path)
}
