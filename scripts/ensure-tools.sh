#!/usr/bin/env bash
# Installs the independent ZIP readers the tests check archives with, when they are missing: Info-ZIP,
# 7-Zip, libarchive's bsdtar, and a Java runtime for tests/java/ZipCheck.java (Debian's headless JRE
# carries the compiler module that runs a single source file). The tests fail, never skip, without them.
set -euo pipefail
missing=()
command -v unzip >/dev/null || missing+=(unzip)
command -v 7z >/dev/null || command -v 7zz >/dev/null || missing+=(p7zip-full)
command -v bsdtar >/dev/null || missing+=(libarchive-tools)
command -v java >/dev/null || missing+=(default-jre-headless)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root" >&2
    exit 1
fi
echo "installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
