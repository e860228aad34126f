"""Which backend flags an HTTP client may pass in ``llamacpp_args``.

A client of the HTTP API is less trusted than the notebook's user: llama-server
has flags that read or write files (``--log-file``, ``--slot-save-path``,
``--lora``, ``--chat-template-file``, ``--api-key-file``, ``--media-path``…),
reach the network (``--model-url``, ``-hf``, ``--rpc``) or even run commands
(``--tools``). A deny-list would miss the next such flag, so HTTP clients get an
allow-list of flags that only tune speed, memory and sampling; anything else is
refused with 400 unless the server was started with ``allow_any_args=True``
(``--allow-any-backend-args``). The reserved flags stay reserved either way.
"""

from __future__ import annotations

import re

from lemon_magic._templates import gemma3_template, is_template_file
from lemon_magic.errors import InvalidOptions
from lemon_magic.options import LoadOptions

__all__ = ("SAFE_FLAGS", "check_http_args", "check_http_options")

#: flags (both backends' spellings) that neither touch files nor the network
SAFE_FLAGS = frozenset({
    # llama-server
    "-fa", "--flash-attn", "-b", "--batch-size", "-ub", "--ubatch-size", "-tb", "--threads-batch",
    "-np", "--parallel", "-cb", "--cont-batching", "-nocb", "--no-cont-batching", "--mlock",
    "--no-mmap", "--mmap", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "--keep",
    "-ngl", "--n-gpu-layers", "--gpu-layers", "--temp", "--top-k", "--top-p", "--min-p",
    "--repeat-penalty", "--repeat-last-n", "--presence-penalty", "--frequency-penalty", "-s",
    "--seed", "-n", "--n-predict", "--rope-scaling", "--rope-scale", "--rope-freq-base",
    "--rope-freq-scale", "--cache-reuse", "--swa-full", "--no-warmup", "--kv-unified",
    "--no-kv-offload", "--reasoning-budget", "--reasoning-format", "--numa", "--prio",
    "--poll", "--threads-http", "--ctx-checkpoints", "--cache-ram", "-v", "--verbose",
    "--no-slots", "--slots", "--metrics", "-to", "--timeout", "--no-webui", "--no-ui",
    # llama-cpp-python's server
    "--n_batch", "--n_ubatch", "--n_threads_batch", "--flash_attn", "--use_mlock", "--use_mmap",
    "--n_gpu_layers", "--rope_freq_base", "--rope_freq_scale", "--type_k", "--type_v",
    "--offload_kqv", "--logits_all",
})
_VALUE = re.compile(r"^-?\d+(\.\d+)?$")  # a negative number is a value, not a flag


def check_http_args(args: tuple[str, ...]) -> None:
    """:raises InvalidOptions: naming the first flag an HTTP client may not pass."""
    for arg in args:
        if not arg.startswith("-") or _VALUE.match(arg):
            continue
        flag = arg.split("=", 1)[0]
        if flag not in SAFE_FLAGS:
            raise InvalidOptions(
                f"llamacpp_args may not set {flag} over HTTP: only flags that tune speed, memory "
                "or sampling are allowed (flags that read or write files, reach the network or "
                "run commands need a server started with --allow-any-backend-args)")


def check_http_options(options: LoadOptions) -> None:
    """:raises InvalidOptions: a flag :func:`check_http_args` refuses, or a ``chat_template``
    that is a file (llama-server would read any file the server can, and render it back), but the
    embedded model's own."""
    if options.extra_args:
        check_http_args(options.extra_args)
    if options.chat_template is not None and is_template_file(options.chat_template) and \
            options.chat_template != str(gemma3_template()):  # lemon_magic's own is no secret
        raise InvalidOptions(
            f"chat_template may not name a file over HTTP ({options.chat_template!r}): only a "
            "template name the backend has built in (e.g. gemma, chatml); a file needs a server "
            "started with --allow-any-backend-args")
