"""The command line: data on stdout, one-paragraph errors on stderr, nothing written on error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hfmerge.cli.app import main
from hfmerge.methods import METHODS
from tests.support.tiny_models import save_tiny_model


def write_recipe(
    path: Path, models: list[str], method: str = "linear", out: str = "merged"
) -> Path:
    lines = ["models:"] + [f"  - {m}" for m in models]
    lines += ["merge:", f"  method: {method}", "output:", f"  path: {out}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_methods_lists_every_method_with_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"{name}:" in out
    assert "paper: https://" in out
    assert "density" in out


def test_archs_is_a_table_of_families_and_what_runs_on_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["archs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-5:] == ["merge", "align", "repair", "cka", "route"]
    assert lines[0].startswith("family (model types)")
    rows = {line.split(" (")[0]: line for line in lines[1:]}
    families = ("bert", "gpt2", "gpt_neox", "llama", "qwen3", "gemma", "phi3", "olmo2", "exaone4")
    for family in families:
        assert rows[family].split()[-5:] == ["yes"] * 5, rows[family]
    assert "llama (llama, mistral, ministral, qwen2, granite," in rows["llama"]
    assert "gemma (gemma, gemma2, gemma3_text)" in rows["gemma"]
    assert "olmo2 (olmo2, olmo3)" in rows["olmo2"]
    for family in ("mixtral", "qwen3_moe"):  # no REPAIR sites inside fused experts
        assert rows[family].split()[-5:] == ["yes", "yes", "no", "yes", "yes"], rows[family]
    assert lines[-1].split() == ["any", "other", "model_type", "yes", "no", "no", "no", "no"]


def test_the_readme_shows_the_archs_table_as_the_command_prints_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["archs"]) == 0
    printed = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    rows = [
        line.replace("|", " ").split()
        for line in readme.splitlines()
        if line.startswith("| ") and line.rstrip().endswith(("| yes |", "| no |"))
    ]
    assert rows == printed


def test_run_writes_model_and_prints_its_path(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = save_tiny_model("llama", chdir_tmp / "a", seed=0)
    b = save_tiny_model("llama", chdir_tmp / "b", seed=1)
    path = write_recipe(chdir_tmp / "r.yaml", [str(a), str(b)])
    assert main(["run", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "merged"
    assert "AutoModelForCausalLM.from_pretrained('merged')" in captured.err
    assert (chdir_tmp / "merged" / "config.json").exists()
    assert main(["run", str(path)]) == 1  # exists now
    assert "exists" in capsys.readouterr().err
    assert main(["run", str(path), "--force", "--out", "other"]) == 0
    assert (chdir_tmp / "other" / "README.md").exists()


def test_dry_run_prints_the_plan(chdir_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save_tiny_model("llama", chdir_tmp / "a", seed=0)
    path = write_recipe(chdir_tmp / "r.yaml", [str(a), str(a)])
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.embed_tokens.weight" in out
    assert "merge" in out
    assert not (chdir_tmp / "merged").exists()


def test_validate_reports_key_and_method_typos_in_one_error(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = chdir_tmp / "bad.yaml"
    path.write_text("modles: [a, b]\nmerge:\n  method: linaer\n")
    for command in (["validate", str(path)], ["run", str(path)]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert "unknown key 'modles'" in err
        assert "'linaer'" in err
        assert "'linear'" in err
        assert "Traceback" not in err
    assert sorted(p.name for p in chdir_tmp.iterdir()) == ["bad.yaml"]


def test_validate_ok_and_missing_model(chdir_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save_tiny_model("llama", chdir_tmp / "a", seed=0)
    good = write_recipe(chdir_tmp / "good.yaml", [str(a), str(a)])
    assert main(["validate", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    missing = write_recipe(chdir_tmp / "missing.yaml", [str(a), "./nowhere"])
    assert main(["validate", str(missing)]) == 1
    assert "./nowhere: no such directory" in capsys.readouterr().err


def test_console_script_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hfmerge", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert "run" in done.stdout
    assert "validate" in done.stdout


# Runs the console script with `cli.main` replaced, and prints what it saw: the exit status, whether
# the GC ran during the command, whether torch was imported, and whether objects were frozen.
_ENTRY_PROBE = """
import atexit, gc, sys, threading, time
import hfmerge.cli.app as cli

def command():
    atexit.register(print, "exit handler ran")
    threading.Thread(target=lambda: time.sleep(0.2) or print("thread joined")).start()
    print(gc.isenabled(), "torch" in sys.modules, gc.get_freeze_count() > 0, end=" ")
    return 3

cli.main = command
sys.argv = ["hfmerge", *sys.argv[1:]]
from hfmerge.cli.entry import console_main
console_main()
print("not reached")
"""


@pytest.mark.parametrize(
    ("args", "torch_imported"), [(["methods"], True), (["--help"], False), ([], False)]
)
def test_console_script_imports_torch_with_the_gc_paused_only_for_commands(
    args: list[str], torch_imported: bool
) -> None:
    """The command runs with the GC on, torch imported (and frozen) only for commands; the exit
    skips the teardown but keeps the status, joins threads, runs handlers and flushes output."""
    done = subprocess.run(
        [sys.executable, "-c", _ENTRY_PROBE, *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.split() == [
        "True",
        str(torch_imported),
        "True",
        "thread",
        "joined",
        "exit",
        "handler",
        "ran",
    ]


def test_import_hfmerge_stays_light_until_a_name_is_used() -> None:
    probe = (
        "import sys, hfmerge; light = 'torch' not in sys.modules; "
        "hfmerge.run_recipe; print(light, 'torch' in sys.modules, 'run_recipe' in dir(hfmerge))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True", "True"]


def test_usage_errors_exit_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "Missing argument" in err
    assert "Traceback" not in err
    assert main(["no-such-command"]) == 2


@pytest.mark.usefixtures("one_thread")  # activation probing: ten times slower on two threads
@pytest.mark.parametrize("method", ["weight", "activation"])
def test_align_writes_b_in_a_basis(
    method: str, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from safetensors.torch import load_file

    from tests.support.lm import save_lm, save_permuted_copy

    a = save_lm("llama", chdir_tmp / "a", seed=2)
    b = save_permuted_copy(a, chdir_tmp / "b", seed=9)
    assert main(["align", str(a), str(b), "--out", "c", "--method", method]) == 0
    assert capsys.readouterr().out.strip() == "c"
    original, aligned = (
        load_file(a / "model.safetensors"),
        load_file(chdir_tmp / "c" / "model.safetensors"),
    )
    for name, tensor in original.items():
        torch.testing.assert_close(aligned[name], tensor, rtol=0, atol=1e-6)
    assert (chdir_tmp / "c" / "hfmerge_permutations.safetensors").exists()
    assert main(["align", str(a), str(b), "--out", "c"]) == 1  # exists: refused without --force


@pytest.mark.parametrize(
    "kind",
    [
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
        "exaone4",
        "granite",
        "smollm3",
        "helium",
    ],
)
def test_align_undoes_a_planted_permutation_exactly(kind: str, chdir_tmp: Path) -> None:
    from safetensors.torch import load_file

    from tests.support.lm import save_permuted_copy

    a = save_tiny_model(kind, chdir_tmp / "a", seed=2)
    b = save_permuted_copy(a, chdir_tmp / "b", seed=9)
    permuted = load_file(b / "model.safetensors")
    original = load_file(a / "model.safetensors")
    assert any(not permuted[name].equal(tensor) for name, tensor in original.items())
    assert main(["align", str(a), str(b), "--out", "c", "--method", "weight"]) == 0
    aligned = load_file(chdir_tmp / "c" / "model.safetensors")
    assert aligned.keys() == original.keys()
    assert all(aligned[name].equal(tensor) for name, tensor in original.items())


def test_extract_lora_prints_the_rank_table_then_the_adapter_path(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.tiny_models import add_noise, make_tiny_model

    save_tiny_model("llama", chdir_tmp / "base")
    add_noise(make_tiny_model("llama"), seed=3, scale=0.01).save_pretrained(chdir_tmp / "tuned")
    argv = ["extract-lora", "tuned", "base", "--out", "adapter", "--rank", "2"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0] == "| tensor | shape | as | rank | energy kept |"
    assert any(
        line.startswith("| model.layers.1.mlp.up_proj.weight | 96×64 | LoRA | 2 |")
        for line in lines
    )
    assert lines[-1] == "adapter"
    assert "LoRA pairs and 0 modules saved whole" in " ".join(captured.err.split())
    assert (chdir_tmp / "adapter" / "adapter_model.safetensors").is_file()
    assert main(argv) == 1  # exists: refused without --force
    assert main([*argv, "--energy", "0.5", "--force"]) == 1  # --rank and --energy
    assert "give --rank or --energy, not both" in " ".join(capsys.readouterr().err.split())
