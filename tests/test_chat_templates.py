"""Chat templates reach the backend as meant, and every chat path sends the user's messages
(issue 17: ``--chat-template gemma`` under llama.cpp's default ``--jinja`` rendered every chat
as the one word "gemma", 3 prompt tokens, and no test noticed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from lemon_magic import InvalidOptions, Router
from lemon_magic._records import Completion
from lemon_magic._render import StatusTable
from lemon_magic._templates import GEMMA3, gemma3_template, template_label
from lemon_magic.backends.llama_cpp_python import LlamaCppPython
from lemon_magic.backends.llama_server import LlamaServer
from lemon_magic.options import ResolvedOptions

BACKENDS = ("llama-server", "llama-cpp-python")
MODEL = "gemma3-270m"
#: two questions that differ: at temperature 0 an empty prompt would answer both alike
ASK_A = "What is the capital of France?"
ASK_B = "Write the word banana three times, separated by commas."


def _resolved(template: str | None, backend: str = "llama-server") -> ResolvedOptions:
    return ResolvedOptions(backend=backend, ctx_size=512, threads=1, chat_template=template,
                           model_path="/m.gguf")


# ----------------------------------------------------------------- argv (no process)

@pytest.mark.parametrize(("template", "expected"), [
    (None, ["--jinja"]),
    # a name means llama.cpp's built-in template: only the legacy renderer takes names
    ("gemma", ["--no-jinja", "--chat-template", "gemma"]),
    ("/t/my.jinja", ["--jinja", "--chat-template-file", "/t/my.jinja"]),
])
def test_llama_server_argv_says_what_the_template_is(template: str | None, expected: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LlamaServer, "command", lambda self: ["llama-server"])
    argv = LlamaServer().argv(Path("/m.gguf"), _resolved(template), 8080)
    assert argv[-len(expected):] == expected
    assert "--chat-template" not in argv[:-len(expected)] and argv.count("--jinja") <= 1


def test_llama_cpp_python_takes_a_template_file_as_a_tokenizer_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from lemon_magic.registry import embedded_target

    monkeypatch.setattr(LlamaCppPython, "command", lambda self: ["python", "-m", "llama_cpp.server"])
    backend = LlamaCppPython()
    assert backend.argv(Path("/m.gguf"), _resolved("chatml", "llama-cpp-python"), 1)[-2:] == \
        ["--chat_format", "chatml"]
    argv = backend.argv(embedded_target(), _resolved(str(gemma3_template()), "llama-cpp-python"), 1)
    assert argv[-4:-1] == ["--chat_format", "hf-tokenizer-config", "--hf_tokenizer_config_path"]
    config = json.loads(Path(argv[-1]).read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<bos>", "<eos>")
    assert config["chat_template"].endswith(GEMMA3)


def test_a_template_is_a_name_or_a_readable_file(router: Router, tmp_path: Path) -> None:
    for bad in ("x;y", "two words", "../", ""):
        with pytest.raises(InvalidOptions):
            router.plan(MODEL, chat_template=bad)
    missing = tmp_path / "none.jinja"
    with pytest.raises(InvalidOptions, match="cannot be read"):
        router.plan(MODEL, chat_template=str(missing))
    missing.write_text("{{ messages[0]['content'] }}")
    plan = router.plan(MODEL, chat_template=str(missing))
    assert plan.options.chat_template == str(missing)
    assert template_label(str(missing)) == "none.jinja" and template_label("chatml") == "chatml"


def test_the_embedded_model_uses_gemma3s_template_file(router: Router) -> None:
    plan = router.plan(MODEL)
    assert plan.options.chat_template == str(gemma3_template())
    assert gemma3_template().read_text() == GEMMA3


# ----------------------------------------------------------------- the real model

def _apply_template(router: Router, messages: list[dict[str, str]]) -> str:
    [s] = [s for s in router.status() if s.name == MODEL]
    assert s.url is not None
    from tests.serving import backend_headers  # the backend answers only the router (issue 21)

    response = httpx.post(s.url + "/apply-template", json={"messages": messages},
                          headers=backend_headers(router, s.url), timeout=30)
    response.raise_for_status()
    prompt = response.json()["prompt"]
    assert isinstance(prompt, str)
    return prompt


def _prompt_tokens(c: Completion) -> int:
    return int(c.usage["prompt_tokens"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_sees_the_users_messages(make_router: Callable[..., Router], backend: str) -> None:
    router = make_router()
    router.load(MODEL, backend=backend)
    if backend == "llama-server":
        prompt = _apply_template(router, [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": ASK_A}])
        assert prompt == f"<start_of_turn>user\nBe brief.\n\n{ASK_A}<end_of_turn>\n<start_of_turn>model\n"
    a = router.chat(MODEL, [{"role": "user", "content": ASK_A}], max_tokens=10, temperature=0)
    b = router.chat(MODEL, [{"role": "user", "content": ASK_B}], max_tokens=10, temperature=0)
    assert isinstance(a, Completion) and isinstance(b, Completion)
    # turn markers + the question: 'What is the capital of France?' is 8 tokens, plus 8
    assert _prompt_tokens(a) == 16 and _prompt_tokens(b) > _prompt_tokens(a)
    assert a.text != b.text
    system = router.chat(MODEL, [{"role": "system", "content": "You are a pirate."},
                                 {"role": "user", "content": ASK_A}], max_tokens=4, temperature=0)
    assert isinstance(system, Completion) and _prompt_tokens(system) > _prompt_tokens(a)
    streamed = router.chat(MODEL, [{"role": "user", "content": ASK_B}], max_tokens=10,
                           temperature=0, stream=True)
    assert "".join(streamed) == b.text


def test_a_template_name_means_llama_cpps_built_in_template(router: Router) -> None:
    """``gemma`` is llama.cpp's built-in Gemma format (not the Jinja text "gemma"); tools need
    --jinja, which takes no names, so they are refused: a template file accepts them."""
    router.load(MODEL, chat_template="gemma")
    assert _apply_template(router, [{"role": "user", "content": ASK_A}]) == \
        f"<start_of_turn>user\n{ASK_A}<end_of_turn>\n<start_of_turn>model\n"
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    with pytest.raises(Exception, match="tools param requires --jinja"):
        router.chat(MODEL, [{"role": "user", "content": ASK_A}], max_tokens=2, tools=tools)
    assert router.load(MODEL).action == "reloaded"  # back to the registration's file
    c = router.chat(MODEL, [{"role": "user", "content": ASK_A}], max_tokens=2, tools=tools)
    # accepted, but pinned: Gemma 3's template has no place for tools and this llama.cpp adds
    # none, so the prompt is the question alone (16 tokens) and the base model calls nothing
    assert isinstance(c, Completion) and _prompt_tokens(c) == 16
    assert not c.response["choices"][0]["message"].get("tool_calls")


def test_a_template_file_is_used_and_is_part_of_the_no_op(router: Router, tmp_path: Path) -> None:
    mine = tmp_path / "plain.jinja"
    mine.write_text("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n"
                    "{% endfor %}{% if add_generation_prompt %}MODEL:{% endif %}")
    first = router.load(MODEL, chat_template=str(mine))
    assert first.action == "loaded"
    assert _apply_template(router, [{"role": "user", "content": ASK_A}]) == f"USER: {ASK_A}\nMODEL:"
    assert router.load(MODEL, chat_template=str(mine)).action == "noop"
    plan = router.plan(MODEL)
    assert plan.action == "reload" and set(plan.diff) == {"chat_template"}
    assert "template plain.jinja" in repr(StatusTable(router.status()))
