"""The offline model zoo: small LMs trained by hfmerge on stdlib code and pydoc prose.

Llama-style members (two seeds and two specialists of seed0) and a GPT-2 seed pair of the same
width and depth, so alignment can be measured on both families. Members are built on first use,
deterministically, and cached (`build.py`); `config.py` holds their sizes, `train.py` the training
loop, `corpus.py` the text and `tokenizer.py` the tokenizer.
"""

from hfmerge.zoo.build import ZOO_MEMBERS, build_zoo, zoo_cache_dir, zoo_model
from hfmerge.zoo.config import ZOO_SIZE_ENV, ZooConfig, configured_zoo

__all__ = [
    "ZOO_MEMBERS",
    "ZOO_SIZE_ENV",
    "ZooConfig",
    "build_zoo",
    "configured_zoo",
    "zoo_cache_dir",
    "zoo_model",
]
