"""Building and caching the zoo's members: small LMs trained on stdlib code and pydoc prose.

Llama-style members (two seeds and two specialists of seed0) and a GPT-2 seed pair of the same
width and depth, so alignment can be measured on both families.

Members are built on first use, deterministically, and cached under `$HFMERGE_CACHE/zoo/<hash>/`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfmerge.errors import UnknownNameError
from hfmerge.zoo import corpus
from hfmerge.zoo.config import ZooArch, ZooConfig, configured_zoo

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from hfmerge.zoo.config import ZooArch
    from hfmerge.zoo.train import TrainResult

# torch and transformers are imported lazily: a cache hit (and `corpus`) should not pay for them.

ZOO_FORMAT = 1  # bump when the way members are built changes, so old caches are not reused

ZOO_MEMBERS: dict[str, str] = {
    "seed0": "base LM trained on mixed stdlib code and pydoc prose, seed 0",
    "seed1": "same architecture and data as seed0, different init and data-order seed (1)",
    "code": "seed0 fine-tuned on Python standard-library source only (code specialist)",
    "prose": "seed0 fine-tuned on pydoc_data English prose only (prose specialist)",
    "gpt2-seed0": "GPT-2-style LM (LayerNorm, GELU, learned positions, tied head), seed 0",
    "gpt2-seed1": "same GPT-2-style architecture and data as gpt2-seed0, seed 1",
}


@dataclass(frozen=True)
class _Recipe:
    """How one member is trained: its seed, parent (None: from scratch), batch mix and family."""

    seed: int
    parent: str | None
    domains: tuple[str, ...]
    arch: ZooArch = "llama"


_RECIPES: dict[str, _Recipe] = {
    "seed0": _Recipe(seed=0, parent=None, domains=("code", "prose")),
    "seed1": _Recipe(seed=1, parent=None, domains=("code", "prose")),
    "code": _Recipe(seed=2, parent="seed0", domains=("code",)),
    "prose": _Recipe(seed=3, parent="seed0", domains=("prose",)),
    # Same seeds as the Llama pair: the family, not the data order, is what differs.
    "gpt2-seed0": _Recipe(seed=0, parent=None, domains=("code", "prose"), arch="gpt2"),
    "gpt2-seed1": _Recipe(seed=1, parent=None, domains=("code", "prose"), arch="gpt2"),
}


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "zoo_format": str(ZOO_FORMAT),
    }


def _cache_key(config: ZooConfig) -> str:
    payload = {"config": asdict(config), "corpus": corpus.corpus_hash(), "versions": _versions()}
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def zoo_cache_dir(config: ZooConfig | None = None) -> Path:
    """`$HFMERGE_CACHE` (default `~/.cache/hfmerge`) / `zoo/<config+corpus+versions hash>/`."""
    root = os.environ.get("HFMERGE_CACHE") or str(Path.home() / ".cache" / "hfmerge")
    return Path(root).expanduser() / "zoo" / _cache_key(config or configured_zoo())


def _check_name(name: str) -> None:
    if name not in ZOO_MEMBERS:
        raise UnknownNameError("zoo model", name, list(ZOO_MEMBERS))


def _is_built(path: Path) -> bool:
    # zoo.json is written before the atomic rename, so its presence means the member is complete.
    return (path / "zoo.json").is_file()


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """Exclusive lock per cache dir: concurrent builders (xdist workers) train each member once."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """A temp dir beside `target` that replaces it only if the block finishes."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a cache entry should read like any other dir
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _clear_stale_temps(cache_dir: Path) -> None:
    # Only called under the lock: any temp dir left then belongs to a builder that died.
    for stale in cache_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


class _Builder:
    """Trains missing members of one cache dir; call only while holding its lock."""

    def __init__(self, cache_dir: Path, config: ZooConfig, *, progress: bool) -> None:
        self.cache_dir = cache_dir
        self.config = config
        self.progress = progress
        self._tokenizer: PreTrainedTokenizerFast | None = None
        self._streams: dict[str, dict[str, torch.Tensor]] | None = None

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The shared tokenizer, trained and cached on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer, PreTrainedTokenizerFast

            from hfmerge.zoo import tokenizer as zoo_tokenizer

            target = self.cache_dir / "tokenizer"
            if not (target / "tokenizer.json").is_file():
                trained = zoo_tokenizer.build_tokenizer(
                    [self._train_text(d) for d in corpus.DOMAINS],
                    vocab_size=self.config.vocab_size,
                    model_max_length=self.config.context,
                )
                with _atomic_dir(target) as tmp:
                    trained.save_pretrained(tmp)
            loaded = AutoTokenizer.from_pretrained(target, trust_remote_code=False)
            if not isinstance(loaded, PreTrainedTokenizerFast):
                raise TypeError(f"{target} holds a {type(loaded).__name__}, not a fast tokenizer")
            self._tokenizer = loaded
        return self._tokenizer

    def _train_text(self, domain: str) -> str:
        text = corpus.train_text(domain)
        return text if self.config.train_chars is None else text[: self.config.train_chars]

    def streams(self) -> dict[str, dict[str, torch.Tensor]]:
        """Token ids per split (`train`, `heldout`) and domain."""
        if self._streams is None:
            from hfmerge.zoo import train

            tok = self.tokenizer()
            self._streams = {
                "train": {d: train.encode(tok, self._train_text(d)) for d in corpus.DOMAINS},
                "heldout": {d: train.encode(tok, corpus.heldout_text(d)) for d in corpus.DOMAINS},
            }
        return self._streams

    def ensure(self, name: str) -> Path:
        """The member's directory, training it (and its parent) if it is not cached yet."""
        target = self.cache_dir / name
        if _is_built(target):
            return target
        recipe = _RECIPES[name]
        parent_dir = self.ensure(recipe.parent) if recipe.parent is not None else None
        with _atomic_dir(target) as tmp:
            self._train_member(name, recipe, parent_dir, tmp)
        return target

    def _train_member(self, name: str, recipe: _Recipe, parent_dir: Path | None, out: Path) -> None:
        from hfmerge.zoo import train

        cfg, tok, streams = self.config, self.tokenizer(), self.streams()
        if self.progress:
            train.log(f"training zoo model {name!r} (first use; cached in {self.cache_dir})")
        if parent_dir is None:
            model = train.new_model(cfg, tok, seed=recipe.seed, arch=recipe.arch)
            steps, lr = cfg.pretrain_steps, cfg.pretrain_lr
        else:
            model = train.load_model(parent_dir)
            steps, lr = cfg.finetune_steps, cfg.finetune_lr
        result = train.train_lm(
            model,
            streams["train"],
            mix=_batch_mix(recipe.domains, cfg.batch_size),
            steps=steps,
            lr=lr,
            config=cfg,
            seed=recipe.seed,
            label=f"zoo {name}",
            progress=self.progress,
        )
        train.save_model(model, tok, out)
        info = self._member_info(name, recipe, result, model)
        (out / "zoo.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    def _member_info(
        self, name: str, recipe: _Recipe, result: TrainResult, model: PreTrainedModel
    ) -> dict[str, Any]:
        from hfmerge.zoo import train

        streams, cfg = self.streams(), self.config
        vocab = len(self.tokenizer())
        heldout, unigram = {}, {}
        for d in corpus.DOMAINS:
            heldout[d] = train.heldout_loss(model, streams["heldout"][d], config=cfg)
            unigram[d] = train.unigram_loss(
                streams["train"][d], streams["heldout"][d], vocab_size=vocab
            )
        return {
            "name": name,
            "description": ZOO_MEMBERS[name],
            "seed": recipe.seed,
            "parent": recipe.parent,
            "domains": list(recipe.domains),
            "architecture": recipe.arch,
            "steps": result.steps,
            "train_seconds": round(result.seconds, 2),
            "final_train_loss": result.final_loss,
            "heldout_loss": heldout,
            "unigram_heldout_loss": unigram,
            "config": asdict(cfg),
            "corpus_sha256": corpus.corpus_hash(),
            "versions": _versions(),
        }


def _batch_mix(domains: Sequence[str], batch_size: int) -> dict[str, int]:
    """Split a batch evenly over `domains` (the first ones take any remainder)."""
    share, extra = divmod(batch_size, len(domains))
    return {d: share + (1 if i < extra else 0) for i, d in enumerate(domains)}


def _ensure_all(names: Sequence[str], config: ZooConfig | None, progress: bool) -> dict[str, Path]:
    for name in names:
        _check_name(name)
    cfg = config or configured_zoo()
    cache_dir = zoo_cache_dir(cfg)
    if all(_is_built(cache_dir / n) for n in names):
        return {n: cache_dir / n for n in names}  # fast path: no lock, no torch work
    with _locked(cache_dir):
        _clear_stale_temps(cache_dir)
        builder = _Builder(cache_dir, cfg, progress=progress)
        return {n: builder.ensure(n) for n in names}


def zoo_model(name: str, *, config: ZooConfig | None = None, progress: bool = True) -> Path:
    """Directory of zoo member `name` (loadable with `AutoModelForCausalLM`), built on first use."""
    return _ensure_all([name], config, progress)[name]


def build_zoo(config: ZooConfig | None = None, *, progress: bool = True) -> dict[str, Path]:
    """Build (or find cached) every zoo member; returns name -> model directory."""
    return _ensure_all(list(ZOO_MEMBERS), config, progress)
