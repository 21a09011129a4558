#!/usr/bin/env bash
# Install the Debian packages the test suite, the benchmarks and the libvirt integration tests need.
# Run as root on Debian 12. As a normal user it only reports what is missing (the tests that need
# those parts then skip locally with a reason, and fail under CI=true).
set -euo pipefail

# curl: guest-side integration tests. nginx + wrk: the metadata-server benchmark's ceiling and load.
# postgresql: store tests on a real server. libvirt/qemu: real live migration between two local "hosts".
# binutils: assembles the tiny test guest. iproute2: network namespaces for the two hosts.
# systemd: `systemd-analyze verify/security` checks the units install-unit writes. openssl: test certificates.
PKGS=(curl nginx-light wrk postgresql iproute2 util-linux binutils systemd openssl
      libvirt-dev pkg-config libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils
      libvirt-clients)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if (( ${#missing[@]} == 0 )); then
  :
elif [[ $(id -u) -ne 0 ]]; then
  echo "install-system-deps: not root; missing Debian packages: ${missing[*]}" >&2
  echo "install-system-deps: tests that need them will skip (and fail under CI=true)" >&2
  exit 0
else
  echo "install-system-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ $(id -u) -eq 0 ]]; then
  # The QEMU driver refuses to start until its system user exists, even when qemu.conf says user="root".
  getent group kvm >/dev/null || groupadd --system kvm
  getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
  id libvirt-qemu >/dev/null 2>&1 || useradd --system -g libvirt-qemu -G kvm -s /usr/sbin/nologin libvirt-qemu
  # Debian starts nginx on install; the benchmark runs its own instance on its own port.
  if command -v systemctl >/dev/null 2>&1; then systemctl stop nginx >/dev/null 2>&1 || true; fi
fi
