#!/usr/bin/env bash
# A local multi-process FLARE system (POC) for fedseg jobs: the server is named "localhost" and listens on 127.0.0.1
# only; every process this script starts is recorded by PID and stopped by PID.
#
#   poc/poc.sh prepare [--sites N] [--he] [--data-config FILE]   nvflare poc prepare (+ fedseg site settings)
#   poc/poc.sh start                                              start the server, then the sites; wait for them
#   poc/poc.sh submit JOB_FOLDER [fedseg submit options]          submit through the FLARE API, follow, download
#   poc/poc.sh status | stop | clean                              processes; stop them; stop + delete the workspace
#   poc/poc.sh run JOB_FOLDER [--sites N] [--he] [--keep-running] all of it: prepare, start, submit, stop
#
# Workspace: $FEDSEG_POC_WORKSPACE (default ~/.fedseg/poc). Ports: $FEDSEG_POC_PORTS ("FL ADMIN", default "8102 8103").
# Example (HE job, 3 sites, built-in data): poc/poc.sh run jobs/fedgs_lits_he --sites 3 --he
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
WS="${FEDSEG_POC_WORKSPACE:-$HOME/.fedseg/poc}"
read -r FL_PORT ADMIN_PORT <<< "${FEDSEG_POC_PORTS:-8102 8103}"
KITS="$WS/fedseg_poc"
ADMIN_KIT_NAME="admin@poc.org"

# every POC participant runs with this Python: install fedseg into it when it is missing
if ! python3 -c "import fedseg" 2>/dev/null; then
  echo "fedseg is not installed for $(command -v python3): pip install -e $REPO"
  python3 -m pip install -e "$REPO"
fi

cmd="${1:-}"; shift || true
case "$cmd" in
  prepare) exec fedseg poc prepare --workspace "$WS" --fl-port "$FL_PORT" --admin-port "$ADMIN_PORT" "$@" ;;
  start)   exec fedseg system start "$KITS" "$@" ;;
  submit)
    job="${1:?usage: poc/poc.sh submit JOB_FOLDER}"; shift
    kit="$(ls -d "$KITS"/prod_*/"$ADMIN_KIT_NAME" | sort -V | tail -1)"
    exec fedseg submit "$job" --kit "$kit" "$@" ;;
  status)  exec fedseg system status "$KITS" ;;
  stop)    exec fedseg system stop "$KITS" ;;
  clean)   exec fedseg poc clean --workspace "$WS" ;;
  run)
    job="${1:?usage: poc/poc.sh run JOB_FOLDER [--sites N] [--he]}"; shift
    exec fedseg poc run "$job" --workspace "$WS" --fl-port "$FL_PORT" --admin-port "$ADMIN_PORT" "$@" ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
