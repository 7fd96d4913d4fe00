"""JSONL with line numbers, atomic writes and digests, shared by every stage."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import orjson


def dumps(record: dict) -> str:
    """One compact JSON line, non-ASCII kept as is (the contract's serialisation)."""
    return orjson.dumps(record).decode("utf-8")


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw bytes without the newline), blank lines included."""
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            yield lineno, raw.rstrip(b"\r\n")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Parse a trusted JSONL file (one written by an earlier stage); errors name file:line."""
    for lineno, raw in iter_lines(path):
        if not raw.strip():
            continue
        try:
            yield lineno, orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc}); rerun the stage that wrote it") from exc


def record_offsets(path: str | Path, keep: Callable[[dict], bool] | None = None) -> tuple[np.ndarray, int]:
    """Byte offsets of the records of a trusted JSONL file that `keep` accepts (all by default), and how many it
    refused: a stage that picks among records holds these, 8 bytes a record, and reads the picked ones back."""
    offsets, refused, position = [], 0, 0
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if raw.strip():
                try:
                    record = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc}); rerun the stage that wrote it") from exc
                if keep is None or keep(record):
                    offsets.append(position)
                else:
                    refused += 1
            position += len(raw)
    return np.array(offsets, dtype=np.int64), refused


def read_record_at(handle: BinaryIO, offset: int) -> dict:
    """The record whose line starts at `offset` (from `record_offsets`) of a file opened for binary reading."""
    handle.seek(offset)
    return orjson.loads(handle.readline())


@functools.cache
def process_umask() -> int:
    """The umask this process started with (reading it means setting it, so once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir_in(parent: Path, prefix: str) -> Path:
    """`mkdtemp` in `parent`, with the mode a plain `mkdir` would give (mkdtemp makes it 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    folder.chmod(0o777 & ~process_umask())
    return folder


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temporary file beside `path`, then rename it into place.

    A crash leaves no file at `path` that looks complete. The file gets the mode a plain `open`
    would give it under the umask (mkstemp alone makes it 0600, unreadable to the team).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~process_umask())
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | Path, records) -> int:
    """Atomically write records as JSONL; returns the number written."""
    count = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(dumps(record) + "\n")
            count += 1
    return count


def write_json(path: str | Path, payload: dict) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")


def read_json_file(path: str | Path) -> dict | None:
    """A small JSON file written by `write_json`, or None when it is missing or unreadable."""
    try:
        return orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def copy_atomic(source: str | Path, target: str | Path) -> None:
    """Copy a file to `target` under a temporary name, then rename it into place."""
    with atomic_write(target, "wb") as handle, open(source, "rb") as original:
        shutil.copyfileobj(original, handle)


def follow_umask(path: str | Path) -> None:
    """Give a tree the modes a plain `open`/`mkdir` would under the umask, including files that libraries wrote
    through their own temporary files (transformers leaves `model.safetensors` at 0600). Links are left alone."""
    mask = process_umask()

    def follow(where: str, mode: int, is_dir: bool) -> None:
        wanted = 0o777 if is_dir or mode & 0o111 else 0o666
        if mode & 0o777 != wanted & ~mask:
            os.chmod(where, wanted & ~mask)

    folders = [os.fspath(path)]
    follow(folders[0], os.stat(folders[0]).st_mode, True)
    while folders:  # streamed: a list of every Path of a million-image folder held 0.4 KB per image
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    continue
                follow(entry.path, entry.stat().st_mode, entry.is_dir())
                if entry.is_dir():
                    folders.append(entry.path)


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Build a directory under a temporary name, then swap it into place (with the modes of the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_in(path.parent, f".{path.name}.")
    try:
        yield tmp
        follow_umask(tmp)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(built: str | Path, target: str | Path) -> None:
    """Move a finished directory to `target`, replacing what was there."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(built, target)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Digest of a directory: relative names and file contents, in sorted order."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link when the filesystem allows it, else copy; either way under a fresh name renamed onto `dst`.

    Never opens `dst` for writing: when `dst` is already a hard link to someone's file, that file is untouched.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        copy_atomic(src, dst)
        return
    os.replace(tmp, dst)



# What torch's zip writer says when a write fails, which hides the ENOSPC beneath it
# (safetensors, written in Rust, says "os error 28")
WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed", "file write failed", "No space left on device", "os error 28")


def disk_full_message(exc: BaseException, paths) -> str | None:
    """For a write that failed on a full disk: the fullest file system among `paths` and the room left there."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if not any((isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(m in str(e) for m in WRITE_FAILED) for e in chain):
        return None
    rooms = []
    for value in paths:
        if not isinstance(value, (str, Path)) or "/" not in str(value):
            continue
        folder = Path(value)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        rooms.append((shutil.disk_usage(folder).free, str(value)))
    where = f"{min(rooms)[1]} ({min(rooms)[0] / 2**20:.0f} MiB free)" if rooms else "its outputs"
    return (f"no space left on the device it writes to: {where}; free space there (or move results/ to a larger disk), "
            f"then rerun. ({exc})")
