"""Tensor I/O without whole models in memory: header-only indexing, lazy reading, streamed shards.

Also atomic output directories and copying of config and tokenizer files.
"""

from hfmerge.tensors.checkpoint import (
    CONVERT_FIX,
    PICKLE_SUFFIXES,
    CheckpointIndex,
    LazyCheckpoint,
    TensorReader,
    check_weight_map,
    file_index,
    read_checkpoint_index,
    read_weight_map,
)
from hfmerge.tensors.dtypes import (
    dtype_kind,
    dtype_name,
    element_size,
    is_known_dtype,
    torch_dtype,
)
from hfmerge.tensors.header import (
    TensorInfo,
    header_length,
    parse_shard_header,
    read_shard_header,
)
from hfmerge.tensors.output import (
    SIDE_FILES,
    TOKENIZER_FILES,
    atomic_output_dir,
    check_output_dir,
    copy_side_files,
    has_tokenizer,
    output_path,
    refuse_overlap,
)
from hfmerge.tensors.shards import (
    INDEX_FILE,
    SINGLE_FILE,
    OutputTensor,
    PlannedShard,
    PlannedTensor,
    ShardPlan,
    TensorLike,
    format_size,
    parse_size,
    plan_shards,
)
from hfmerge.tensors.staging import StaleStaging, remove_stale, stale_staging
from hfmerge.tensors.writer import (
    ShardWriter,
    encode_header,
    overwrite_tensors,
)

__all__ = [
    "CONVERT_FIX",
    "INDEX_FILE",
    "PICKLE_SUFFIXES",
    "SIDE_FILES",
    "SINGLE_FILE",
    "TOKENIZER_FILES",
    "CheckpointIndex",
    "LazyCheckpoint",
    "OutputTensor",
    "PlannedShard",
    "PlannedTensor",
    "ShardPlan",
    "ShardWriter",
    "StaleStaging",
    "TensorInfo",
    "TensorLike",
    "TensorReader",
    "atomic_output_dir",
    "check_output_dir",
    "check_weight_map",
    "copy_side_files",
    "dtype_kind",
    "dtype_name",
    "element_size",
    "encode_header",
    "file_index",
    "format_size",
    "has_tokenizer",
    "header_length",
    "is_known_dtype",
    "output_path",
    "overwrite_tensors",
    "parse_shard_header",
    "parse_size",
    "plan_shards",
    "read_checkpoint_index",
    "read_shard_header",
    "read_weight_map",
    "refuse_overlap",
    "remove_stale",
    "stale_staging",
    "torch_dtype",
]
