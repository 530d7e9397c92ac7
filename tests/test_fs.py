"""vision_rwkv._fs: whole files or none, modes that follow the umask, one holder per journal."""

import os
import stat
from pathlib import Path

import pytest
import torch

from vision_rwkv import _fs
from vision_rwkv.errors import OutputError, VisionRWKVError


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert _fs.umask() == 0o027 and _fs.file_mode() == 0o640 and _fs.folder_mode() == 0o750
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


def test_files_and_folders_follow_the_umask(tmp_path, umask022):
    _fs.atomic_write(tmp_path / "a.txt", "hello\n")
    with _fs.atomic_file(tmp_path / "b.pt") as tmp:
        torch.save({"x": torch.zeros(2)}, tmp)
    with _fs.atomic_folder(tmp_path / "ckpt") as tmp:
        (tmp / "model.bin").write_bytes(b"w")
        (tmp / "sub").mkdir()
    assert mode(tmp_path / "a.txt") == 0o644 and mode(tmp_path / "b.pt") == 0o644
    assert mode(tmp_path / "ckpt") == 0o755 and mode(tmp_path / "ckpt" / "model.bin") == 0o644
    assert (tmp_path / "a.txt").read_text() == "hello\n"
    assert leftovers(tmp_path) == []


def test_a_replaced_file_keeps_its_mode(tmp_path, umask022):
    path = tmp_path / "notes.txt"
    path.write_text("old")
    os.chmod(path, 0o600)
    _fs.atomic_write(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o600


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_failure_inside_leaves_the_old_version_and_no_temporary(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("old")
        with pytest.raises(ValueError), _fs.atomic_file(target) as tmp:
            tmp.write_text("half")
            raise ValueError("stopped")
        assert target.read_text() == "old"
    else:
        target.mkdir()
        (target / "a").write_text("old")
        with pytest.raises(ValueError), _fs.atomic_folder(target) as tmp:
            (tmp / "a").write_text("half")
            raise ValueError("stopped")
        assert (target / "a").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "ds"
    with _fs.atomic_folder(target) as tmp:
        (tmp / "old_only").write_text("1")
    with _fs.atomic_folder(target) as tmp:
        (tmp / "new_only").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new_only"]
    assert leftovers(tmp_path) == []


def test_a_failed_write_is_one_output_error(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "x.json"
    target.write_text("old")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match=r"cannot write .*x.json \(no space left on the device\); it was left"):
        _fs.atomic_write(target, "new")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_safetensors_and_torch_write_errors_become_output_errors(tmp_path):
    class SafetensorError(Exception):
        pass

    with pytest.raises(OutputError, match="File too large"), _fs.atomic_file(tmp_path / "m.safetensors"):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    with pytest.raises(OutputError, match="stopped short"), _fs.atomic_folder(tmp_path / "c"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(RuntimeError, match="a bug"), _fs.atomic_file(tmp_path / "y"):
        raise RuntimeError("a bug")  # anything else stays what it is
    assert leftovers(tmp_path) == []


def test_append_log_has_one_holder_and_cuts_a_torn_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2')
    log = _fs.AppendLog(path)
    with pytest.raises(VisionRWKVError, match="is being written by another process"):
        _fs.AppendLog(path)
    lines, torn = log.lines()
    assert lines == [b'{"a": 1}\n'] and torn
    assert path.read_bytes() == b'{"a": 1}\n'
    log.append(b'{"a": 3}\n')
    log.close()
    assert path.read_bytes() == b'{"a": 1}\n{"a": 3}\n'
    again = _fs.AppendLog(path)  # free again once closed
    assert again.lines() == ([b'{"a": 1}\n', b'{"a": 3}\n'], False)
    again.close(remove_if_empty=True)
    assert path.exists()  # not created by that log, and not empty


def test_append_log_removes_only_an_empty_file_it_made(tmp_path):
    log = _fs.AppendLog(tmp_path / "new.jsonl")
    log.close(remove_if_empty=True)
    assert not (tmp_path / "new.jsonl").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_append_to_a_full_device_is_one_output_error():
    log = _fs.AppendLog("/dev/full")
    try:
        with pytest.raises(OutputError, match=r"cannot write /dev/full \(no space left on the device\); kept"):
            log.append(b"row\n", then="kept")
    finally:
        log.close()


def test_check_writable_tries_the_folder_for_real(tmp_path):
    _fs.check_writable(tmp_path / "new" / "out.jsonl")  # makes the folder
    assert (tmp_path / "new").is_dir() and leftovers(tmp_path / "new") == []
    with pytest.raises(VisionRWKVError, match="is a folder"):
        _fs.check_writable(tmp_path)
    if os.path.isdir("/proc/self"):
        with pytest.raises(VisionRWKVError, match="cannot write files in /proc"):
            _fs.check_writable(Path("/proc/o.jsonl"))
