"""Header indexes read remotely by range requests equal the local ones, and read no tensor data."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfmerge import hub
from hfmerge.errors import ModelSourceError
from hfmerge.sources.refs import pin_model, resolve_model
from hfmerge.tensors import (
    header_length,
    parse_shard_header,
    read_checkpoint_index,
    read_shard_header,
)
from tests.support.fakehub import FakeHub
from tests.support.fakehub_models import seed_llama
from tests.support.tiny_models import save_tiny_model


@pytest.mark.parametrize("shard_size", [None, "100KB"], ids=["single", "sharded"])
def test_remote_index_equals_the_local_one_without_tensor_bytes(
    fake_hub: FakeHub, tmp_path: Path, shard_size: str | None
) -> None:
    sha = seed_llama(fake_hub, tmp_path, "org/a", seed=0, max_shard_size=shard_size)
    local = read_checkpoint_index(tmp_path / "_seed" / "org--a")
    remote = hub.remote_index("org/a", sha)
    assert list(remote) == list(local)  # names, dtypes, shapes, shards and absolute offsets
    assert remote.shards == local.shards
    assert (len(remote.shards) > 1) == bool(shard_size)
    assert remote.model_dir == hub.snapshot_dir("org/a", sha)
    assert fake_hub.weight_bytes_served == 0
    ranges = [
        r.range
        for r in fake_hub.requests("resolve")
        if r.method == "GET" and r.path.endswith(".safetensors")
    ]
    assert ranges
    assert all(ranges)


def test_a_downloaded_model_is_indexed_from_the_cache_with_no_request(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    seed_llama(fake_hub, tmp_path, "org/a", seed=0)
    source = resolve_model("org/a@main")
    assert source.hub_id == "org/a"
    assert source.revision == fake_hub.head("org/a")
    assert sorted(p.name for p in source.path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert fake_hub.weight_bytes_served > 0
    before = len(fake_hub.log)
    index = hub.remote_index("org/a", source.revision)
    assert list(index) == list(read_checkpoint_index(source.path))
    assert len(fake_hub.log) == before
    pinned = pin_model("org/a", revision=source.revision, offline=True)  # sha pins offline too
    assert pinned.path == source.path


def test_parse_shard_header_reads_bytes_as_read_shard_header_reads_files(tmp_path: Path) -> None:
    path = save_tiny_model("gpt2", tmp_path / "m") / "model.safetensors"
    data = path.read_bytes()
    length = header_length(data[:8], file_size=len(data), shard="s", label="m")
    parsed = parse_shard_header(data[8 : 8 + length], file_size=len(data), shard="s", label="m")
    assert parsed == read_shard_header(path, "s", label="m")
    with pytest.raises(ModelSourceError, match="header length field"):
        header_length(data[:8], file_size=length, shard="s", label="m")
    with pytest.raises(ModelSourceError, match=r"ends 1 bytes early \(its header needs \d+ bytes"):
        parse_shard_header(data[8 : 8 + length], file_size=len(data) - 1, shard="s", label="m")
    with pytest.raises(ModelSourceError, match="only 3 bytes"):
        header_length(data[:3], file_size=3, shard="s", label="m")
