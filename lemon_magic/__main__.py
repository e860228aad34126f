"""``python -m lemon_magic serve``: the same as the ``lemon-magic`` command."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from lemon_magic.server.cli import main

    sys.exit(main())
