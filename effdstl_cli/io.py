"""Crash-safe files: atomic writes, checksummed checkpoints with a fallback, run-directory locks.

A killed job must lose at most the epoch in flight, and must never leave a half-written file that
a later reader trusts. Every write goes to a temp file in the same directory, is fsynced, then
renamed over the target (rename is atomic on POSIX filesystems, NFS/Lustre included).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import EffdstlError

CKPT_MAGIC = b"EFFDSTL1"


def atomic_write(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` on a temp file in ``path``'s directory, fsync it, rename it over
    ``path``. A reader never sees a half-written file; a failed writer leaves the old one untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def write_yaml(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Rewrite a whole JSONL file atomically (files are small: one line per epoch)."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a truncated or garbled last line (a writer killed mid-line) is skipped."""
    rows: list[dict] = []
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    break
                if isinstance(obj, dict):
                    rows.append(obj)
    except FileNotFoundError:
        pass
    return rows


# -- checkpoints ---------------------------------------------------------------------------
# Layout: MAGIC + 64 hex chars of sha256(payload) + payload (a torch.save'd dict).
# ckpt-last.pt is the newest; ckpt-prev.pt the one before, the fallback when the newest is corrupt.

def save_checkpoint(run_dir: Path, state: dict) -> None:
    import torch  # here, not at the top: the CLI imports this module and must start fast

    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    blob = CKPT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + payload
    last, prev = run_dir / "ckpt-last.pt", run_dir / "ckpt-prev.pt"
    fd, tmp = tempfile.mkstemp(prefix=".ckpt.", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        if last.exists():
            os.replace(last, prev)
        os.replace(tmp, last)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_checkpoint(path: Path) -> dict:
    blob = path.read_bytes()
    head = len(CKPT_MAGIC) + 64
    if len(blob) < head or not blob.startswith(CKPT_MAGIC):
        raise ValueError("bad header")
    digest, payload = blob[len(CKPT_MAGIC):head].decode(), blob[head:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError("checksum mismatch")
    import torch

    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def load_checkpoint(run_dir: Path) -> tuple[dict | None, str | None]:
    """(state, note): the newest intact checkpoint, falling back to the previous one.

    ``note`` says when a corrupt newest checkpoint was skipped (the caller logs it).
    """
    bad = []
    for name in ("ckpt-last.pt", "ckpt-prev.pt"):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = _read_checkpoint(path)
        except Exception as exc:  # corrupt/truncated: fall back, never crash the job
            bad.append(f"{path} is corrupt ({type(exc).__name__}: {exc})")
            continue
        return state, (f"{'; '.join(bad)}; fell back to the previous checkpoint {path.name}" if bad else None)
    return None, (f"{'; '.join(bad)}; no intact checkpoint left: the run starts over" if bad else None)


# -- locks ---------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: ``lock`` holds {pid, host, started}.

    A second process asking for it gets ``EffdstlError`` naming the holder. A lock whose process is
    dead (same host), or whose file was not refreshed for ``stale_s`` (another host), is taken over.
    """

    def __init__(self, run_dir: Path, stale_s: float = 6 * 3600):
        self.path = Path(run_dir) / "lock"
        self.stale_s = stale_s
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _stale(self, info: dict | None) -> bool:
        if info is None:  # unreadable or half-written: its writer died mid-write
            try:
                return time.time() - self.path.stat().st_mtime > 5
            except FileNotFoundError:
                return True
        if info.get("host") == socket.gethostname():
            return not _alive(int(info.get("pid", -1)))
        try:
            return time.time() - self.path.stat().st_mtime > self.stale_s
        except FileNotFoundError:
            return True

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.holder()
                if info and info.get("pid") == os.getpid() and info.get("host") == me["host"]:
                    self.held = True
                    return self
                if self._stale(info):
                    self.path.unlink(missing_ok=True)
                    continue
                raise EffdstlError(
                    f"run {self.path.parent.name} is being trained by pid {info.get('pid')} on "
                    f"{info.get('host')} (lock {self.path}); wait for it or stop that process")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise EffdstlError(f"could not take the lock {self.path}")

    def refresh(self) -> None:
        if self.held:
            os.utime(self.path)

    def release(self) -> None:
        if self.held:
            info = self.holder()
            if info and info.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
