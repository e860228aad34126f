#!/usr/bin/env bash
# Set up lemon_magic in ./.venv: the package with both backends and its test tools, and llama.cpp
# built once, offline, for both backends (lemon_magic/build_llama_server.py).
#
# The compile is the long step (about 4 minutes on 2 cores the first time on a machine; kept in
# ~/.cache/lemon_magic/llama.cpp/, so later runs take seconds). It starts first and runs while pip
# installs the packages; set-up waits for it at the end. One line per step, with its time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
started=$SECONDS
step_started=$SECONDS
say() {  # say STEP: one progress line with the step's time and the time so far
    echo "setup: $1 ($((SECONDS - step_started)) s; $((SECONDS - started)) s in all)" >&2
    step_started=$SECONDS
}
# run from the source tree with the plain interpreter: the package is not installed yet (the
# build needs only the standard library, cmake and a C++ compiler)
"$PYTHON" -m lemon_magic.build_llama_server --check-cpu
sdist=$("$PYTHON" -m lemon_magic.build_llama_server --fetch)
say "llama.cpp sources: $sdist"

# The compile, in the background; its output (and the full log's path, on failure) is kept.
build_out=$(mktemp)
# In a session of its own, so that a failed or interrupted set-up ends the whole compile
# (cmake, ninja, the compilers), not just its Python.
setsid "$PYTHON" -m lemon_magic.build_llama_server --sdist "$sdist" >"$build_out" 2>&1 &
build_pid=$!
trap 'kill -- -"$build_pid" 2>/dev/null || true; rm -f "$build_out"' EXIT

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
say "venv ready"

# The browser test drives JupyterLab in Debian's Chromium (Playwright's own browser download
# cannot work offline): installed with apt-get, alongside, when we are root and it is missing.
apt_pid=
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
            >/dev/null) &
        apt_pid=$!
    else
        echo "setup: /usr/bin/chromium is missing; the browser test needs it (apt-get install chromium)" >&2
    fi
fi

# llama-cpp-python's Python part, without its own copy of llama.cpp (no compile: it loads ours)
wheels=$(.venv/bin/python -m lemon_magic.build_llama_server --wheel --sdist "$sdist")
# --no-compile: the packages' .pyc files are written on first import, not now, when the compile
# needs both cores
.venv/bin/python -m pip install --quiet --no-compile --find-links "$wheels" \
    -e '.[test,llama-cpp-python]'
say "packages installed"
if [ -n "$apt_pid" ]; then
    wait "$apt_pid" || { echo "setup: apt-get install chromium failed" >&2; exit 1; }
    say "chromium installed"
fi
if ! wait "$build_pid"; then
    cat "$build_out" >&2
    exit 1
fi
trap - EXIT
rm -f "$build_out"
say "llama.cpp built: $(.venv/bin/python -c 'from lemon_magic.build_llama_server import build_root; print(build_root())')"
