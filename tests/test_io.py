"""Shared file writing: outputs get the modes a plain open/mkdir would give under the umask."""

import os
import subprocess
import sys

import pytest

WRITE = """
import sys
from pathlib import Path
from visionqc.io import atomic_directory, write_json
root = Path(sys.argv[1])
write_json(root / "report.json", {"a": 1})
with atomic_directory(root / "model") as work:
    (work / "weights.bin").write_bytes(b"x")
    (work / "model.safetensors").write_bytes(b"y")
    (work / "model.safetensors").chmod(0o600)  # as transformers' save_pretrained leaves it
    (work / "sub" / "deeper").mkdir(parents=True, mode=0o700)  # as mkdtemp leaves a folder
    (work / "sub" / "deeper" / "shard.arrow").write_bytes(b"z")
    (work / "sub" / "deeper" / "shard.arrow").chmod(0o600)
    (root / "theirs.txt").write_bytes(b"t")
    (root / "theirs.txt").chmod(0o600)
    (work / "sub" / "link").symlink_to(root / "theirs.txt")  # a link: what it points to is not ours to change
"""


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])
def test_outputs_respect_the_umask(tmp_path, umask, file_mode, dir_mode):
    subprocess.run([sys.executable, "-c", WRITE, str(tmp_path)], check=True, preexec_fn=lambda: os.umask(umask))
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "model").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "model" / "weights.bin").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "model" / "sub" / "deeper").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "model" / "sub" / "deeper" / "shard.arrow").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "theirs.txt").stat().st_mode & 0o777 == 0o600


def test_a_source_file_linked_into_the_outputs_is_never_written_through(tmp_path):
    """link_or_copy onto a name that is already a hard link to someone's file replaces the name, not the file."""
    from visionqc.io import link_or_copy

    theirs, other, out = tmp_path / "theirs.png", tmp_path / "other.png", tmp_path / "out" / "x.png"
    theirs.write_bytes(b"theirs")
    other.write_bytes(b"other")
    link_or_copy(theirs, out)
    link_or_copy(other, out)
    assert theirs.read_bytes() == b"theirs" and out.read_bytes() == b"other"
