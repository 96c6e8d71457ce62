"""A Llama whose residual stream is rotated within blocks of units: the same function, mixed units;
and a copy rotated by a full random orthogonal map (`save_mapped_copy`) for orthogonal alignment.

RMSNorm without a gain commutes with any orthogonal map Q (‖hQ‖ = ‖h‖), so after folding each
norm's gain into the weights that read its output, writing every residual state as hQ keeps the
function: readers of the stream take W·Q, writers (embeddings, o_proj, down_proj) put out Qᵀ·W.
With Q block-diagonal the hidden states of the copy are those of the source mixed inside each
block, the planted many-to-many case of `hfmerge units` at model level.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hfmerge.arch import spec_for
from hfmerge.arch.residual import BasisMap, lift_rotation, map_state_dict, rotation_space
from hfmerge.arch.spec import ArchSpec
from tests.support.tiny_models import nontrivial_permutations

_READERS = {  # norm gain -> the weights [out, hidden] that read the normed stream
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # weights [hidden, in] that add to the stream


def random_orthogonal(width: int, *, seed: int) -> torch.Tensor:
    """A random float64 [width, width] orthogonal matrix (QR of Gaussian noise)."""
    noise = torch.randn(width, width, generator=torch.Generator().manual_seed(seed))
    q: torch.Tensor = torch.linalg.qr(noise.double()).Q  # [width, width], orthogonal
    return q


def block_rotation(width: int, *, block: int, seed: int, min_entry: float = 0.2) -> torch.Tensor:
    """A block-diagonal orthogonal [width, width] matrix of random `block`×`block` rotations,
    each mixing all its units: every entry at least `min_entry` in size (a rotation with a tiny
    entry is close to one that mixes fewer units, and the planted block would be ambiguous)."""
    generator = torch.Generator().manual_seed(seed)
    rotation = torch.zeros(width, width, dtype=torch.float64)
    for start in range(0, width - width % block, block):
        while True:
            noise = torch.randn(block, block, generator=generator, dtype=torch.float64)
            q, _ = torch.linalg.qr(noise)  # [block, block], orthogonal
            if float(q.abs().min()) >= min_entry:
                break
        rotation[start : start + block, start : start + block] = q
    return rotation  # [width, width]


def rotated_state_dict(
    tensors: dict[str, torch.Tensor], rotation: torch.Tensor, *, layers: int
) -> dict[str, torch.Tensor]:
    """A Llama state dict (untied head, no biases) with its residual stream written as hQ."""
    t = {name: value.double() for name, value in tensors.items()}
    q = rotation
    out = dict(t)
    out["model.embed_tokens.weight"] = t["model.embed_tokens.weight"] @ q  # [V, d] @ [d, d]
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for norm, readers in _READERS.items():
            gain = t[f"{prefix}{norm}.weight"]  # [d]
            out[f"{prefix}{norm}.weight"] = torch.ones_like(gain)
            for reader in readers:
                name = f"{prefix}{reader}.weight"
                out[name] = (t[name] * gain) @ q  # [out, d] scaled by column, then rotated
        for writer in _WRITERS:
            name = f"{prefix}{writer}.weight"
            out[name] = q.T @ t[name]  # [d, d] @ [d, in]
    gain = t["model.norm.weight"]
    out["model.norm.weight"] = torch.ones_like(gain)
    out["lm_head.weight"] = (t["lm_head.weight"] * gain) @ q  # [V, d]
    return {name: value.to(tensors[name].dtype).contiguous() for name, value in out.items()}


def save_rotated_copy(source: Path, out: Path, *, block: int, seed: int) -> Path:
    """`source` (a tiny Llama directory) with its residual stream rotated within blocks."""
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    rotation = block_rotation(int(config["hidden_size"]), block=block, seed=seed)
    tensors = load_file(out / "model.safetensors")
    rotated = rotated_state_dict(tensors, rotation, layers=int(config["num_hidden_layers"]))
    save_file(rotated, out / "model.safetensors", metadata={"format": "pt"})
    return out


def save_mapped_copy(source: Path, out: Path, *, seed: int) -> Path:
    """`source` (a saved tiny pre-norm model: Llama-style, GPT-2) folded, every group permuted and
    its residual stream rotated by a random orthogonal matrix (fixing 1 under LayerNorm): the same
    function in a basis no permutation reaches (the head untied if it was tied)."""
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(out / "model.safetensors")
    spec = spec_for(config, tensors.keys())
    basis = BasisMap(
        nontrivial_permutations(spec, seed=seed),
        fold=True,
        rotation=allowed_rotation(spec, seed=seed),
    )
    mapped = map_state_dict({n: t.double() for n, t in tensors.items()}, spec, basis)
    dtypes = {n: tensors[spec.tied.get(n, n)].dtype for n in mapped}
    save_file(
        {n: t.to(dtypes[n]).contiguous() for n, t in mapped.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config))
    return out


def allowed_rotation(spec: ArchSpec, *, seed: int) -> torch.Tensor:
    """A random orthogonal map of `spec`'s residual stream that keeps its function: any, or one
    fixing the all-ones direction where its norms centre (LayerNorm)."""
    space = rotation_space(spec)
    width = spec.groups["residual"].size if space is None else space.shape[1]
    return lift_rotation(space, random_orthogonal(width, seed=seed))
