"""common.atomic: the one crash-safe write every part of the project uses."""
import os
from pathlib import Path

import pytest

from common.atomic import atomic_path, atomic_write


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.jsonl"
    atomic_write(target, ['{"a": 1}\n', '{"b": 2}\n'])
    assert target.read_text() == '{"a": 1}\n{"b": 2}\n'

    def rows():
        yield '{"c": 3}\n'
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(target, rows())
    assert target.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.jsonl"]


def test_the_renamed_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "x.bin") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"\x00\x01")
    finally:
        os.umask(umask)
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_atomic_dir_replaces_a_directory_whole_with_usual_permissions(tmp_path):
    from common.atomic import atomic_dir

    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (Path(tmp) / "sub").mkdir()
        (Path(tmp) / "sub" / "new.txt").write_text("new")
    assert sorted(p.name for p in target.rglob("*")) == ["new.txt", "sub"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "sub" / "new.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (Path(tmp) / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.rglob("*")) == ["new.txt", "sub"]  # the old one stays whole
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp directory left behind
