"""Named chat templates render the formats mergekit's templates of those names render."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from hfmerge.recipe.chat_templates import AUTO, NAMED, chat_template

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "hello\n"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ],
    [{"role": "user", "content": "q"}, {"role": "user_context", "content": "ctx"}],
]


def render(template: str, conversation: list[dict[str, Any]], *, prompt: bool) -> str:
    try:
        rendered = render_jinja_template(
            [conversation],
            chat_template=template,
            add_generation_prompt=prompt,
            bos_token="<s>",
            eos_token="</s>",
        )
    except Exception as exc:  # a template may refuse a conversation: both must refuse it
        return f"refused: {type(exc).__name__}"
    return str(rendered[0][0])  # (texts, generation indices) -> the one conversation's text


@pytest.mark.mergekit
@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "alpaca"])
@pytest.mark.parametrize("prompt", [False, True])
def test_named_templates_render_as_mergekits(name: str, prompt: bool) -> None:
    templates = pytest.importorskip("mergekit._data.chat_templates")
    theirs = importlib.resources.files(templates).joinpath(f"{name}.jinja").read_text()
    for conversation in CONVERSATIONS:
        ours = render(NAMED[name], conversation, prompt=prompt)
        assert ours == render(theirs, conversation, prompt=prompt), conversation


def test_exaone_renders_its_turns_without_stray_whitespace() -> None:
    text = render(NAMED["exaone"], CONVERSATIONS[0], prompt=True)
    assert (
        text
        == "[|system|][|endofturn|]\n[|user|] hi \n[|assistant|]hello\n[|endofturn|]\n[|assistant|]"
    )


def test_auto_takes_the_most_common_template_and_text_and_files_pass_through(
    tmp_path: Path,
) -> None:
    assert chat_template(AUTO, ["{{ a }}", None, " {{ b }}", "{{ b }}"]) == "{{ b }}"
    assert chat_template(AUTO, [None, None]) is None
    assert chat_template("{{ messages }}", []) == "{{ messages }}"
    file = tmp_path / "t.jinja"
    file.write_text("{{ x }}")
    assert chat_template(str(file), []) == "{{ x }}"
