#!/usr/bin/env bash
# Prepare rootful podman for the container system test (`make test-containers`) on a machine with no
# Docker engine, and print the environment that podman then needs:
#
#   eval "$(scripts/podman-prep.sh)"      installs podman, runc, netavark, aardvark-dns, iptables, debootstrap if
#                                         missing, writes containers.conf and storage.conf under $STATE, and
#                                         makes sure a python:3.12-slim base image exists
#
# When python:3.12-slim cannot be pulled (no registry reachable), a stand-in is built once from Debian
# bookworm with debootstrap: Debian's Python 3.11 with venv and pip, /usr/local/bin/python{,3} and pip
# linked, the host's extra CA certificates trusted. It is NOT the real image; it lets the Dockerfiles build.
# State (images, the conf files) lives in INFERENCEHUB_PODMAN_STATE (default /var/tmp/inferencehub-podman);
# `podman system reset -f` with that environment removes it. Run as root.
set -euo pipefail

STATE=${INFERENCEHUB_PODMAN_STATE:-/var/tmp/inferencehub-podman}
BASE=docker.io/library/python:3.12-slim
log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

(($(id -u) == 0)) || die "run as root: the container test uses rootful podman"

# 1. tools
missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap netavark:netavark aardvark-dns:aardvark-dns \
  iptables:iptables; do
  command -v "${tool%%:*}" >/dev/null || [[ -x /usr/lib/podman/${tool%%:*} ]] || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

# 2. configuration. The host's hard nofile limit may be lower than podman's default (crun then fails
#    in setrlimit), and crun does not support hybrid cgroups: pin the ulimits and use runc. Netavark
#    with aardvark-dns gives a compose network its DNS (a name with several containers resolves to all).
mkdir -p "$STATE"
export CONTAINERS_CONF=$STATE/containers.conf CONTAINERS_STORAGE_CONF=$STATE/storage.conf
nofile=$(ulimit -Hn)
[[ $nofile == unlimited ]] && nofile=1048576
((nofile > 65536)) && nofile=65536
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=4096:4096"]
[network]
network_backend = "netavark"
[engine]
runtime = "runc"
EOF
printf '[storage]\ndriver = "overlay"\ngraphroot = "%s/storage"\nrunroot = "%s/run"\n' "$STATE" "$STATE" \
  >"$CONTAINERS_STORAGE_CONF"

# 3. the base image
rm_rootfs() {  # never recurse into a /proc or /sys an interrupted debootstrap left mounted
  local m
  for m in dev/pts dev/shm dev proc sys; do
    if mountpoint -q "$STATE/rootfs/$m" 2>/dev/null; then umount -l "$STATE/rootfs/$m"; fi
  done
  rm -rf --one-file-system "$STATE/rootfs"
}
debian_mirror() {  # from this machine's apt configuration (one-line or deb822 format)
  local sources=() file
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f $file ]] && sources+=("$file")
  done
  ((${#sources[@]})) || return 0
  awk '
    $1 == "deb" { u = ""; for (i = 2; i <= NF; i++) if (u == "" && $i ~ /^(https?|file|ftp):/) u = $i
                  else if (u != "" && $i == "bookworm" && u !~ /security/) { print u; exit } }
    $1 == "URIs:" { u = $2 }
    $1 == "Suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm" && u != "" && u !~ /security/) { print u; exit } }
  ' "${sources[@]}"
}
build_stand_in() {
  local rootfs=$STATE/rootfs mirror
  mirror=$(debian_mirror)
  [[ -n $mirror ]] || die "no Debian bookworm mirror in the apt configuration: cannot build a stand-in base image"
  log "building a stand-in $BASE with debootstrap (Debian bookworm, Python 3.11): about two minutes"
  rm_rootfs
  if ! debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1; then
    tail -n 20 "$STATE/debootstrap.log" >&2
    die "debootstrap failed (log: $STATE/debootstrap.log)"
  fi
  rm -f "$STATE/debootstrap.log"
  for link in python python3; do ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/$link"; done
  for link in pip pip3; do ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/$link"; done
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED  # the real image allows a system-wide pip install
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$BASE" >/dev/null
  rm_rootfs
}
if ! podman image exists "$BASE"; then
  timeout 60 podman pull -q "$BASE" >/dev/null 2>&1 || build_stand_in
fi
podman image exists localhost/python:3.12-slim || podman tag "$BASE" python:3.12-slim
log "podman ready; base image $BASE"
printf 'export CONTAINERS_CONF=%q CONTAINERS_STORAGE_CONF=%q\n' "$CONTAINERS_CONF" "$CONTAINERS_STORAGE_CONF"
