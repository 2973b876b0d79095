#!/usr/bin/env bash
# Install roof-classify into .venv: pinned requirements, dev tools, and the repo in editable mode.
# Idempotent: when requirements*.txt and pyproject.toml are unchanged since the last run, it
# only checks the environment and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-stamp

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup.sh: Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
    exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup.sh: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "setup.sh: $VENV is up to date"
    exit 0
fi

echo "setup.sh: installing requirements into $VENV (a few minutes the first time)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e . --config-settings editable_mode=compat
"$VENV/bin/python" -m pip check
echo "$want" > "$STAMP"
echo "setup.sh: done"
