//! Real peers for the integration tests: moto's server (AWS IoT and Cognito), Mosquitto (TCP and
//! websockets listeners) and Python helpers. Each starts on a free 127.0.0.1 port and is stopped
//! when dropped. `tests/run.sh` installs them; the paths come from its environment variables.
#![allow(dead_code)]

pub mod admission;
pub mod apiserver;
pub mod control_plane;
pub mod faults;
pub mod image;
pub mod mqtt;
pub mod node;
pub mod tls;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Log lines of this test binary, kept in memory (tests scan them for secrets) and, when
/// `IOT_OPERATOR_TEST_LOG` is set, also written to stderr, so that `tests/run.sh` can scan the
/// output of the whole run.
#[derive(Clone, Default)]
pub struct LogBuffer(pub Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        if std::env::var_os("IOT_OPERATOR_TEST_LOG").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the debug-level subscriber once per test binary (rumqttc, kube and the AWS SDK
/// included) and returns its buffer. Every peer's start calls it.
pub fn logs() -> &'static LogBuffer {
    static LOGS: OnceLock<LogBuffer> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = LogBuffer::default();
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init();
        buf
    })
}

/// Creates, in moto, a policy that allows `iot:Connect`.
pub async fn create_connect_policy(iot: &aws_sdk_iot::Client, name: &str) {
    iot.create_policy()
        .policy_name(name)
        .policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#)
        .send()
        .await
        .expect("policy created");
}

/// The operator binary as a user runs it from a shell: a clean environment with test AWS
/// credentials (the tests point it at moto or a stub) and no instance metadata.
pub fn operator_command() -> Command {
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

/// After every target was removed: `left` (the pairs in AWS) holds exactly `want` (the pairs that
/// were there before the binding, and what it still wants). Names both ways a sync can go wrong.
pub fn assert_pairs_left(
    left: &std::collections::BTreeSet<String>,
    want: &std::collections::BTreeSet<String>,
) {
    assert_eq!(
        left.difference(want).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "pairs the binding attached and never detached"
    );
    assert_eq!(
        want.difference(left).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "foreign pairs detached"
    );
}

/// Creates, in moto, an IAM role (no policies) and returns its ARN.
pub async fn iam_role(iam: &aws_sdk_iam::Client, name: &str) -> String {
    iam.create_role()
        .role_name(name)
        .assume_role_policy_document("{}")
        .send()
        .await
        .expect("role created")
        .role()
        .map(|r| r.arn().to_owned())
        .expect("role arn")
}

/// Creates, in moto, an identity pool named `name` with `n` identities; returns the pool's id
/// and theirs.
pub async fn identity_pool(
    cognito: &aws_sdk_cognitoidentity::Client,
    name: &str,
    n: usize,
) -> (String, Vec<String>) {
    let pool = cognito
        .create_identity_pool()
        .identity_pool_name(name)
        .allow_unauthenticated_identities(true)
        .send()
        .await
        .expect("pool created")
        .identity_pool_id()
        .to_owned();
    let mut ids = Vec::new();
    for _ in 0..n {
        let out = cognito
            .get_id()
            .identity_pool_id(&pool)
            .send()
            .await
            .expect("identity created");
        ids.push(out.identity_id().expect("identity id").to_owned());
    }
    (pool, ids)
}

/// Creates, in moto, an identity pool with `n` identities and returns their ids.
pub async fn cognito_identities(
    cognito: &aws_sdk_cognitoidentity::Client,
    n: usize,
) -> Vec<String> {
    identity_pool(cognito, "pool", n).await.1
}

/// A free TCP port on 127.0.0.1 (the kernel's choice), never the same one twice in a test
/// process: a broker stopped to be restarted leaves its port free meanwhile, and another test
/// of the same process must not be handed it (the two would then share one broker).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(port)
        {
            return port;
        }
    }
}

/// Waits until something accepts connections on the port.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn tool(env: &str, fallback: &str) -> PathBuf {
    std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(fallback))
}

/// The virtualenv's Python (with botocore and paho-mqtt).
pub fn python() -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    tool(
        "IOT_OPERATOR_TEST_PYTHON",
        local.to_str().unwrap_or("python3"),
    )
}

/// Starts a test peer with its output discarded.
fn spawn_quiet(bin: &Path, args: &[&std::ffi::OsStr], name: &'static str) -> Proc {
    let child = Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "starting {} (run tests/run.sh to install it): {e}",
                bin.display()
            )
        });
    Proc { child, name }
}

/// A child process killed on drop.
pub struct Proc {
    child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn from_child(child: Child, name: &'static str) -> Self {
        Self { child, name }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate_and_wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything the process wrote to a piped standard error (after it exited).
    pub fn stderr_text(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut text);
        }
        text
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// moto's server emulating AWS IoT and Cognito Identity.
pub struct Moto {
    pub port: u16,
    _proc: Proc,
}

impl Moto {
    pub fn start() -> Self {
        logs();
        let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
        let bin = tool(
            "IOT_OPERATOR_TEST_MOTO",
            local.to_str().unwrap_or("moto_server"),
        );
        let port = free_port();
        let port_s = port.to_string();
        let args: [&std::ffi::OsStr; 4] = [
            "-H".as_ref(),
            "127.0.0.1".as_ref(),
            "-p".as_ref(),
            port_s.as_ref(),
        ];
        let proc = spawn_quiet(&bin, &args, "moto");
        assert!(
            wait_for_port(port, Duration::from_secs(30)),
            "moto did not start"
        );
        Self { port, _proc: proc }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Static test credentials (moto accepts any).
pub fn test_sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .region(aws_config::Region::new("eu-west-1"))
        .endpoint_url(endpoint)
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_credential_types::Credentials::new(
                    "testing",
                    "testing-secret",
                    None,
                    None,
                    "test",
                ),
            ),
        )
        .retry_config(aws_smithy_types::retry::RetryConfig::disabled())
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build()
}

/// Writes a dynamic-security configuration that lets in one client, `username` with
/// `password`, bound to `client_id` when given. Mosquitto keeps PBKDF2-SHA512 hashes (101
/// iterations, base64), made here by the test Python.
fn write_dynsec(path: &Path, username: &str, password: &str, client_id: Option<&str>) {
    let script = "import base64, hashlib, json, os, sys\n\
        user, pw, cid, path = sys.argv[1:5]\n\
        salt = os.urandom(12)\n\
        h = hashlib.pbkdf2_hmac('sha512', pw.encode(), salt, 101)\n\
        client = {'username': user, 'password': base64.b64encode(h).decode(),\n\
                  'salt': base64.b64encode(salt).decode(), 'iterations': 101, 'roles': []}\n\
        if cid: client['clientid'] = cid\n\
        allow = {'publishClientSend': True, 'publishClientReceive': True, 'subscribe': True, 'unsubscribe': True}\n\
        json.dump({'defaultACLAccess': allow, 'clients': [client], 'groups': [], 'roles': []}, open(path, 'w'))\n\
        os.chmod(path, 0o666)\n";
    let status = Command::new(python())
        .args(["-c", script, username, password, client_id.unwrap_or("")])
        .arg(path)
        .status()
        .expect("python runs");
    assert!(status.success(), "dynsec config written");
}

/// A Mosquitto broker with a TCP listener and optionally a websockets listener; can be killed
/// and started again on the same ports.
pub struct Mosquitto {
    pub tcp_port: u16,
    pub ws_port: Option<u16>,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
    /// The one client a broker from [`Mosquitto::with_one_client`] lets in, and the folder of
    /// the plugin's configuration.
    client: Option<(String, String, tempfile::TempDir)>,
}

impl Mosquitto {
    pub fn start(websockets: bool) -> Self {
        Self::start_with(websockets, "")
    }

    /// A broker whose dynamic-security plugin refuses subscriptions to `secret/#`, and the
    /// folder of the plugin's configuration (removed when dropped).
    pub fn refusing_secrets() -> (Self, tempfile::TempDir) {
        let plugin = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so";
        let folder = tempfile::Builder::new()
            .prefix("dynsec-")
            .tempdir()
            .expect("tempdir");
        let dir = folder.path();
        let config = dir.join("dynsec.json");
        std::fs::write(
            &config,
            serde_json::json!({
                "defaultACLAccess": {"publishClientSend": true, "publishClientReceive": true,
                                      "subscribe": true, "unsubscribe": true},
                "clients": [],
                "groups": [{"groupname": "anonymous", "roles": [{"rolename": "no-secrets"}], "clients": []}],
                "roles": [{"rolename": "no-secrets", "acls": [
                    {"acltype": "subscribePattern", "topic": "secret/#", "allow": false, "priority": 0}]}],
                "anonymousGroup": "anonymous",
            })
            .to_string(),
        )
        .expect("dynsec config");
        {
            use std::os::unix::fs::PermissionsExt;
            // Mosquitto, started as root, runs as `mosquitto` and rewrites this file.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o666))
                .expect("chmod");
        }
        let broker = Self::start_with(
            false,
            &format!(
                "plugin {plugin}\nplugin_opt_config_file {}\n",
                config.display()
            ),
        );
        (broker, folder)
    }

    /// A logged broker ([`Mosquitto::start_logged`]) whose dynamic-security plugin lets in one
    /// client, `username` with `password`, and only with client id `client_id` (any client id
    /// when `None`); no one else connects. [`Mosquitto::bind_client_id`] changes the binding.
    pub fn with_one_client(username: &str, password: &str, client_id: Option<&str>) -> Self {
        let plugin = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so";
        let folder = tempfile::Builder::new()
            .prefix("dynsec-")
            .tempdir()
            .expect("tempdir");
        {
            use std::os::unix::fs::PermissionsExt;
            // Mosquitto, started as root, runs as `mosquitto` and rewrites the file.
            std::fs::set_permissions(folder.path(), std::fs::Permissions::from_mode(0o777))
                .expect("chmod");
        }
        let config = folder.path().join("dynsec.json");
        write_dynsec(&config, username, password, client_id);
        let mut m = Self::start_logged_with(&format!(
            "plugin {plugin}\nplugin_opt_config_file {}\n",
            config.display()
        ));
        m.client = Some((username.to_owned(), password.to_owned(), folder));
        m
    }

    /// Restarts a broker from [`Mosquitto::with_one_client`] with its one client bound to
    /// `client_id` (`None`: any).
    pub fn bind_client_id(&mut self, client_id: Option<&str>) {
        let (username, password, folder) = self.client.as_ref().expect("a broker with one client");
        let config = folder.path().join("dynsec.json");
        let (username, password) = (username.clone(), password.clone());
        self.terminate();
        write_dynsec(&config, &username, &password, client_id);
        self.restart();
    }

    /// `extra` is appended to the configuration.
    pub fn start_with(websockets: bool, extra: &str) -> Self {
        logs();
        let dir = tempfile::tempdir().expect("tempdir");
        // Mosquitto started as root switches to the `mosquitto` user: it must be able to write
        // its persistence file here, or sessions silently vanish across restarts.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("chmod");
        }
        let tcp_port = free_port();
        let ws_port = websockets.then(free_port);
        let mut conf = format!(
            "per_listener_settings false\nallow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 1\nmax_queued_messages 1000000\nmax_inflight_messages 100\nlog_dest stderr\nlog_type error\nlog_type warning\nlistener {tcp_port} 127.0.0.1\n",
            dir.path().display()
        );
        if let Some(p) = ws_port {
            conf.push_str(&format!(
                "listener {p} 127.0.0.1\nprotocol websockets\nwebsockets_headers_size 8192\n"
            ));
        }
        conf.push_str(extra);
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("config");
        let mut m = Self {
            tcp_port,
            ws_port,
            dir,
            proc: None,
            client: None,
        };
        m.restart();
        m
    }

    /// Stops the broker with SIGTERM: it saves its persistence file and closes connections.
    pub fn terminate(&mut self) {
        if let Some(mut p) = self.proc.take()
            && p.terminate_and_wait(Duration::from_secs(10)).is_none()
        {
            p.kill();
        }
    }

    /// Kills the broker (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the broker (again) on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        let bin = tool("IOT_OPERATOR_TEST_MOSQUITTO", "/usr/sbin/mosquitto");
        let conf = self.dir.path().join("mosquitto.conf");
        self.proc = Some(spawn_quiet(
            &bin,
            &["-c".as_ref(), conf.as_os_str()],
            "mosquitto",
        ));
        assert!(
            wait_for_port(self.tcp_port, Duration::from_secs(10)),
            "mosquitto did not start"
        );
        if let Some(p) = self.ws_port {
            assert!(
                wait_for_port(p, Duration::from_secs(10)),
                "mosquitto websockets did not start"
            );
        }
    }

    /// A broker with a TCP listener that logs every connection, disconnection and client-id
    /// takeover to a file ([`Mosquitto::log`]).
    pub fn start_logged() -> Self {
        Self::start_logged_with("")
    }

    /// [`Mosquitto::start_logged`] with `extra` appended to the configuration (another
    /// listener, say).
    pub fn start_logged_with(extra: &str) -> Self {
        let log = "log_type all\nlog_dest file ";
        let mut m = Self::start_with(false, extra);
        let conf = m.dir.path().join("mosquitto.conf");
        let mut text = std::fs::read_to_string(&conf).expect("config");
        text.push_str(&format!(
            "{log}{}\n",
            m.dir.path().join("mosquitto.log").display()
        ));
        std::fs::write(&conf, text).expect("config");
        m.restart();
        m
    }

    /// What a broker from [`Mosquitto::start_logged`] logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Log lines saying that `client_id` connected while a connection with that id was still
    /// open (the broker closed the old one): two clients with one id overlapped.
    pub fn takeovers(&self, client_id: &str) -> usize {
        let needle = format!("Client {client_id} already connected");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// How many connections with `client_id` the broker accepted so far.
    pub fn connections(&self, client_id: &str) -> usize {
        let needle = format!(" as {client_id} ");
        self.log()
            .lines()
            .filter(|l| l.contains("New client connected") && l.contains(&needle))
            .count()
    }

    /// Whether `client_id`'s last connection is closed, by the log's last line about it.
    pub fn disconnected(&self, client_id: &str) -> bool {
        let log = self.log();
        let last = log.lines().rev().find(|l| {
            l.contains(&format!(" as {client_id} ")) || l.contains(&format!("Client {client_id} "))
        });
        last.is_some_and(|l| !l.contains("New client connected"))
    }

    /// Process id of the running broker.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn tcp_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.tcp_port)
    }

    pub fn ws_url(&self) -> String {
        format!(
            "ws://127.0.0.1:{}/mqtt",
            self.ws_port.expect("websockets listener")
        )
    }
}

/// A Python helper script from tests/support, started with the virtualenv's Python. Its first
/// line of output (e.g. a port) is returned.
pub fn start_python(script: &str, args: &[&str]) -> (Proc, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(script);
    let mut child = Command::new(python())
        .arg(&path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("first line");
    (
        Proc {
            child,
            name: "python",
        },
        line.trim().to_owned(),
    )
}

/// Runs a Python snippet with the virtualenv's Python and returns its standard output.
pub fn run_python(code: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}
