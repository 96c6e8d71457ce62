"""`ZooConfig.with_width`: one config per width, everything but the width unchanged."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from hfmerge.errors import OptionError
from hfmerge.zoo import ZooConfig, zoo_cache_dir

WIDTH_FIELDS = {"hidden_size", "intermediate_size"}


def test_own_width_is_the_same_config_and_cache_key() -> None:
    for config in (ZooConfig(), ZooConfig.tiny()):
        same = config.with_width(config.hidden_size)
        assert same == config
        assert zoo_cache_dir(same) == zoo_cache_dir(config)


@pytest.mark.parametrize(("width", "ff"), [(32, 88), (64, 176), (256, 704), (512, 1408)])
def test_other_widths_scale_ff_and_keep_everything_else(width: int, ff: int) -> None:
    base = ZooConfig()
    wide = base.with_width(width)
    assert (wide.hidden_size, wide.intermediate_size) == (width, ff)  # FF stays 2.75x the width
    unchanged = {k: v for k, v in asdict(base).items() if k not in WIDTH_FIELDS}
    assert {k: v for k, v in asdict(wide).items() if k not in WIDTH_FIELDS} == unchanged
    assert zoo_cache_dir(wide) != zoo_cache_dir(base)


@pytest.mark.parametrize("width", [0, 4, 30, 36])
def test_width_that_does_not_split_into_even_heads_is_refused(width: int) -> None:
    with pytest.raises(OptionError) as caught:
        ZooConfig().with_width(width)  # 4 heads: widths must be multiples of 8
    assert caught.value.option == "hidden_size"
    assert caught.value.value == str(width)
