#!/usr/bin/env bash
# Makes local stand-ins for the two base images the Dockerfile names, for machines that cannot
# reach an image registry (the test suite's). Run as root; needs podman, debootstrap and apt.
#
#   builder: the Dockerfile's first FROM (rust:<version>-bookworm): a Debian bookworm root
#            filesystem (debootstrap) with gcc and libc6-dev, carrying this machine's Rust
#            toolchain in /usr/local/rustup and /usr/local/cargo, as the official image lays it out.
#   runtime: the Dockerfile's last FROM (distroless cc, nonroot): glibc, libgcc, CA certificates,
#            netbase and a passwd naming user 65532, from Debian's packages, no shell.
#
# Each image is made once and kept (podman's storage); IOT_OPERATOR_REMAKE_BASE_IMAGES=1 remakes.
# The tags are read from the Dockerfile, so a changed FROM makes new stand-ins.
set -euo pipefail
cd "$(dirname "$0")/../.."
log() { printf '==> base-images: %s\n' "$*" >&2; }

work="${IOT_OPERATOR_IMAGE_WORK:-/var/tmp/iot-operator-base-images}"
mapfile -t froms < <(sed -n 's/^FROM[[:space:]]\+\([^[:space:]]\+\).*/\1/p' Dockerfile)
[ "${#froms[@]}" -ge 2 ] || { log "the Dockerfile has fewer than two FROM lines"; exit 1; }
builder="${froms[0]}"
runtime="${froms[${#froms[@]}-1]}"
podman_() { podman --runtime runc --cgroup-manager=cgroupfs "$@"; }
have() { [ "${IOT_OPERATOR_REMAKE_BASE_IMAGES:-0}" != 1 ] && podman_ image exists "$1"; }

make_builder() {
  local sysroot version rootfs
  sysroot="$(rustc --print sysroot)"
  version="$(rustc --version | cut -d' ' -f2)"
  case "$builder" in
    *rust:"${version%.*}"-*|*rust:"$version"-*) ;;
    *) log "the Dockerfile asks for $builder, this machine has rustc $version"; exit 1 ;;
  esac
  rootfs="$work/builder"
  rm -rf "$rootfs"
  mkdir -p "$work"
  log "debootstrap bookworm into $rootfs (a few minutes)"
  debootstrap --variant=minbase --include=ca-certificates,gcc,libc6-dev,make,pkg-config \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  log "copying rustc $version from $sysroot (documentation left out)"
  mkdir -p "$rootfs/usr/local/rustup/toolchains/$version" "$rootfs/usr/local/cargo/bin"
  tar -C "$sysroot" --exclude=./share/doc -cf - . | tar -C "$rootfs/usr/local/rustup/toolchains/$version" -xf -
  for tool in cargo rustc rustdoc; do
    ln -sf "/usr/local/rustup/toolchains/$version/bin/$tool" "$rootfs/usr/local/cargo/bin/$tool"
  done
  # The same cargo registry settings as this machine.
  for cfg in "${CARGO_HOME:-$HOME/.cargo}/config.toml" "${CARGO_HOME:-$HOME/.cargo}/config"; do
    if [ -f "$cfg" ]; then cp "$cfg" "$rootfs/usr/local/cargo/"; fi
  done
  chmod -R a+w "$rootfs/usr/local/cargo"
  tar -C "$rootfs" -cf "$work/builder.tar" .
  podman_ import --quiet \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "ENV RUST_VERSION=$version" \
    --change 'CMD ["bash"]' \
    "$work/builder.tar" "$builder" >/dev/null
  rm -rf "$work/builder.tar" "$rootfs"
}

make_runtime() {
  local rootfs debs pkg
  rootfs="$work/runtime"
  debs="$work/debs"
  rm -rf "$rootfs" "$debs"
  mkdir -p "$rootfs" "$debs"
  log "downloading libc6, libgcc-s1, ca-certificates, netbase, tzdata"
  (cd "$debs" && apt-get download -q libc6 libgcc-s1 ca-certificates netbase tzdata >/dev/null 2>&1) || {
    apt-get update -qq
    (cd "$debs" && apt-get download -q libc6 libgcc-s1 ca-certificates netbase tzdata >/dev/null)
  }
  for pkg in "$debs"/*.deb; do dpkg-deb -x "$pkg" "$rootfs"; done
  # ca-certificates ships the certificates; its postinst builds the bundle, which we do here.
  mkdir -p "$rootfs/etc/ssl/certs"
  find "$rootfs/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z | xargs -0 cat \
    >"$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs/usr/share/doc" "$rootfs/usr/share/man" "$rootfs/usr/share/lintian" "$rootfs/usr/share/locale"
  mkdir -p "$rootfs/tmp" "$rootfs/home/nonroot" "$rootfs/root"
  chmod 1777 "$rootfs/tmp"
  chown 65532:65532 "$rootfs/home/nonroot"
  cat >"$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
  cat >"$rootfs/etc/group" <<'GROUP'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
GROUP
  echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"
  tar -C "$rootfs" -cf "$work/runtime.tar" .
  podman_ import --quiet --change 'USER 65532:65532' --change 'WORKDIR /home/nonroot' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    "$work/runtime.tar" "$runtime" >/dev/null
  rm -rf "$work/runtime.tar" "$rootfs" "$debs"
}

if have "$builder"; then log "$builder is there"; else make_builder; log "made $builder"; fi
if have "$runtime"; then log "$runtime is there"; else make_runtime; log "made $runtime"; fi
