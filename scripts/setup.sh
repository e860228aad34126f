#!/usr/bin/env bash
# Set up lemon_magic in ./.venv: the package, its test tools, and a llama-server built offline.
# Slow only the first time on a machine: pip's wheel cache keeps the llama-cpp-python build
# (~5-10 min) and ~/.cache/lemon_magic keeps llama-server (~7 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
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
