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


def _umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter before Python 3.13)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(fd_or_path) -> None:
    """Give a temp file (made 0600 by mkstemp) the mode a plain ``open(..., "w")`` would: 0666 minus
    the umask (0644 at umask 022), so teammates on a shared cluster can read the results."""
    mode = 0o666 & ~_umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


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
        _publish_mode(tmp)
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


# -- run records (the seal and the checks live in rundir.RunDir; these are the engine's calls) ---

def write_final(path: str | Path, rec: dict) -> None:
    """Write a run's final.json sealed with the checksums of its files (rundir.RunDir.write_final)."""
    from .rundir import RunDir

    run = RunDir(Path(path).parent)
    try:  # --skip-bad-images: the files this process left out of the run's dataset are counted here
        from .data import skipped_images

        skipped = skipped_images(str(run.config.get("dataset")))
    except Exception:  # noqa: BLE001 - a record without the count beats no record
        skipped = []
    if skipped:
        rec = {**rec, "bad_images_skipped": len(skipped), "bad_images": skipped[:20]}
    run.write_final(rec)


def read_record(path: str | Path) -> dict:
    """A finished run's final.json, verified (a damaged run: one line naming the file and the cure),
    or a failed run's failed.json ({"status": "failed"} when unreadable)."""
    from .rundir import RunDir

    path = Path(path)
    run = RunDir(path.parent)
    if path.name == "final.json":
        return run.final
    rec = run.failed
    return rec if rec else {"status": "failed", "reason": f"{path} is unreadable"}


def check_teacher_file(name: str, tcfg: dict) -> None:
    """Before a teacher's weights are loaded: a teacher trained by the study must be a finished,
    intact run (its own failure is named, not "missing"); a given ``ckpt`` with a recorded
    ``sha256`` must still have those bytes."""
    from .rundir import RunDir, file_sha256, run_of

    ckpt = Path(str(tcfg["ckpt"]))
    if tcfg.get("run"):
        run = RunDir(ckpt.parent)
        st = run.state()
        if st == "failed":
            reason = (run.failed or {}).get("reason", "see its failed.json")
            raise EffdstlError(f"teacher '{name}' (run {run.name}) failed: {reason}; its students cannot "
                               f"train (fix the cause, then add `--rerun {run.name}` or delete its failed.json)")
        if st in ("done", "damaged"):
            run.verify()
        elif st != "done" and not ckpt.exists():
            raise EffdstlError(f"teacher '{name}' (run {run.name}) has not finished ({st}): its students "
                               f"need it first (run the study again to train it)")
        return
    run = run_of(ckpt)  # a model.pt of some run (`--teacher`, a study's ckpt:): that run finished, intact
    if run is not None:
        run.require_finished(f"teacher '{name}' ({ckpt})")
    if tcfg.get("sha256") and ckpt.is_file():
        sha = str(tcfg["sha256"])
        if not file_sha256(ckpt).startswith(sha):
            raise EffdstlError(f"teacher '{name}': checkpoint {ckpt} changed since the study was planned "
                               f"(sha256 no longer starts with {sha}); launch the study again to plan with it")


# -- checkpoints ---------------------------------------------------------------------------
# Layout: MAGIC + 64 hex chars of sha256(payload) + payload (a torch.save'd dict).
# ckpt-last.pt is the newest; ckpt-prev.pt the one before, the fallback when the newest is corrupt.

def tensor_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes: what every tensor file here is written from (atomically, by
    :func:`atomic_write_bytes`, or checksummed with :func:`checked_blob`)."""
    import torch  # here, not at the top: the CLI imports this module and must start fast

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(run_dir: Path, state: dict) -> None:
    blob = checked_blob(tensor_bytes(state))
    last, prev = run_dir / "ckpt-last.pt", run_dir / "ckpt-prev.pt"
    fd, tmp = tempfile.mkstemp(prefix=".ckpt.", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
            _publish_mode(f.fileno())
        if last.exists():
            os.replace(last, prev)
        os.replace(tmp, last)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checked_blob(payload: bytes) -> bytes:
    """MAGIC + sha256(payload) in hex + payload: the layout of every checksummed binary file."""
    return CKPT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + payload


def checked_payload(blob: bytes) -> bytes:
    """The payload of a ``checked_blob``; ValueError when the header or the checksum is wrong."""
    head = len(CKPT_MAGIC) + 64
    if len(blob) < head or not blob.startswith(CKPT_MAGIC):
        raise ValueError("bad header")
    digest, payload = blob[len(CKPT_MAGIC):head].decode(errors="replace"), blob[head:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError("checksum mismatch")
    return payload


def _read_checkpoint(path: Path) -> dict:
    payload = checked_payload(path.read_bytes())
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
    try:  # a killed process nobody has reaped yet (a zombie) holds nothing
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")
    except (OSError, ValueError):
        return True


class LockBusy(EffdstlError):
    """The run is locked by a live process (``holder``: its {pid, host, started})."""

    def __init__(self, message: str, path: Path, holder: dict):
        super().__init__(message)
        self.path, self.holder = path, holder


HALF_WRITTEN_S = 5.0  # a lock file still unreadable after this long was left by a killed writer


class RunLock:
    """An exclusive lock on a run directory: ``lock`` holds {pid, host, started}.

    A second process asking for it gets ``LockBusy`` (an ``EffdstlError``) naming the holder. A lock
    whose process is dead (same host), or whose file was not refreshed for ``stale_s`` (another
    host), is taken over. The file appears with its content in one step (a hard link of a written
    temp file), so a reader never sees it half-written; one left so by an older version or a dead
    writer counts as held for ``HALF_WRITTEN_S``, then as stale.
    """

    def __init__(self, run_dir: Path, stale_s: float = 6 * 3600):
        self.path = Path(run_dir) / "lock"
        self.stale_s = stale_s
        self.held = False

    def holder(self) -> dict | None:
        try:
            info = json.loads(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return info if isinstance(info, dict) else None

    def _age(self) -> float | None:
        try:
            return time.time() - self.path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None

    def is_stale(self, info: dict | None) -> bool:
        """True when the lock file (with content ``info``) no longer stands for a live trainer."""
        age = self._age()
        if age is None:
            return True
        if info is None:  # unreadable or half-written: its writer died mid-write (or is writing now)
            return age > HALF_WRITTEN_S
        if info.get("host") == socket.gethostname():
            try:
                return not _alive(int(info.get("pid", -1)))
            except (TypeError, ValueError, OverflowError):
                return True
        return age > self.stale_s

    _stale = is_stale  # the old private name

    def alive(self) -> bool:
        """A live process (another one, or this one) holds the lock now."""
        return self.path.exists() and not self.is_stale(self.holder())

    def _create(self, me: dict) -> bool:
        """Create the lock file with its content in one step; False if it exists."""
        fd, tmp = tempfile.mkstemp(prefix=".lock.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            _publish_mode(tmp)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: exclusive create, then write
                try:
                    lfd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(lfd, "w") as f:
                    json.dump(me, f)
                return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        deadline = time.time() + HALF_WRITTEN_S + 5
        while True:
            if self._create(me):
                self.held = True
                return self
            try:
                ino = self.path.stat().st_ino
            except FileNotFoundError:
                continue
            info = self.holder()
            if info and info.get("pid") == os.getpid() and info.get("host") == me["host"]:
                self.held = True
                return self
            if self.is_stale(info):
                try:  # the same file still (not a fresh lock another process just made): remove it
                    if self.path.stat().st_ino == ino:
                        self.path.unlink()
                except FileNotFoundError:
                    pass
            elif info is None:  # being written right now, or half-written and still young: look again
                if time.time() > deadline:
                    raise EffdstlError(f"could not take the lock {self.path} (unreadable); delete it if no "
                                       "process trains this run")
                time.sleep(0.05)
            else:
                raise LockBusy(
                    f"run {self.path.parent.name} is being trained by pid {info.get('pid')} on "
                    f"{info.get('host')} (lock {self.path}); wait for it or stop that process", self.path, info)

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
