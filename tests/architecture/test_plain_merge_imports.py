"""A plain merge reads and writes safetensors only: it never imports `transformers`.

`transformers` costs seconds to import and is what could run a model's code; a merge needs
neither. Run in a fresh interpreter, since the test process has imported it long ago.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.engine import make_models

CHECK = """
import sys
from hfmerge import api
api.run(sys.argv[1], api.RunOptions(force=True, progress=False))
heavy = {"transformers", "accelerate"}
loaded = sorted(name for name in sys.modules if name.split(".")[0] in heavy)
print(" ".join(loaded) or "none")
"""


def _run_in_fresh_interpreter(recipe: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(recipe)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.slow
def test_linear_and_ties_merges_import_no_transformers(tmp_path: Path) -> None:
    base, *tuned = make_models(tmp_path)
    for method in ("linear", "ties"):
        recipe = tmp_path / f"{method}.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "models": [
                        {"model": str(path), "weight": 0.5, "density": 0.5} for path in tuned
                    ]
                    if method == "ties"
                    else [{"model": str(path), "weight": 0.5} for path in tuned],
                    "base": str(base),
                    "merge": {"method": method},
                    "output": {"path": str(tmp_path / method)},
                }
            )
        )
        assert _run_in_fresh_interpreter(recipe) == "none", method
        assert (tmp_path / method / "config.json").is_file()
