#!/usr/bin/env bash
# Install what Enersis needs on Debian 12 (as root): only the missing packages.
# Do NOT add libvirt-daemon-system: it expects systemd (see the lab notes).
set -euo pipefail
PKGS=(
  rabbitmq-server                        # the broker
  libvirt-dev pkg-config gcc python3-dev python3-venv   # building libvirt-python
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86  # real hypervisor lab
  openssh-server openssh-client iproute2 # power lab: sshd and network namespaces
  procps psmisc curl
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages (run as root to install): ${missing[*]}" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The rabbitmq-server package may try to start a system broker; we run our own.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Stop a system broker the package may have started, so ports and epmd are ours.
  if command -v invoke-rc.d >/dev/null && pgrep -f 'rabbit@' >/dev/null 2>&1; then
    invoke-rc.d rabbitmq-server stop >/dev/null 2>&1 || true
  fi
fi
