#!/usr/bin/env bash
# Build and install pgvector for Debian's PostgreSQL 15 (bookworm ships no package for it).
# Recipe from ../shared/notes/pgvector.md: the pgvector source package of Debian's next release builds
# against PostgreSQL 15 unchanged. OPTFLAGS="" avoids -march=native so the build runs on any x86-64.
# Needs root and the Debian archive; idempotent (does nothing when vector.control is already there).
set -euo pipefail
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
if [ ! -x "$PG_CONFIG" ] && [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15 >/dev/null
fi
share=$("$PG_CONFIG" --sharedir 2>/dev/null || echo /usr/share/postgresql/15)
if [ -f "$share/extension/vector.control" ]; then
  echo "pgvector already installed for PostgreSQL 15"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "installing pgvector for PostgreSQL 15 needs root (apt-get and make install)" >&2
  exit 1
fi
cat > /etc/apt/sources.list.d/pgvector-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-server-dev-15 build-essential dpkg-dev >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get source --download-only pgvector >/dev/null
tar xzf pgvector_*.orig.tar.gz
cd pgvector-*/
make -s OPTFLAGS="" PG_CONFIG="$PG_CONFIG" >/dev/null
make -s install PG_CONFIG="$PG_CONFIG" >/dev/null
echo "pgvector $(grep default_version vector.control | cut -d"'" -f2) installed for PostgreSQL 15"
