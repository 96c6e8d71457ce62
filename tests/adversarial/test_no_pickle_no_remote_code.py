"""No command unpickles a file or runs a model folder's own code.

Two hostile folders: one whose only weights are a pickle that, when loaded, writes a marker
file; one whose config asks for a model class from the folder's `evil.py`, which writes the
marker when imported. Every command that loads a model is run on each: it must fail with an
error naming the model, print nothing on stdout, and leave no marker.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

from hfmerge.cli.app import main
from tests.support.lm import save_lm


class _Marker:
    """Unpickling this calls `Path(marker).touch()`: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def pickle_only(folder: Path, marker: Path) -> Path:
    """A model folder with a config and tokenizer, whose only weights are a booby-trapped pickle."""
    save_lm("llama", folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Marker(marker)}))
    return folder


def custom_code(folder: Path, marker: Path) -> Path:
    """Real safetensors, but a config that maps the Auto classes to the folder's own module."""
    save_lm("llama", folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil_llama"
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModel": "evil.EvilModel",
        "AutoModelForCausalLM": "evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    return folder


HOSTILE = {"pickle": pickle_only, "remote-code": custom_code}


def commands(bad: Path, good: Path, tmp: Path) -> dict[str, list[str]]:
    """Every command that loads a model with transformers, aimed at the hostile folder."""
    route = tmp / "route.yaml"
    route.write_text(
        f"models: [{good}, {bad}]\nroute:\n  method: centroid\n"
        "  experts: [{data: builtin:code-train}, {data: builtin:prose-train}]\n"
        f"probe: {{samples: 4, max_length: 16}}\noutput: {{path: {tmp / 'routed'}}}\n"
    )
    return {
        "eval": ["eval", str(bad), "--samples", "4"],
        "cka": ["cka", str(good), str(bad), "--samples", "4"],
        "cka-reversed": ["cka", str(bad), str(good), "--samples", "4"],
        "barrier": ["barrier", str(good), str(bad), "--samples", "4", "--steps", "3"],
        "align-activation": [
            "align",
            str(good),
            str(bad),
            "--out",
            str(tmp / "aligned"),
            "--method",
            "activation",
        ],
        "run-route": ["run", str(route)],
    }


# What each command says of each hostile folder. None: the command succeeds without loading the
# folder's model through transformers at all (barrier reads B's safetensors into A's model; a
# centroid router runs only its backbone, the first model), so there is nothing to refuse.
COMMANDS = ("eval", "cka", "cka-reversed", "barrier", "align-activation", "run-route")
REFUSAL: dict[str, dict[str, str | None]] = {
    "pickle": dict.fromkeys(COMMANDS, "pickle"),
    "remote-code": {
        "eval": "own folder",
        "cka": "own folder",
        "cka-reversed": "own folder",
        "barrier": None,
        "align-activation": "model_type 'evil_llama' has none",
        "run-route": None,
    },
}


@pytest.mark.slow  # a tiny model per case, and most commands load two
@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("command", COMMANDS)
def test_a_hostile_folder_runs_no_code(
    kind: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    bad = HOSTILE[kind](tmp_path / "bad", marker)
    good = save_lm("llama", tmp_path / "good", seed=1)
    status = main(commands(bad, good, tmp_path)[command])
    captured = capsys.readouterr()
    assert not marker.exists(), f"{command} ran the {kind} payload"
    assert "Traceback" not in captured.err
    refusal = REFUSAL[kind][command]
    if refusal is None:
        assert status == 0, captured.err
        return
    assert status == 1
    assert captured.out == ""
    assert str(bad) in captured.err
    assert refusal in captured.err, captured.err
