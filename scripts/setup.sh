#!/usr/bin/env bash
# Set up lemon_magic in ./.venv: the package, its test tools, and a llama-server built offline.
# Slow only the first time on a machine: ~/.cache/lemon_magic keeps the llama-cpp-python wheel
# (~5-10 min) and llama-server (~7 min), both built for this CPU without AMX (see
# lemon_magic/build_llama_server.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# run from the source tree: the package is not installed yet
wheels=$(.venv/bin/python -m lemon_magic.build_llama_server --wheel)
.venv/bin/python -m pip install --quiet --find-links "$wheels" -e '.[test]'
.venv/bin/python -m lemon_magic.build_llama_server
# The browser test drives JupyterLab in Debian's Chromium (Playwright's own browser download
# cannot work offline). Installed with apt-get when we are root and it is missing.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "setup: /usr/bin/chromium is missing; the browser test needs it (apt-get install chromium)" >&2
    fi
fi
