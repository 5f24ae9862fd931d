"""dpt_fast.fileio (the one atomic write) and the PFM reader of dpt_fast.image_io."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from dpt_fast import fileio, image_io


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    fileio.atomic_write_bytes(target, b"old")
    fileio.atomic_write(target, lambda tmp: tmp.write_bytes(b"new"), durable=True)
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["a.bin"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, error):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def write(tmp):
        tmp.write_bytes(b"partial")
        raise error

    with pytest.raises(type(error)):
        fileio.atomic_write(target, write)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_a_writer_that_restricts_the_mode_still_gives_the_mode_of_any_new_file(tmp_path):
    old = os.umask(0o027)
    try:
        def write(tmp):
            tmp.write_bytes(b"x")
            os.chmod(tmp, 0o600)  # as safetensors and mkstemp do
        fileio.atomic_write(tmp_path / "a.bin", write)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640


def test_stale_temporaries_are_those_of_dead_writers(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / "deep" / f".x.npy.{dead}-0123abcd.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"")
    live = tmp_path / f".y.npy.{os.getpid()}-0123abcd.tmp"
    live.write_bytes(b"")
    (tmp_path / f"z.{dead}-0123abcd.tmp").write_bytes(b"")  # not hidden: not ours
    assert fileio.stale_temporaries(tmp_path) == [stale]
    assert fileio.stale_temporaries(tmp_path, recursive=False) == []
    assert fileio.TEMPORARY_NAME.match(fileio.temporary_path(tmp_path / "x.npy").name)["name"] == "x.npy"


def test_remove_stale_temporaries_takes_the_listed_names_in_every_naming_and_spares_live_writers(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale = [f".model.safetensors.{dead}-0123abcd.tmp", f".model.safetensors.tmp-{dead}",
             f".config.json.tmp-{dead}-k3x_9q1z", "model.safetensors.tmp", ".config.json.tmp"]
    kept = [f".model.safetensors.{live}-0123abcd.tmp", f".config.json.tmp-{live}-k3x_9q1z",
            f".model.safetensors.{os.getpid()}-0123abcd.tmp",  # this process's own write
            f".notes.txt.tmp-{dead}", "notes.tmp", f".notes.txt.{dead}-0123abcd.tmp",  # names not listed
            "model.safetensors", "config.json", ".model.safetensors.bak"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"0")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f".config.json.{dead}-0123abcd.tmp").write_bytes(b"0")
    (tmp_path / f".model.safetensors.tmp-{dead}-link").symlink_to(tmp_path / "model.safetensors")

    removed = fileio.remove_stale_temporaries(tmp_path, ["model.safetensors", "config.json"])
    assert removed == sorted(tmp_path / name for name in stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["sub", f".model.safetensors.tmp-{dead}-link"])
    assert (tmp_path / "sub" / f".config.json.{dead}-0123abcd.tmp").exists()  # not recursive


def test_remove_stale_temporaries_under_a_lock_takes_every_other_process_s_files(tmp_path):
    other, own = f".args.json.tmp-{os.getppid()}", f".args.json.{os.getpid()}-0123abcd.tmp"
    for name in (other, own):
        (tmp_path / name).write_bytes(b"0")
    assert fileio.remove_stale_temporaries(tmp_path, ["args.json"], lock_held=True) == [tmp_path / other]
    assert os.listdir(tmp_path) == [own]


def test_remove_stale_temporaries_of_any_name_takes_only_atomic_write_s_and_spares_recent_ones(tmp_path):
    dead = _dead_pid()
    old, recent = tmp_path / "a" / f".x.npy.{dead}-0123abcd.tmp", tmp_path / f".y.png.{dead}-0123abcd.tmp"
    old.parent.mkdir()
    for path in (old, recent, tmp_path / "x.npy.tmp", tmp_path / f".x.npy.tmp-{dead}"):
        path.write_bytes(b"0")
    os.utime(old, (0, 0))
    assert fileio.remove_stale_temporaries(tmp_path, recursive=True, min_age_s=3600) == [old]
    assert fileio.remove_stale_temporaries(tmp_path, recursive=True) == [recent]
    assert sorted(os.listdir(tmp_path)) == [f".x.npy.tmp-{dead}", "a", "x.npy.tmp"]


def test_pfm_round_trip_and_robust_reading(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    image_io.write_pfm(tmp_path / "a.pfm", values)
    np.testing.assert_array_equal(image_io.read_pfm(tmp_path / "a.pfm"), values)

    body = np.flipud(values).astype("<f4").tobytes()
    (tmp_path / "comment.pfm").write_bytes(b"Pf\n# written by a tool\n4 3\n-1.0\n" + body)
    np.testing.assert_array_equal(image_io.read_pfm(tmp_path / "comment.pfm"), values)
    (tmp_path / "short.pfm").write_bytes(b"Pf\n4 3\n-1.0\n" + body[:-4])
    with pytest.raises(ValueError, match="truncated"):
        image_io.read_pfm(tmp_path / "short.pfm")
    (tmp_path / "scale.pfm").write_bytes(b"Pf\n4 3\nnope\n" + body)
    with pytest.raises(ValueError, match="scale"):
        image_io.read_pfm(tmp_path / "scale.pfm")
