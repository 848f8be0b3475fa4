"""common.atomic: the one crash-safe write every part of the project uses."""
import os

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
