#!/usr/bin/env bash
# Set up ./.venv-lowest: the oldest Python that pyproject declares, with every direct dependency
# pinned to its declared floor (scripts/lowest_requirements.py), for the lowest-versions test run in
# .ci/run. Needs ./.venv (scripts/setup.sh) for the generator and reuses the llama-server that
# scripts/setup.sh built into the cache.
#
# The optional llama-cpp-python backend (an extra, pinned ==) is left out: its only version is the
# one the main venv tests. The tests this venv runs use llama-server only (.ci/run deselects the
# llama-cpp-python backend).
#
# The interpreter: $LOWEST_PYTHON if set, else pythonX.Y on PATH, else pyenv's X.Y.* (part of this
# machine's image). A missing interpreter is an error, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(.venv/bin/python scripts/lowest_requirements.py --python-floor)
is_floor() {  # is "$1" a working Python $floor (a pyenv shim for a version not selected is not)
    "$1" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$floor'.split('.'))))" \
        >/dev/null 2>&1
}
python=
for candidate in ${LOWEST_PYTHON:-} "$(command -v "python$floor" || true)" \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$floor".*/bin/python; do
    if [ -n "$candidate" ] && is_floor "$candidate"; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    echo "setup_lowest: no Python $floor found (set LOWEST_PYTHON, or install it, e.g. pyenv install $floor)" >&2
    exit 1
fi
# A venv made by another Python (or another version of it) is rebuilt.
if [ -x .venv-lowest/bin/python ] && ! is_floor .venv-lowest/bin/python; then
    rm -rf .venv-lowest
fi
[ -x .venv-lowest/bin/python ] || "$python" -m venv .venv-lowest
.venv/bin/python scripts/lowest_requirements.py \
    --with pytest --with pytest-timeout --with gguf --with numpy --with openai -o .venv-lowest/lowest.txt
.venv-lowest/bin/python -m pip install --quiet --upgrade pip
# Runtime floors and test tools in one resolve: a test tool that needs a newer runtime dependency
# fails here, loudly, instead of silently moving a floor.
.venv-lowest/bin/python -m pip install --quiet -r .venv-lowest/lowest.txt
.venv-lowest/bin/python -m pip install --quiet --no-deps -e .
.venv-lowest/bin/python scripts/lowest_requirements.py --verify .venv-lowest/lowest.txt
echo "setup_lowest: Python $(.venv-lowest/bin/python -c 'import platform; print(platform.python_version())'):" \
    "$(grep -v '^#' .venv-lowest/lowest.txt | grep '==' | tr '\n' ' ')"
