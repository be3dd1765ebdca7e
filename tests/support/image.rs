//! The operator's image, built once per test binary with podman from the repository's
//! `Dockerfile` (tests/image.rs, tests/node.rs). No registry is reachable here, so
//! tests/images/base-images.sh first makes the two base images the Dockerfile names, as local
//! stand-ins from Debian's packages; the build runs with `--pull=never`.
//! `IOT_OPERATOR_TEST_IMAGE=<name>` uses an image built elsewhere instead.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// Flags every podman call needs on these machines: crun refuses the hybrid cgroup layout.
pub const PODMAN: [&str; 4] = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"];
/// The hard open-files limit here is 20000 (podman's default of 1048576 cannot be set).
pub const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=4096:4096",
];

pub fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(PODMAN);
    cmd
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Why the image tests cannot run here, if they cannot.
pub fn missing() -> Option<String> {
    if std::env::var_os("IOT_OPERATOR_TEST_IMAGE").is_some() {
        return None;
    }
    let podman_ok = Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !podman_ok {
        return Some("no podman on PATH (tests/run.sh installs it from apt)".into());
    }
    let debootstrap = ["/usr/sbin/debootstrap", "/usr/bin/debootstrap"]
        .iter()
        .any(|p| Path::new(p).exists());
    if !debootstrap {
        return Some("no debootstrap, which makes the builder base image".into());
    }
    None
}

/// What building the image gave: its name, size and how long the build took.
#[derive(Debug, Clone)]
pub struct Built {
    pub name: String,
    pub size_bytes: u64,
    pub seconds: f64,
}

/// Builds the image once per test binary (every test here waits for the same build);
/// `Err` holds why it failed, `Ok(None)` means skipped.
pub fn image() -> Result<Option<Built>, String> {
    static IMAGE: OnceLock<Result<Option<Built>, String>> = OnceLock::new();
    IMAGE.get_or_init(build).clone()
}

fn build() -> Result<Option<Built>, String> {
    if let Ok(name) = std::env::var("IOT_OPERATOR_TEST_IMAGE") {
        return Ok(Some(Built {
            size_bytes: size_of(&name)?,
            name,
            seconds: 0.0,
        }));
    }
    if let Some(why) = missing() {
        eprintln!("\n*** SKIPPED: image tests: {why}.\n*** See README.md, 'Tests of the image'.\n");
        return Ok(None);
    }
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(root().join("tests/images/base-images.sh"))
        .output()
        .map_err(|e| format!("tests/images/base-images.sh: {e}"))?;
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!(
            "tests/images/base-images.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let bases = started.elapsed().as_secs_f64();
    let name = "localhost/iot-operator:test".to_owned();
    let log = std::env::temp_dir().join(format!(
        "iot-operator-image-build-{}.log",
        std::process::id()
    ));
    let started = Instant::now();
    let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = podman();
    cmd.args([
        "build",
        "--pull=never",
        "--layers",
        "-f",
        "Dockerfile",
        "-t",
        &name,
    ])
    .args(ULIMITS);
    // This machine reaches crates.io through a TLS-inspecting proxy whose CA only the host
    // trusts: lend the host's bundle to the build's RUN steps (nothing of it lands in a layer,
    // so the cached layers stay valid when the CA changes).
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    if Path::new(bundle).exists() {
        cmd.args(["--volume", &format!("{bundle}:{bundle}:ro")]);
    }
    let status = cmd
        .arg(".")
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(file.try_clone().map_err(|e| e.to_string())?)
        .stderr(file)
        .status()
        .map_err(|e| format!("podman build: {e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if !status.success() {
        let lines: Vec<&str> = text.lines().collect();
        return Err(format!(
            "podman build failed ({status}); the last lines of {}:\n{}",
            log.display(),
            lines[lines.len().saturating_sub(60)..].join("\n")
        ));
    }
    // Kept only when the build fails (the error names it).
    let _ = std::fs::remove_file(&log);
    let steps = text.lines().filter(|l| l.contains("STEP ")).count();
    let cached = text.lines().filter(|l| l.contains("Using cache")).count();
    let size_bytes = size_of(&name)?;
    eprintln!(
        "image {name}: built in {seconds:.1} s ({steps} steps, {cached} from cache; base images \
         checked or made in {bases:.1} s), {:.1} MiB",
        size_bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(Some(Built {
        name,
        size_bytes,
        seconds,
    }))
}

pub fn size_of(name: &str) -> Result<u64, String> {
    let out = podman()
        .args(["image", "inspect", "--format", "{{.Size}}", name])
        .output()
        .map_err(|e| format!("podman image inspect: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("size of {name}: {e}"))
}
