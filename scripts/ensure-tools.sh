#!/usr/bin/env bash
# Installs the independent ZIP readers the tests check archives with, when they are missing.
set -euo pipefail
missing=()
command -v unzip >/dev/null || missing+=(unzip)
command -v 7z >/dev/null || command -v 7zz >/dev/null || missing+=(p7zip-full)
command -v bsdtar >/dev/null || missing+=(libarchive-tools)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root" >&2
    exit 1
fi
echo "installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq "${missing[@]}" >/dev/null
