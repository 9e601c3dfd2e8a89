#!/usr/bin/env bash
# Provides nats-server >= 2.10 for the fabric tests (issue 12) in .tools/nats/, idempotently.
#
# Debian 12's own nats-server (2.9.10) is unfit: it silently ignores a consumer's filter_subjects
# (every subject is delivered), and its MQTT mapping has no '.'. Debian 13 (trixie) ships 2.10.x,
# a Go binary that needs only libc >= 2.34, so its .deb is downloaded with apt on a private
# configuration (apt checks the trixie signature against Debian's archive keyring, and the .deb
# against the signed index; the system's sources, lists and cache are not touched) and unpacked
# with dpkg-deb -x (no maintainer scripts, no user, no unit). See ../shared/fabric/NOTES.md.
#
#   scripts/get-nats-server.sh            # prints the binary's path last
#
# Environment (optional): NATS_DIR (default .tools/nats), SUITE (trixie), MIRROR
# (http://deb.debian.org/debian), KEYRING (Debian's archive keyring), VERSION (an exact Debian
# version to take), SHA256 (the .deb's expected checksum; stops before unpacking if it differs).
set -euo pipefail
cd "$(dirname "$0")/.."

DEST="${NATS_DIR:-.tools/nats}"
BIN="$DEST/usr/sbin/nats-server"
SUITE="${SUITE:-trixie}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
KEYRING="${KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"

# True if the binary runs and reports 2.10 or newer ("nats-server: v2.10.27").
recent_enough() {
  local version
  version="$("$1" --version 2>/dev/null | sed -n 's/^nats-server: v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
  [ -n "$version" ] || return 1
  set -- $version
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

if [ -x "$BIN" ] && recent_enough "$BIN"; then
  echo "$BIN"
  exit 0
fi

echo "get-nats-server: downloading nats-server from Debian $SUITE into $DEST" >&2
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/lists/partial" "$scratch/cache/archives/partial" "$scratch/deb"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" >"$scratch/sources.list"
if [ "$(id -u)" = 0 ] && id -u _apt >/dev/null 2>&1; then
  chown -R _apt "$scratch" # as root, apt downloads as the unprivileged user _apt
fi
apt=(apt-get -qq
  -o Dir::Etc::sourcelist="$scratch/sources.list"
  -o Dir::Etc::sourceparts=/dev/null
  -o Dir::State::Lists="$scratch/lists"
  -o Dir::Cache="$scratch/cache")
"${apt[@]}" update >&2
(cd "$scratch/deb" && "${apt[@]}" download "nats-server${VERSION:+=$VERSION}" >&2)

deb="$(ls "$scratch"/deb/nats-server_*.deb)"
sha="$(sha256sum "$deb" | cut -d' ' -f1)"
echo "get-nats-server: $(basename "$deb") sha256 $sha" >&2
if [ -n "${SHA256:-}" ] && [ "$sha" != "$SHA256" ]; then
  echo "get-nats-server: sha256 mismatch, expected $SHA256" >&2
  exit 1
fi
rm -rf "$DEST"
mkdir -p "$DEST"
dpkg-deb -x "$deb" "$DEST"
if ! recent_enough "$BIN"; then
  echo "get-nats-server: $BIN is not nats-server >= 2.10: $("$BIN" --version 2>&1 || true)" >&2
  exit 1
fi
"$BIN" --version >&2
echo "$BIN"
