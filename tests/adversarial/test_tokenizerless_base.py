"""A base without tokenizer files gives an output without one: `run` says so, and the loading lines
it prints (and the card's) load only what is there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hfmerge.cli.app import main
from hfmerge.tensors import TOKENIZER_FILES, has_tokenizer
from tests.adversarial.cli_failures import one_line
from tests.support.fakehub import FakeHub
from tests.support.fakehub_models import seed_llama, write_recipe
from tests.support.lm import save_lm
from tests.support.tiny_models import save_tiny_model


def use_section(card: str) -> str:
    return card.split("## Use", 1)[1]


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_a_base_without_tokenizer_warns_once_and_prints_no_tokenizer_load(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = save_tiny_model("llama", chdir_tmp / "base", seed=0)
    other = save_lm("llama", chdir_tmp / "other", seed=1)  # an input's tokenizer is not copied
    recipe = write_recipe(chdir_tmp / "r.yaml", [str(base), str(other)], base=str(base))
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    out, err = capsys.readouterr()
    warned = warnings_in(err)
    assert len(warned) == 1, err
    assert warned[0].startswith(f"warning: the base {base} has no tokenizer files, so the output ")
    assert "has no tokenizer" in warned[0]
    output = chdir_tmp / "merged"
    assert not has_tokenizer(output)  # the warning tells the truth
    assert out.strip() == "merged"
    card = (output / "README.md").read_text()
    for shown in (one_line(err), use_section(card)):
        assert "AutoTokenizer" not in shown
        assert "No tokenizer: the base model had none" in shown
        assert "AutoModelForCausalLM.from_pretrained(" in shown


def test_a_base_with_a_tokenizer_warns_nothing_and_loads_it(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = save_lm("llama", chdir_tmp / "base", seed=0)
    other = save_tiny_model("llama", chdir_tmp / "other", seed=1)
    recipe = write_recipe(chdir_tmp / "r.yaml", [str(base), str(other)], base=str(base))
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert warnings_in(err) == []
    assert has_tokenizer(chdir_tmp / "merged")
    card = (chdir_tmp / "merged" / "README.md").read_text()
    assert "tokenizer = AutoTokenizer.from_pretrained('PATH_OR_REPO_ID')" in use_section(card)
    assert "AutoTokenizer.from_pretrained(" in err


def test_a_hub_base_without_tokenizer_warns_too(
    fake_hub: FakeHub, tmp_path: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_llama(fake_hub, tmp_path, "org/a", seed=0)  # config and weights, no tokenizer
    seed_llama(fake_hub, tmp_path, "org/b", seed=1)
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/b"])
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    warned = warnings_in(capsys.readouterr().err)
    assert len(warned) == 1
    assert warned[0].startswith("warning: the base org/a has no tokenizer")
    assert not any((chdir_tmp / "merged" / name).exists() for name in TOKENIZER_FILES)


@pytest.mark.slow  # loads the output with transformers
def test_the_printed_lines_load_a_tokenizerless_output(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = save_tiny_model("llama", chdir_tmp / "base", seed=0)
    other = save_tiny_model("llama", chdir_tmp / "other", seed=1)
    recipe = write_recipe(chdir_tmp / "r.yaml", [str(base), str(other)])
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    snippet = err.split("Load it with:\n", 1)[1]
    namespace: dict[str, object] = {}
    exec(snippet, namespace)  # the lines exactly as printed
    assert type(namespace["model"]).__name__ == "LlamaForCausalLM"
