#!/usr/bin/env bash
# Rewrites constraints.txt with the newest releases setup.py's ranges allow today: a fresh
# venv, the README's test install without constraints, pip freeze (torch's local "+cpu"
# label dropped: PyPI's torch==2.13.0 is the same release). Then run .ci/run, which
# installs with the new file; commit it only once CI passes on it.
#
#     tools/refresh_constraints.sh && .ci/run
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[test]"
{
  echo "# Exact versions of every package the README's two installs bring, as CI last passed"
  echo "# with them (Python $("$venv/bin/python" -c 'import sys; print(*sys.version_info[:2], sep=".")'), $(uname -s) $(uname -m)); .ci/run installs with this file."
  echo "# Refresh: tools/refresh_constraints.sh, then .ci/run."
  "$venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/\+[a-z0-9.]+$//'
} > constraints.txt
git diff --stat -- constraints.txt
