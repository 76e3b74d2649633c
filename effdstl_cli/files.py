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
from contextlib import contextmanager
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
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not exc.filename:  # a failed write() names no file: name it
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
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


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Lines at the end of a JSONL file, not fsynced: the engine's metrics lines. A writer killed
    mid-line leaves a torn last line, which :func:`read_jsonl` drops, and the run's resume
    rewrites the file whole from its checkpoint; ``fsync_file`` makes it durable before the run is
    sealed."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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


# A group checkpoint (the engine's, written for every run a job trains together) is one
# checksummed file, hard-linked into each run directory as its ckpt-last.pt: one write instead of
# one per run, and every member's state in each link. Payload: GROUP_MAGIC + one torch.save of
# {"members": {run hash: {"epoch", "failed" (a reason or None), "state"}}} (one pickling for the
# group: a torch.save's fixed cost is most of a small model's).
GROUP_MAGIC = b"EFFDSTLG"


def group_payload(entries: list[tuple[str, dict, int, str | None]]) -> bytes:
    """(run hash, its state, its epoch, why it failed or None) -> a payload."""
    return GROUP_MAGIC + tensor_bytes({"members": {h: {"epoch": int(e), "failed": f, "state": st}
                                                   for h, st, e, f in entries}})


def group_entries(payload: bytes) -> dict[str, tuple[int, str | None, dict]] | None:
    """{run hash: (epoch, failed reason, state)} of a group payload; None for a one-run
    checkpoint (the layout before group checkpoints); an exception when garbled."""
    if not payload.startswith(GROUP_MAGIC):
        return None
    members = _torch_state(payload[len(GROUP_MAGIC):])["members"]
    return {str(h): (int(m["epoch"]), m["failed"], m["state"]) for h, m in members.items()}


def save_group_checkpoint(run_dirs: list[Path], entries: list[tuple[str, dict, int, str | None]]) -> None:
    """Write one group checkpoint and make it each run directory's ckpt-last.pt (the old one
    becomes ckpt-prev.pt): written and fsynced once, then a hard link per directory (a copy where
    links are not possible), each put in place by an atomic rename. A kill between two directories
    leaves some of them one epoch behind; the engine resumes every member from the newest group
    checkpoint that holds it (:func:`load_group_checkpoints`), so the group keeps its epoch."""
    blob = checked_blob(group_payload(entries))
    first = Path(run_dirs[0])
    fd, tmp = tempfile.mkstemp(prefix=".ckpt.", suffix=".tmp", dir=first)
    try:
        _link_group(blob, tmp, fd, run_dirs)
    except OSError as exc:  # disk full: no temp file is left (below), and the message names the file
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(first / "ckpt-last.pt")) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _link_group(blob: bytes, tmp: str, fd: int, run_dirs: list[Path]) -> None:
    """Write ``blob`` to the temp file ``tmp`` (open as ``fd``), then link it in as each directory's ckpt-last.pt."""
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
        _publish_mode(f.fileno())
    for d in map(Path, run_dirs):
        fd2, here = tempfile.mkstemp(prefix=".ckpt.", suffix=".tmp", dir=d)
        os.close(fd2)
        try:
            os.unlink(here)
            try:
                os.link(tmp, here)
            except OSError:  # another filesystem, or none with hard links
                atomic_write_bytes(here, blob)
            last = d / "ckpt-last.pt"
            if last.exists():
                os.replace(last, d / "ckpt-prev.pt")
            os.replace(here, last)
        except BaseException:
            Path(here).unlink(missing_ok=True)
            raise


def _torch_state(payload: bytes) -> dict:
    import torch

    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def _read_checkpoint(path: Path) -> dict:
    """The state of the run ``path`` belongs to (its directory is named by the run's hash)."""
    payload = checked_payload(path.read_bytes())
    entries = group_entries(payload)
    if entries is None:
        return _torch_state(payload)
    if path.parent.name not in entries:
        raise ValueError(f"the group checkpoint holds no state of run {path.parent.name}")
    return entries[path.parent.name][2]


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


def load_group_checkpoints(run_dirs: list[Path]) -> dict[str, tuple[dict | None, str | None, str | None]]:
    """For each run directory (named by its run's hash): (state, note, failed reason).

    Every intact checkpoint in these directories is read once (the links of one group checkpoint
    are one file), and a run resumes from the newest state of it found in any of them: a kill
    between the links of one epoch's group checkpoint leaves no member an epoch behind the others
    (the group resumes with its shape, so fused members round as in an uninterrupted run). A state
    marked failed (a non-finite loss in an epoch after it) keeps that mark. ``note`` says when a
    run's own newest checkpoint was corrupt, as :func:`load_checkpoint` does."""
    read: dict[tuple, Any] = {}

    def entries_of(path: Path):
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in read:
            try:
                payload = checked_payload(path.read_bytes())
                got = group_entries(payload)
                if got is None:  # a one-run checkpoint: its run is the directory's
                    state = _torch_state(payload)
                    got = {path.parent.name: (int(state.get("epoch", 0)), None, state)}
                read[key] = (got, max((e for e, _, _ in got.values()), default=0))
            except Exception as exc:  # noqa: BLE001 - corrupt/truncated: fall back
                read[key] = exc
        return read[key]

    notes: dict[str, str | None] = {}
    for d in map(Path, run_dirs):
        bad, ok = [], None
        for name in ("ckpt-last.pt", "ckpt-prev.pt"):
            p = d / name
            if not p.exists():
                continue
            got = entries_of(p)
            if isinstance(got, Exception) or d.name not in got[0]:
                why = got if isinstance(got, Exception) else ValueError(f"it holds no state of run {d.name}")
                bad.append(f"{p} is corrupt ({type(why).__name__}: {why})")
                continue
            ok = name
            break
        notes[d.name] = ((f"{'; '.join(bad)}; fell back to the previous checkpoint {ok}" if ok else
                          f"{'; '.join(bad)}; no intact checkpoint left: the run starts over") if bad else None)
    best: dict[str, tuple] = {}
    for got in read.values():
        if isinstance(got, Exception):
            continue
        entries, group_epoch = got
        for h, (epoch, failed, state) in entries.items():
            if h in notes and (h not in best or (epoch, group_epoch) > best[h][:2]):
                best[h] = (epoch, group_epoch, failed, state)
    out = {}
    for d in map(Path, run_dirs):
        if d.name not in best:
            out[d.name] = (None, notes[d.name], None)
            continue
        _, _, failed, state = best[d.name]
        out[d.name] = (state, notes[d.name], failed)
    return out


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


def boot_id() -> str | None:
    """This boot's id (Linux): a lock written before a reboot names no live process."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def proc_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat), or
    None where /proc cannot say. With the boot id it names one process: a reused PID differs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _proc_start_wall(ticks: int) -> float | None:
    """``proc_start`` as wall-clock seconds (to within a second: /proc/stat's btime is whole seconds)."""
    try:
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                     if ln.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return None


@contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends: a second Ctrl-C arriving while locks are
    given back (the terminal's and the launcher's SIGINT) waits until every lock is gone, then
    interrupts as usual. Only the main thread receives Python's signal handlers; elsewhere a no-op."""
    import signal
    import threading

    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def release_all(locks) -> None:
    """Give back several locks with signals held (``signals_deferred``): all of them go, or none
    was held."""
    with signals_deferred():
        for lock in locks:
            if lock is not None:
                lock.release()


class LockBusy(EffdstlError):
    """The run is locked by a live process (``holder``: its {pid, host, started})."""

    def __init__(self, message: str, path: Path, holder: dict):
        super().__init__(message)
        self.path, self.holder = path, holder


HALF_WRITTEN_S = 5.0  # a lock file still unreadable after this long was left by a killed writer


class RunLock:
    """An exclusive lock on a run directory: ``lock`` holds {pid, host, started, boot_id, pid_start}.

    A second process asking for it gets ``LockBusy`` (an ``EffdstlError``) naming the holder. A lock
    on this host is stale when its process is gone, when the machine rebooted since (``boot_id``),
    or when its PID now belongs to another process (``pid_start``, the holder's start time from
    /proc/<pid>/stat, differs; a lock without it, from an older version: a process that started
    after the lock was written cannot hold it). Another host's lock is stale when its file was not
    refreshed for ``stale_s``. A stale lock is removed by whoever looks at it next (``alive``,
    ``acquire``), so no command waits on it. The file appears with its content in one step (a hard
    link of a written temp file), so a reader never sees it half-written; one left so by an older
    version or a dead writer counts as held for ``HALF_WRITTEN_S``, then as stale.
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
                pid = int(info.get("pid", -1))
            except (TypeError, ValueError, OverflowError):
                return True
            if info.get("boot_id") and boot_id() and info["boot_id"] != boot_id():
                return True   # written before a reboot: nothing of that boot runs
            if not _alive(pid):
                return True
            now = proc_start(pid)
            if now is None:
                return False
            if info.get("pid_start") is not None:
                return info["pid_start"] != now   # the PID was reused by another process
            began, started = _proc_start_wall(now), info.get("started")
            # an older lock (no pid_start): its holder began before it wrote the lock
            return isinstance(started, (int, float)) and began is not None and began > started + 2.0
        return age > self.stale_s

    _stale = is_stale  # the old private name

    def alive(self) -> bool:
        """A live process (another one, or this one) holds the lock now; a stale lock is removed."""
        if not self.path.exists():
            return False
        try:
            ino = self.path.stat().st_ino
        except (FileNotFoundError, NotADirectoryError):
            return False
        if not self.is_stale(self.holder()):
            return True
        self._remove_stale(ino)
        return False

    def _remove_stale(self, ino: int) -> None:
        """Remove the stale lock file ``ino`` (not a fresh one another process made meanwhile)."""
        try:
            if self.path.stat().st_ino == ino:
                self.path.unlink()
        except OSError:  # gone already, or a read-only results folder: it stays stale, and says so
            pass

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
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "boot_id": boot_id(), "pid_start": proc_start(os.getpid())}
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
                self._remove_stale(ino)  # the same file still (not a fresh lock another process just made)
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
        """Give the lock back; a signal arriving meanwhile waits until it is gone (Ctrl-C twice)."""
        if self.held:
            with signals_deferred():
                info = self.holder()
                if info and info.get("pid") == os.getpid():
                    self.path.unlink(missing_ok=True)
                self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
