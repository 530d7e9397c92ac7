"""The one way this project writes files: whole or not at all, durable, and with the modes the umask asks for.

    atomic_write(path, text_or_bytes)          a whole small file (captions, JSON, pointers)
    with atomic_file(path) as tmp: ...         a file another library writes by name (torch.save, safetensors)
    with atomic_folder(path) as tmp: ...       a whole folder (checkpoints, datasets, feature caches)
    AppendLog(path)                            a locked JSONL journal: whole lines appended and fsynced

Each writes beside its target under a hidden temporary name, fsyncs the data, renames it into place and
fsyncs the folder, so after a crash (kill -9, power loss) the target is either the old version or the
new one, never a mix. Temporary files get the mode a plain open() would give (0666 or 0777 less the
umask), not mkstemp's private 0600/0700: another user, or a service, can read what was exported.
A file that replaces an existing one keeps that file's mode.

A failed write (disk full, read-only file system, permissions) raises OutputError with one line naming
the path; the target is left as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path

from .errors import OutputError

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """This process's umask, read without changing it where the system allows (Linux 4.7+)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # the portable way sets it and sets it back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def folder_mode() -> int:
    return 0o777 & ~umask()


def fsync_folder(folder) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where folders cannot be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def why(e: OSError) -> str:
    """The reason of a failed write, in words."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e)


def write_failed(path, e: OSError, then: str = "it was left as it was before") -> OutputError:
    """The one-line error for an OSError met while writing path; `then` says what became of the data."""
    return OutputError(f"cannot write {path} ({why(e)}); {then}", reason=why(e))


def _raise_if_write_error(path, exc: BaseException) -> None:
    """Inside an atomic block, a failed write of any writer becomes one OutputError line.

    OSError from Python's own files; safetensors reports "I/O error: ... (os error N)"; torch.save
    reports a short write as a RuntimeError from its zip writer.
    """
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        raise write_failed(path, exc) from None
    if isinstance(exc, OutputError) and exc.reason:  # a write inside the temporary: name the target instead
        raise OutputError(f"cannot write {path} ({exc.reason}); it was left as it was before", exc.reason) from None
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "I/O error" in text:
        match = re.search(r"os error (\d+)", text)
        code = int(match.group(1)) if match else errno.EIO
        raise write_failed(path, OSError(code, os.strerror(code))) from None
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
        raise write_failed(path, OSError(errno.EIO, "the write stopped short; is the disk full?")) from None


def atomic_write(path, data: str | bytes) -> None:
    """The whole file or nothing. str is written as UTF-8 (surrogate escapes kept as the bytes they stand for)."""
    payload = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)


class atomic_file:
    """`with atomic_file(path) as tmp:` write tmp by any means; on success it replaces path, on error it goes."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        except OSError as e:
            raise write_failed(self.path, e) from None
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            _raise_if_write_error(self.path, exc)
            return False
        try:
            os.chmod(self.tmp, _mode_for(self.path, file_mode()))
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise write_failed(self.path, e) from None
        fsync_folder(self.path.parent)
        return False


class atomic_folder:
    """`with atomic_folder(path) as tmp:` fill the folder tmp; on success it replaces path in one step.

    Where Linux allows (renameat2 RENAME_EXCHANGE), an existing folder is swapped out atomically, so a
    reader never finds the path missing; elsewhere it is renamed aside first, then removed.
    """

    def __init__(self, folder):
        self.folder = Path(folder)

    def __enter__(self) -> Path:
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.tmp-", dir=self.folder.parent))
            os.chmod(self.tmp, folder_mode())
        except OSError as e:
            raise write_failed(self.folder, e) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            _raise_if_write_error(self.folder, exc)
            return False
        try:
            _settle_tree(self.tmp)
            os.chmod(self.tmp, _mode_for(self.folder, folder_mode()))
            _replace_folder(self.tmp, self.folder)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise write_failed(self.folder, e) from None
        fsync_folder(self.folder.parent)
        return False


class AppendLog:
    """An append-only file of lines (a JSONL journal) that one process holds at a time.

    Opening creates the file when missing and takes an exclusive lock on it (flock), so a second run on
    the same file gets one line saying so instead of interleaving its rows. lines() returns the complete
    lines and cuts off a torn last one (a write stopped by a kill); append() adds whole lines and fsyncs.
    """

    def __init__(self, path, holder: str = "another process"):
        import fcntl

        self.path = Path(path)
        for _ in range(10):  # the file may be replaced between open and lock: lock what the path names
            self.created = False
            try:
                try:
                    self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                    self.created = True
                except FileExistsError:
                    self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            except OSError as e:
                raise write_failed(self.path, e, "nothing was written") from None
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                from .errors import VisionRWKVError

                raise VisionRWKVError(f"{self.path} is being written by {holder} (it is locked); expected one run "
                                      "per output: wait for it, or choose another output") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    return
            except FileNotFoundError:
                pass
            os.close(self.fd)
        raise OutputError(f"cannot lock {self.path}: it keeps being replaced by another process")

    def lines(self, cut_torn: bool = True) -> tuple[list[bytes], bool]:
        """(the complete lines, whether the file ends in a torn line); cut_torn removes that line from the file,
        as appending requires."""
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0) if size else b""
        end = data.rfind(b"\n") + 1
        torn = end < len(data)
        if torn and cut_torn:
            self.truncate(end)
        return data[:end].splitlines(keepends=True), torn

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError as e:
            raise write_failed(self.path, e, "it was left as it was before") from None

    def append(self, data: bytes, then: str = "the lines written before are kept") -> None:
        """Append whole lines and fsync; a short write only continues the same data."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:
            if view.nbytes < len(data):  # a part went in: cut it, so no torn line stays behind
                try:
                    os.ftruncate(self.fd, os.fstat(self.fd).st_size - (len(data) - view.nbytes))
                except OSError:
                    pass
            raise write_failed(self.path, e, then) from None

    def close(self, remove_if_empty: bool = False) -> None:
        """Let go of the file (and of the lock); a file this log created and never filled is removed."""
        if self.fd < 0:
            return
        try:
            if remove_if_empty and self.created and os.fstat(self.fd).st_size == 0:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = -1


def remove_leftovers(folder, name: str = "*") -> list[Path]:
    """Delete the temporary files and folders a killed writer left in folder for targets matching name.

    Only for a caller that owns folder for now (it holds the run's lock): a live writer's temporary would go too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for kind in ("tmp", "old"):
        for path in folder.glob(f".{name}.{kind}-*"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            gone.append(path)
    return gone


def _mode_for(target: Path, default: int) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return default


def _settle_tree(folder: Path) -> None:
    """fsync every file and folder under folder, and give each the mode the umask asks for: some writers
    (safetensors, mkstemp, mkdtemp) make private 0600/0700 entries whatever the umask."""
    files, folders = file_mode(), folder_mode()
    for root, dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, (0o777 & ~umask()) if executable else files)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, folders)
                fsync_folder(path)
    fsync_folder(folder)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # an old kernel, or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_folder(new: Path, target: Path) -> None:
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):  # `new` now holds the old folder
        shutil.rmtree(new, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)  # put the previous folder back rather than leave none
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_writable(path, what: str = "out") -> None:
    """Fail before hours of work, not after: path's folder can take a new file, and path is not a folder.

    The folder is tried for real (a temporary file is made and removed), so read-only mounts and pseudo
    file systems such as /proc, where permission bits say yes, answer no here.
    """
    from .errors import VisionRWKVError

    path = Path(path)
    if path.is_dir():
        raise VisionRWKVError(f"{what} {str(path)!r} is a folder; expected a file path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VisionRWKVError(f"cannot create the folder {parent} for {what} ({e.strerror}); "
                              "expected a writable path") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise VisionRWKVError(f"cannot write files in {parent} for {what} ({e.strerror}); expected a writable "
                              "folder") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise VisionRWKVError(f"cannot write {path} for {what}; expected a writable file path")
