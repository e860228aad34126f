"""Chat templates: llama.cpp's built-in names, Jinja files, and the one lemon_magic ships.

A load's ``chat_template`` is either the **name** of a template the backend has
built in (``gemma``, ``chatml``, ...; for llama-server, llama.cpp's list) or a
**Jinja file** (a path: it has a ``/`` or ends in ``.jinja``). llama-server runs
a name with ``--no-jinja --chat-template NAME`` and a file with ``--jinja
--chat-template-file PATH``: since llama.cpp turned ``--jinja`` on by default, a
bare ``--chat-template gemma`` is read as a Jinja template whose whole text is
the word "gemma", and every chat renders as that word (issue 17).

The embedded base model has no template of its own; its registration names
:func:`gemma3_template`, Gemma 3's own Jinja template (kept here as text and
written to the cache when first needed, so it needs no package data).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lemon_magic._paths import cache_dir
from lemon_magic.errors import InvalidOptions

__all__ = ("GEMMA3", "gemma3_template", "is_template_file", "llama_cpp_python_config",
           "resolve_template", "template_label")

#: Gemma 3's chat template as Google ships it in the ``tokenizer_config.json`` of the
#: ``google/gemma-3-*-it`` models: a system message is folded into the first user turn,
#: "assistant" is the "model" role
GEMMA3 = """\
{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""


def _write_once(path: Path, text: str) -> Path:
    """``path`` holding ``text``: written (atomically) only when missing or different."""
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def gemma3_template() -> Path:
    """Gemma 3's template as a file (``<cache>/templates/gemma3.jinja``), written if missing."""
    path = cache_dir() / "templates" / "gemma3.jinja"
    try:
        if path.stat().st_size == len(GEMMA3.encode()):
            return path
    except OSError:
        pass
    return _write_once(path, GEMMA3)


def is_template_file(value: str) -> bool:
    """``value`` names a Jinja file (it has a ``/`` or ends in ``.jinja``), not a built-in name."""
    return "/" in value or os.sep in value or value.endswith(".jinja")


def resolve_template(value: str | None) -> str | None:
    """A template name as it is; a file as its absolute path (the same file is the same load).

    :raises InvalidOptions: a file that does not exist or cannot be read.
    """
    if value is None or not is_template_file(value):
        return value
    path = Path(value).expanduser().absolute()
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise InvalidOptions(f"chat_template file {str(path)!r} cannot be read "
                             f"({exc.strerror or exc})") from None
    return str(path)


def template_label(value: str) -> str:
    """How a template is shown in one line: a name as it is, a file by its file name."""
    return Path(value).name if is_template_file(value) else value


def llama_cpp_python_config(template: str, bos: str, eos: str) -> Path:
    """A ``tokenizer_config.json`` for llama-cpp-python's ``hf-tokenizer-config`` chat format,
    carrying the Jinja file ``template`` (its only way to take a template file).

    That format appends an empty assistant message and passes no ``add_generation_prompt``;
    the template is wrapped to drop that message and ask for the generation prompt, so it
    renders as llama-server renders it. Written once per (template, bos, eos) to the cache.
    """
    text = Path(template).read_text(encoding="utf-8")
    wrapped = ("{%- set messages = messages[:-1] -%}{%- set add_generation_prompt = true -%}"
               + text)
    config = json.dumps({"chat_template": wrapped, "bos_token": bos, "eos_token": eos})
    digest = hashlib.sha256(config.encode()).hexdigest()[:16]
    return _write_once(cache_dir() / "templates" / f"tokenizer_config-{digest}.json", config)
