#!/usr/bin/env bash
# Everything strato needs on a fresh Debian 12 machine (run as root, or with sudo available):
# Debian packages, strato itself with its development tools, and the default guests.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

DEBS=(gcc make binutils cpio xz-utils zstd lz4 libseccomp2 iproute2 acpica-tools qemu-system-x86 linux-libc-dev)
missing=()
for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[dev]"

# The default guests: the Debian kernel + busybox initramfs, and the built-in test guest.
"$PYTHON" -m strato.images
"$PYTHON" -c "from strato.images.builtin import ensure_builtin_guest; print('built-in guest:', ensure_builtin_guest())"
