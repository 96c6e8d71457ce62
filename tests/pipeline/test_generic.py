"""Plain merges of model_types without a family, end to end; steps that permute refuse them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from hfmerge import api
from hfmerge.errors import NoPermutationSpecError
from hfmerge.lm.load import load_model
from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from hfmerge.sources.inspection import inspect_model
from hfmerge.sources.refs import ModelSource
from tests.support.any_models import ANY_MODELS, LLAMA_FAMILY, any_inputs, save_any_model
from tests.support.weights import read_weights

QUIET = RunOptions(progress=False)
TOKENIZER_CONFIG = "tokenizer_config.json"


def _recipe(models: list[Any], out: Path, **extra: Any) -> Any:
    return parse_recipe(
        {"models": models, "merge": {"method": "linear"}, "output": {"path": str(out)}, **extra}
    )


def _pair(kind: str, root: Path) -> tuple[Path, Path]:
    """Two noisy copies of one random model (fine-tune stand-ins), each with its own tokenizer
    config, so the output shows whose side files it took."""
    pair = []
    for name, noise in (("a", 1), ("b", 2)):
        path = save_any_model(kind, root / name, noise_seed=noise)
        (path / TOKENIZER_CONFIG).write_text(json.dumps({"model_max_length": noise}))
        pair.append(path)
    return pair[0], pair[1]


@pytest.mark.parametrize("kind", sorted(ANY_MODELS))
def test_any_model_type_merges_linearly_and_loads_with_its_auto_class(
    kind: str, tmp_path: Path, one_thread: None
) -> None:
    a, b = _pair(kind, tmp_path)
    out = tmp_path / "out"
    models = [{"model": str(a), "weight": 0.25}, {"model": str(b), "weight": 0.75}]
    run_recipe(_recipe(models, out), QUIET)
    wa, wb, merged = read_weights(a), read_weights(b), read_weights(out)
    assert merged.keys() == wa.keys()  # the base's tensors, no more (a tied head stays absent)
    for name, tensor in merged.items():
        if tensor.is_floating_point():
            expected = 0.25 * wa[name] + 0.75 * wb[name]
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(tensor, wa[name]), name
    for side in ("config.json", TOKENIZER_CONFIG, "generation_config.json"):
        if (a / side).exists():
            assert (out / side).read_text() == (a / side).read_text(), side
    model = load_model(out, label=str(out))
    assert type(model).__name__ == json.loads((a / "config.json").read_text())["architectures"][0]
    with torch.no_grad():
        logits = model(**any_inputs(kind)).logits
    assert logits.shape[0] == 2
    assert torch.isfinite(logits).all()


def test_a_tied_head_is_not_written_and_loads_tied(tmp_path: Path, one_thread: None) -> None:
    a, b = _pair("t5", tmp_path)
    inspected = inspect_model(ModelSource(ref=str(a), path=a))
    assert inspected.spec.tied == {"lm_head.weight": "shared.weight"}
    out = tmp_path / "out"
    run_recipe(_recipe([str(a), str(b)], out), QUIET)
    assert "lm_head.weight" not in read_weights(out)
    t5: Any = load_model(out, label="out")  # T5ForConditionalGeneration
    assert t5.lm_head.weight is t5.shared.weight  # tied again on load, not a random head


@pytest.mark.parametrize("kind", ["t5", "vit"])
def test_a_generic_merge_of_a_model_with_itself_is_the_model(kind: str, tmp_path: Path) -> None:
    a = save_any_model(kind, tmp_path / "a")
    spec = inspect_model(ModelSource(ref=str(a), path=a)).spec
    assert (spec.family, spec.permutable) == ("generic", False)
    out = tmp_path / "out"
    run_recipe(_recipe([str(a), str(a)], out), QUIET)
    original, merged = read_weights(a), read_weights(out)
    assert original.keys() == merged.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, merged[name]), name


@pytest.mark.parametrize(
    ("extra", "feature"),
    [
        ({"align": {"method": "weight"}}, "`align:` (permutation alignment)"),
        ({"align": {"method": "activation"}}, "`align:` (permutation alignment)"),
        ({"align": {"repair": True}}, "`align.repair` (REPAIR)"),
        ({"check": {"cka_min": 0.5}}, "the CKA gate `check:`"),
    ],
)
def test_steps_that_permute_refuse_a_generic_recipe_before_any_work(
    extra: dict[str, Any], feature: str, tmp_path: Path
) -> None:
    a, b = _pair("t5", tmp_path)
    out = tmp_path / "out"
    with pytest.raises(NoPermutationSpecError) as caught:
        run_recipe(_recipe([str(a), str(b)], out, **extra), QUIET)
    error = caught.value
    assert (error.model, error.model_type, error.feature) == (str(a), "t5", feature)
    assert LLAMA_FAMILY in str(error)
    assert not out.exists()


def test_a_route_backbone_without_a_spec_is_refused(tmp_path: Path) -> None:
    a, b = _pair("t5", tmp_path)
    route = {"method": "centroid", "experts": [{"data": "builtin:code-train"}] * 2}
    recipe = parse_recipe(
        {"models": [str(a), str(b)], "route": route, "output": {"path": str(tmp_path / "out")}}
    )
    with pytest.raises(NoPermutationSpecError, match="router backbone"):
        run_recipe(recipe, QUIET)


@pytest.mark.parametrize("align", ["weight", "activation", "none+repair"])
def test_barrier_and_align_refuse_a_generic_pair(align: str, tmp_path: Path) -> None:
    a, b = _pair("t5", tmp_path)
    with pytest.raises(NoPermutationSpecError, match=re.escape(f"`barrier --align {align}`")):
        api.barrier(str(a), str(b), align=align, progress=False)
    if align != "none+repair":
        with pytest.raises(NoPermutationSpecError, match="`hfmerge align`"):
            api.align(str(a), str(b), tmp_path / "aligned", method=align, progress=False)  # type: ignore[arg-type]
        assert not (tmp_path / "aligned").exists()
