"""Atomic output directories (all or nothing, even on Ctrl-C) and copying config/tokenizer files."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from hfmerge.errors import OutputError
from hfmerge.tensors.staging import StagingDir, remove_stale

# Config and tokenizer files a merged model inherits from its base; never weights.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Any one of these files means a model directory carries its own tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
)


def has_tokenizer(model_dir: Path) -> bool:
    """Whether `model_dir` holds tokenizer files (any of `TOKENIZER_FILES`)."""
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def output_path(path: str | os.PathLike[str]) -> Path:
    """The absolute output path as the user meant it: `~` expanded, relative to the working dir."""
    return Path(path).expanduser().absolute()


def check_output_dir(final: Path, *, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Fail fast, before long work, if `final` cannot become the output directory.

    An existing non-empty directory needs `force`; an existing file is always refused. So is an
    output that is, contains or lies inside any of `inputs` (model directories), whatever
    `force` says: replacing the output deletes what it holds.
    """
    final = output_path(final)
    refuse_overlap(final, inputs)
    if (final.exists() or final.is_symlink()) and not final.is_dir():
        raise OutputError(
            str(final), "exists and is not a directory", "remove it or choose another output path"
        )
    if not force and _is_nonempty_dir(final):
        raise OutputError(
            str(final),
            "already exists and is not empty",
            "choose another output path, or pass --force to replace it",
        )
    parent = _nearest_existing(final.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            str(final), f"{parent} is not writable", "choose an output path you can write to"
        )


def refuse_overlap(final: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output that is, contains or lies inside an input model's directory.

    Paths are compared resolved (symlinks, `..` and `~`). Where an input's files are symlinks (a
    Hub snapshot's point into the cache's `blobs/`), the folders they point into are protected
    too: an output there, or above them, would delete them when replaced.
    """
    out = output_path(final).resolve()
    for model_dir in inputs:
        root = Path(model_dir).expanduser().resolve()
        problem = None
        if out == root:
            problem = f"is the input model {model_dir}"
        elif root.is_relative_to(out):
            problem = f"contains the input model {model_dir}"
        elif out.is_relative_to(root):
            problem = f"lies inside the input model {model_dir}"
        else:
            held = [place for place in _link_targets(root) if place.is_relative_to(out)]
            if held:
                problem = f"contains {held[0]}, where files of the input model {model_dir} live"
        if problem:
            raise OutputError(
                str(final),
                f"{problem}; writing it would replace or delete that model's files",
                "choose an output path outside every input model's folder",
            )


def _link_targets(model_dir: Path) -> set[Path]:
    """The folders that the symlinks directly inside `model_dir` point into."""
    targets: set[Path] = set()
    with contextlib.suppress(OSError):
        for entry in model_dir.iterdir():
            if entry.is_symlink():
                targets.add(entry.resolve().parent)
    return targets


@contextlib.contextmanager
def atomic_output_dir(final: Path, *, force: bool) -> Iterator[Path]:
    """Yield a fresh hidden directory beside `final`; on success, rename it into place.

    The existence check runs before yielding, so no work is done for a refused output. If the body
    raises (KeyboardInterrupt included), the temporary directory is removed and `final` is left
    as it was. With `force`, an old `final` is moved aside and deleted only once the new one is in.
    """
    final = output_path(final)
    check_output_dir(final, force=force)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)  # what killed runs to this output left behind
    staging = StagingDir(final, "tmp")
    try:
        yield staging.path
        check_output_dir(final, force=force)  # someone may have created it meanwhile
        _move_into_place(staging.path, final)
    except BaseException:
        shutil.rmtree(staging.path, ignore_errors=True)
        raise
    finally:
        staging.release()


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy config, generation config and tokenizer files present in `src_dir`; names copied."""
    copied: list[str] = []
    for name in SIDE_FILES:
        source = Path(src_dir) / name
        if source.is_file():  # follows symlinks, as in the Hub cache's snapshot folders
            try:
                shutil.copyfile(source, Path(dst_dir) / name)
            except OSError as exc:  # a full disk shows here too, past the free-space estimate
                raise OutputError(
                    str(dst_dir),
                    f"cannot copy {name} from {src_dir}: {exc.strerror or exc}",
                    "free space on the output's disk (or choose another output path), then rerun",
                ) from None
            copied.append(name)
    return copied


def _is_nonempty_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    with os.scandir(path) as entries:
        return any(True for _ in entries)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an old `final` is moved aside first and restored on failure."""
    aside = held = None
    if final.exists() or final.is_symlink():
        aside = final.parent / f".{final.name}.hfmerge-old-{secrets.token_hex(4)}"
        # locked before the rename, so the folder is never unheld under its staging name
        held = StagingDir.hold(final) if final.is_dir() and not final.is_symlink() else None
        os.rename(final, aside)
    try:
        try:
            os.rename(tmp, final)
        except BaseException:
            if aside is not None:
                os.rename(aside, final)
            raise
        _fsync_dir(final.parent)
        if aside is not None:
            _remove(aside)
    finally:
        if held is not None:
            held.release()


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make the renames durable, so a crash cannot leave the old name pointing nowhere."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
