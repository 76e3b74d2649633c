"""One run directory (docs/RUNDIR.md): its files, its one state, and checksummed reads.

Everything that asks "is this run done?" asks here: planning and launching (``studies``,
``launch``), ``effdstl status``, the results table (``results``) and the engine when it skips a
finished run or loads a teacher. A state is one of

  done     final.json is intact and every file it seals matches its checksum
  damaged  final.json exists, but it or a file it seals is unreadable, missing or altered
  failed   failed.json (a NaN loss, ...): kept as failed until deleted (or ``--rerun``)
  running  a live process holds the lock
  partial  epochs or a checkpoint are on disk, nobody is training it now
  pending  nothing yet

The seal: ``final.json`` is written last and holds ``files`` ({name: {sha256, bytes}} of
model.pt, subset.pt, metrics.jsonl and config.yaml, computed at write time) and ``checksum`` (sha256 over the
rest of final.json itself). A run written before seals existed has neither: it is accepted as
"done (unverified)" when its final.json parses and metrics.jsonl holds every epoch. Files up to ``DEEP_MAX`` bytes are hashed whenever a state is asked for; larger weight
files only have their size checked there, and are hashed in full whenever they are loaded
(``verify``), so a damaged teacher is never used. No torch import: status and results stay fast.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from . import files as fio

# libyaml's parser where PyYAML has it (10x faster; the same safe constructors and resolvers, so the
# same values): state() reads config.yaml on every progress poll and `results` reads one per run.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
from .errors import EffdstlError

STATES = ("done", "damaged", "failed", "running", "partial", "pending")
SEALED = ("model.pt", "subset.pt", "metrics.jsonl", "config.yaml")
DEEP_MAX = 64 << 20   # files up to this size are hashed on every state(); larger ones when loaded

_HASH_NAME = re.compile(r"[0-9a-f]{12}")   # run folders are named by config_hash


def is_run_hash(name: str) -> bool:
    """Whether a folder name is a run hash (config.config_hash), the name every launch gives a run."""
    return bool(_HASH_NAME.fullmatch(name))
_checked: dict[tuple, str | None] = {}   # (what was looked at, stat of each file) -> problem


class DamagedRun(EffdstlError):
    """A finished run whose files do not match what was written."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class RunDir:
    """``RunDir(path)``: read a run directory; ``state()`` is its one verdict."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    # -- plain reads ---------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """config.yaml (a mapping), or one line naming the file and the cure."""
        p = self.file("config.yaml")
        try:
            cfg = yaml.load(p.read_text(), Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DamagedRun(f"cannot read {p} ({type(exc).__name__}); {self.cure()}") from None
        if not isinstance(cfg, dict):
            raise DamagedRun(f"{p} is not a run config (expected a mapping); {self.cure()}")
        return cfg

    @property
    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl (a garbled last line, a killed writer's, is dropped)."""
        return fio.read_jsonl(self.file("metrics.jsonl"))

    @property
    def failed(self) -> dict | None:
        """failed.json's record ({} when unreadable), None when the run has not failed."""
        p = self.file("failed.json")
        if not p.exists():
            return None
        try:
            rec = fio.read_json(p)
        except (OSError, ValueError):
            return {}
        return rec if isinstance(rec, dict) else {}

    @property
    def job(self) -> dict:
        p = self.file("job.json")
        try:
            rec = fio.read_json(p) if p.exists() else {}
        except (OSError, ValueError):
            return {}
        return rec if isinstance(rec, dict) else {}

    @property
    def lock(self) -> fio.RunLock:
        return fio.RunLock(self.path)

    def running(self) -> bool:
        return self.file("lock").exists() and self.lock.alive()

    # -- the seal ------------------------------------------------------------------------------
    def cure(self) -> str:
        return (f"retrain it: add `--rerun {self.name}` to the command that launched it "
                f"(or delete {self.path})")

    def _read_final(self) -> tuple[dict | None, str | None]:
        p = self.file("final.json")
        try:
            rec = json.loads(p.read_bytes().decode())
        except FileNotFoundError:
            return None, "final.json is missing"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, f"final.json is unreadable ({type(exc).__name__}: truncated or altered?)"
        if not isinstance(rec, dict):
            return None, "final.json is not a record (altered?)"
        if "checksum" in rec:
            body = {k: v for k, v in rec.items() if k != "checksum"}
            if hashlib.sha256(_canonical(body)).hexdigest() != rec["checksum"]:
                return None, "final.json does not match its checksum (altered?)"
        return rec, None

    def _file_problem(self, name: str, info: Any, deep: bool) -> str | None:
        p = self.file(name)
        st = _stat(p)
        if st is None:
            return f"{name} is missing"
        if not isinstance(info, dict):
            return f"final.json's entry for {name} is garbled"
        if st[1] != info.get("bytes"):
            return f"{name} has {st[1]} bytes but {info.get('bytes')} were written (truncated or altered?)"
        if deep or st[1] <= DEEP_MAX:
            if file_sha256(p) != info.get("sha256"):
                return f"{name} does not match its checksum (altered?)"
        return None

    def problem(self, deep: bool = False) -> str | None:
        """Why a finished run cannot be trusted (one phrase naming the file), or None.

        ``deep`` hashes every sealed file whatever its size (done when weights are loaded)."""
        key = (str(self.path), deep, _stat(self.file("final.json")), _stat(self.file("config.yaml")),
               *(_stat(self.file(n)) for n in SEALED))
        if key in _checked:
            return _checked[key]
        why = self._problem(deep)
        _checked[key] = why
        if len(_checked) > 4096:
            _checked.clear()
        return why

    def identity_problem(self) -> str | None:
        """Why config.yaml is not the config this run directory is named after (edited by hand, or
        copied under another name), or None. A run is resumed and sealed with the values it was
        named for, never with others (a folder not named like a hash is not checked)."""
        st = _stat(self.file("config.yaml"))
        if not _HASH_NAME.fullmatch(self.name) or st is None:
            return None
        key = ("identity", str(self.path), st)  # state() asks on every poll: hash each version once
        if key not in _checked:
            try:
                from .config import config_hash

                h = config_hash(self.config)
                why = None if h == self.name else (f"config.yaml is not the config the run is named after "
                                                   f"(it hashes to {h}; edited by hand?)")
            except DamagedRun:
                why = "config.yaml is unreadable"
            _checked[key] = why
        return _checked[key]

    def _problem(self, deep: bool) -> str | None:
        # A finished run's config.yaml is guarded by its seal (final.json's checksums); the hash-to-name
        # check is for unfinished runs, the ones that could be resumed with values never used.
        if not self.file("final.json").exists():
            why = self.identity_problem()
            if why:
                return why
        rec, why = self._read_final()
        if why:
            return why
        files = rec.get("files")
        if isinstance(files, dict):
            for name, info in sorted(files.items()):
                why = self._file_problem(name, info, deep)
                if why:
                    return why
            return None
        # written before seals existed: accepted unverified, unless epochs are visibly missing
        want = rec.get("epochs")
        have = len(self.metrics)
        if isinstance(want, int) and have < want:
            return f"metrics.jsonl holds {have} of {want} epochs (deleted or truncated?)"
        return None

    def verify(self, name: str | None = None) -> None:
        """Raise ``DamagedRun`` (one line: the file and the cure) unless the finished run is intact;
        every sealed file is hashed in full."""
        why = self.problem(deep=True)
        if why:
            raise DamagedRun(f"run {self.name} is damaged: {why}; {self.cure()}")

    @property
    def final(self) -> dict:
        """final.json, verified (``DamagedRun`` otherwise), without the seal's own fields."""
        why = self.problem()
        if why:
            raise DamagedRun(f"run {self.name} is damaged: {why}; {self.cure()}")
        rec, _ = self._read_final()
        return {k: v for k, v in rec.items() if k not in ("files", "checksum")}

    def write_final(self, rec: dict) -> None:
        """Seal the run: final.json with the checksums of the files it vouches for, written last."""
        files = {}
        for name in SEALED:
            p = self.file(name)
            if p.exists():
                files[name] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        body = json.loads(json.dumps({**rec, "files": files}, default=str))  # what a reader will see
        fio.write_json(self.file("final.json"), {**body, "checksum": hashlib.sha256(_canonical(body)).hexdigest()})

    # -- the verdict ---------------------------------------------------------------------------
    def state(self) -> str:
        """done | damaged | failed | running | partial | pending (see the module doc)."""
        if self.file("final.json").exists():
            if self.file("lock").exists():
                self.lock.alive()  # a stale lock in a finished run (its trainer killed right after) goes
            return "damaged" if self.problem() else "done"
        if self.file("failed.json").exists():  # terminal until --rerun: never resumed as it is
            return "failed"
        if self.identity_problem():  # its config was edited: never resumed
            return "damaged"
        if self.running():
            return "running"
        if any(self.file(n).exists() for n in ("ckpt-last.pt", "ckpt-prev.pt", "metrics.jsonl")):
            return "partial"
        return "pending"

    def epochs_done(self) -> int:
        return len(self.metrics)

    def require_finished(self, what: str) -> None:
        """The one check before a finished run's files are read as an input (a teacher, a probed
        run): it must be done and intact, every sealed file hashed in full. Otherwise one line
        naming ``what``, the run and its problem (damaged, failed, or not finished)."""
        st = self.state()
        why = self.problem(deep=True) if st in ("done", "damaged") else None
        if why:
            raise DamagedRun(f"{what}: run {self.name} is damaged: {why}; {self.cure()}")
        if st == "done":
            return
        if st == "failed":
            reason = (self.failed or {}).get("reason", "see its failed.json")
            raise EffdstlError(f"{what}: run {self.name} failed ({reason}) and cannot be used; fix the cause, then "
                               f"retrain it with `--rerun {self.name}` (or delete {self.path})")
        try:
            want = self.config.get("epochs", "?")
        except DamagedRun:
            want = "?"
        raise EffdstlError(f"{what}: run {self.name} has not finished ({st}, {self.epochs_done()} of {want} epochs); "
                           "finish it first (run the command that trained it again)")

    def clear_problem(self) -> str | None:
        """Why ``--rerun`` may not clear this run now (checked for every named run before any goes)."""
        if self.path.is_symlink():  # rmtree refuses a link, and deleting its target's files is not ours to do
            return (f"--rerun {self.name}: {self.path} is a symbolic link (to {self.path.resolve()}); "
                    "remove the link (or replace it by a copy) and run again")
        if self.running():
            info = self.lock.holder() or {}
            return (f"--rerun {self.name}: the run is being trained now by pid {info.get('pid')} "
                    f"on {info.get('host')}; stop that process first")
        return None

    def clear(self) -> None:
        """Forget everything the run has trained (``--rerun``): the folder goes, config.yaml is
        rewritten when it trains again. Refused while a live process trains it, or for a link."""
        why = self.clear_problem()
        if why:
            raise EffdstlError(why)
        if self.path.exists():
            shutil.rmtree(self.path)
        if self.path.exists():
            raise EffdstlError(f"--rerun {self.name}: {self.path} could not be removed")


def run_state(run_dir: str | Path) -> str:
    return RunDir(run_dir).state()


def run_of(path: str | Path) -> RunDir | None:
    """The run directory a file (its model.pt) or a folder is, when it is one (it holds config.yaml)."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    return RunDir(d) if (d / "config.yaml").is_file() else None
