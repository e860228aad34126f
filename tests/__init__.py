"""The test suite. Importing it (both conftests do, before any router or kernel starts) makes
every backend of the tests, and of the notebook kernels nbval starts, run llama.cpp's baseline CPU
variant (``$LEMON_MAGIC_CPU``, lemon_magic/build_llama_server.py): greedy text, and so the stored
notebook outputs, are the same on every x86-64 machine."""

import os

os.environ["LEMON_MAGIC_CPU"] = "baseline"
