"""Shared by the benchmarks: measure a snippet or a command in a fresh process (wall time, peak
RSS), and write Llama-shaped bf16 checkpoints tensor by tensor (no transformers model built)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# Internal on purpose: checkpoints of GBs are written tensor by tensor, with no model built.
from hfmerge.tensors import OutputTensor, ShardWriter, plan_shards

# Runs the snippet given as argv[1] with the remaining arguments as its argv, then prints its wall
# time and the process's own peak RSS (so each approach is measured alone, in a fresh process).
# VmHWM, not ru_maxrss: ru_maxrss keeps the high-water mark of the (forked) parent across exec.
_WRAPPER = """
import sys, time
code = sys.argv[1]; sys.argv = sys.argv[1:]
start = time.perf_counter()
exec(compile(code, "<bench>", "exec"), {"__name__": "__main__"})
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
print(time.perf_counter() - start, int(hwm) / 1024)
"""

# Runs argv[1:] as a child of this small process and prints its wall time and peak RSS: the
# child's ru_maxrss is clean only when its parent is small (see above). A command that forks
# (hfmerge's two-process merges) holds the sum of its processes, so the RSS of the whole process
# tree is summed every 20 ms too; the larger of the two peaks is printed.
_TRAMPOLINE = """
import os, resource, subprocess, sys, time

def tree(root):
    pids = [root]
    for pid in pids:
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    pids += [int(child) for child in handle.read().split()]
        except OSError:
            pass  # it ended meanwhile
    return pids

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(int(l.split()[1]) for l in handle if l.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0

start = time.perf_counter()
command = subprocess.Popen(sys.argv[1:])
summed = 0
while True:
    summed = max(summed, sum(rss_kib(pid) for pid in tree(command.pid)))
    try:
        code = command.wait(timeout=0.02)
        break
    except subprocess.TimeoutExpired:
        pass
wall = time.perf_counter() - start
largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(wall, max(summed, largest) / 1024, code)
"""


def measure(code: str, *args: object) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `code` run with `args` as its argv in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, code, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall, rss = done.stdout.split()[-2:]
    return float(wall), float(rss)


def measure_command(
    argv: Sequence[str], *, env: dict[str, str] | None = None
) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a command, start to exit (interpreter start-up included)."""
    done = subprocess.run(
        [sys.executable, "-c", _TRAMPOLINE, *argv],
        capture_output=True,
        env=env,
        text=True,
        check=False,
    )
    wall, rss, code = done.stdout.split()[-3:]
    if code != "0":
        raise RuntimeError(f"{' '.join(argv)} failed ({code}):\n{done.stderr[-3000:]}")
    return float(wall), float(rss)


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama checkpoint (GQA when kv_heads < heads)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor names and shapes, in the order transformers saves them."""
        kv = self.hidden // self.heads * self.kv_heads
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab, self.hidden)
        }
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (self.hidden, self.hidden)
            shapes[p + "self_attn.k_proj.weight"] = (kv, self.hidden)
            shapes[p + "self_attn.v_proj.weight"] = (kv, self.hidden)
            shapes[p + "self_attn.o_proj.weight"] = (self.hidden, self.hidden)
            shapes[p + "mlp.gate_proj.weight"] = (self.intermediate, self.hidden)
            shapes[p + "mlp.up_proj.weight"] = (self.intermediate, self.hidden)
            shapes[p + "mlp.down_proj.weight"] = (self.hidden, self.intermediate)
            shapes[p + "input_layernorm.weight"] = (self.hidden,)
            shapes[p + "post_attention_layernorm.weight"] = (self.hidden,)
        shapes["model.norm.weight"] = (self.hidden,)
        shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes

    @property
    def parameters(self) -> int:
        """Elements over all tensors."""
        return sum(torch.Size(s).numel() for s in self.tensors().values())

    def config(self) -> dict[str, object]:
        """A config.json that transformers and mergekit read as this Llama."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "dtype": "bfloat16",
            "torch_dtype": "bfloat16",
        }


def write_model(
    path: Path, shape: LlamaShape, *, seed: int | None, shard_bytes: int = 2 * 10**9
) -> None:
    """A bf16 checkpoint written tensor by tensor: shared base weights (seeded by tensor index)
    plus, when `seed` is given, small deltas of that seed, so task vectors are meaningful."""
    shapes = shape.tensors()
    specs = [OutputTensor(name=n, dtype="BF16", shape=s) for n, s in shapes.items()]
    path.mkdir(parents=True)
    with ShardWriter(path, plan_shards(specs, max_shard_bytes=shard_bytes)) as writer:
        for index, (name, dims) in enumerate(shapes.items()):
            tensor = torch.randn(dims, generator=torch.Generator().manual_seed(index)) * 0.02
            if seed is not None:
                delta_seed = torch.Generator().manual_seed(10**6 * seed + index)
                tensor += 0.002 * torch.randn(dims, generator=delta_seed)
            if name.endswith("norm.weight"):
                tensor += 1.0
            writer.write(name, tensor.to(torch.bfloat16))
    (path / "config.json").write_text(json.dumps(shape.config(), indent=2))
