"""Atomic writes (a reader sees the old file or the new one, never half of one) and checked reads
(a damaged file is one `DamagedFileError` naming the file and how to rebuild it).

Fault injection, for tests (tests/test_kill_anywhere.py): ORAL_FAULT="POINT:N" makes the process
SIGKILL itself the N-th time it reaches POINT. Read once at import; unset, it costs one string
comparison per write. The points:
    commit     an atomic_dir's temporary dir is complete, not yet renamed onto its final name
    swap       an overwriting atomic_dir has moved the old dir aside; the new one is not in place
    committed  an atomic_dir has just been renamed into place (what its caller does next is not done)
    append     append_jsonl has written the first half of its line (a torn record)
    appended   append_jsonl has written and fsynced its whole line
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch


_FAULT_POINT, _, _FAULT_AT = os.environ.get("ORAL_FAULT", "").partition(":")
_fault_hits = 0


def _fault(point: str, before_kill: Callable[[], Any] | None = None) -> None:
    """SIGKILL this process (after `before_kill()`) at the N-th visit of `point`, when ORAL_FAULT says so."""
    global _fault_hits
    if point != _FAULT_POINT:
        return
    _fault_hits += 1
    if _fault_hits == int(_FAULT_AT):
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status), else set and restored."""
    try:
        return int(re.search(r"Umask:\s+([0-7]+)", Path("/proc/self/status").read_text()).group(1), 8)
    except (OSError, AttributeError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _mode(path: Path) -> int:
    """The permissions a plain write would give the file `path`: those of the file it replaces, else the
    umask's (tempfile's own 0600 would make what oral writes unreadable to other users, e.g. a server)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary sibling, fsync it, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed onto `final`.

    On any error the temporary directory is removed and `final` is left as it was. With
    `overwrite=False` an existing `final` is an error (nothing is replaced).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; remove it or choose another output path")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # a new dir, as mkdir makes it (tempfile's is 0700)
        yield tmp
        _fault("commit")
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            _fault("swap")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
        _fault("committed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_debris(directory: str | os.PathLike, name: str | None = None) -> None:
    """Undo what killed atomic writers left in `directory` (of entry `name` only, when given).

    Their temporary files and dirs (".NAME.<random>.tmp") are removed. An old dir an overwrite had
    moved aside (".NAME.old") is put back as NAME when NAME is missing (the write is undone), else
    removed. Call it only on a directory this process writes alone.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    entry = re.escape(name) if name is not None else ".+"
    for p in directory.iterdir():
        if re.fullmatch(rf"\.{entry}\.[^.]+\.tmp", p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif m := re.fullmatch(rf"\.({entry})\.old", p.name):
            final = directory / m.group(1)
            if final.exists():
                shutil.rmtree(p)
            else:
                os.replace(p, final)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), held for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line under a lock, flushed and fsynced: concurrent writers never interleave.

    A writer killed mid-line leaves a torn last line. Holding the lock, no live writer is mid-line,
    so an unterminated last line that `_is_torn` is that writer's: it is cut off before this
    record is written. Anything else left without its newline is kept and ended.
    """
    path = Path(path)
    data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    with file_lock(path.with_name(path.name + ".lock")):
        with open(path, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            start = f.seek(max(0, end - _TAIL_BYTES))
            tail = f.read()
            newline = tail.rfind(b"\n")
            last = tail[newline + 1 :]  # the unterminated last line (b"" when the file ends a line)
            if last and (newline >= 0 or start == 0) and _is_torn(last.decode("utf-8", "replace")):
                f.truncate(end - len(last))  # a torn record: cut it off
            elif last:
                data = b"\n" + data  # a whole record without its newline (or junk, or a torn line too long to see)
            _fault("append", lambda: (f.write(data[: len(data) // 2]), f.flush()))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            _fault("appended")


_TAIL_BYTES = 1 << 16  # how far append_jsonl looks back for a torn last line


def _is_torn(line: str) -> bool:
    """A prefix of a JSON record whose writer was killed: it starts with "{", does not parse, and is
    not a whole object followed by more text."""
    try:
        json.loads(line)
    except json.JSONDecodeError as e:
        return line.startswith("{") and not e.msg.startswith("Extra data")
    return False


def read_jsonl(path: str | os.PathLike, fix: str = "remove that line or restore the file") -> list[dict]:
    """Read a JSONL file of objects (as `append_jsonl` writes them); a missing file is empty.

    A writer killed mid-line leaves a torn last line, which the next `append_jsonl` cuts off (older
    versions started a fresh line after it, so one may sit anywhere in an older file). The rule
    (`_is_torn`): a line that starts with "{" but does not parse, and is not a whole object
    followed by more text, is a torn record and is skipped. Any other line that is not one JSON
    object (junk, a bare value, an object with text after it, bytes that are not UTF-8) raises
    `DamagedFileError` naming the file, the line number and `fix`.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DamagedFileError(path, f"line {number} is not UTF-8 text", fix) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if _is_torn(line):
                continue
            raise DamagedFileError(path, f"line {number} is not a JSON record: {line[:40]!r}", fix) from None
        if not isinstance(record, dict):
            raise DamagedFileError(path, f"line {number} is not a JSON record: {line[:40]!r}", fix)
        records.append(record)
    return records


# -----------------------------------------------------------------------------
# checked reads: a damaged file is one clear error, never a traceback or a wrong result


class DamagedFileError(ValueError):
    """A file we read is truncated or garbled; the message names it and how to rebuild it."""

    def __init__(self, path: str | os.PathLike, what: str, fix: str):
        self.path, self.what, self.fix = Path(path), " ".join(str(what).split()), fix
        super().__init__(f"{self.path} is damaged ({self.what}): {fix}")


def parse_json(text: str, path: str | os.PathLike, fix: str) -> dict:
    """`text` (the content of `path`, or a JSON string stored inside it) as a JSON object."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DamagedFileError(path, f"not valid JSON: {e}", fix) from None
    if not isinstance(obj, dict):
        raise DamagedFileError(path, f"expected a JSON object, found {type(obj).__name__}", fix)
    return obj


def read_json(path: str | os.PathLike, fix: str) -> dict:
    """The JSON object in `path`; a missing file stays FileNotFoundError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFileError(path, f"not UTF-8 text: {e.reason} at byte {e.start}", fix) from None
    return parse_json(text, path, fix)


def load_safetensors(path: str | os.PathLike, fix: str, device: str = "cpu") -> "dict[str, torch.Tensor]":
    """Every tensor of a safetensors file; a missing file stays FileNotFoundError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        raise DamagedFileError(path, f"not a whole safetensors file: {e}", fix) from None


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, fix: str) -> Iterator[Any]:
    """`safetensors.safe_open(path, framework="pt")`, its header checked on open (a truncated file
    fails here: safetensors checks the header covers the whole file)."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise DamagedFileError(path, f"not a whole safetensors file: {e}", fix) from None
    with handle as f:
        yield f
