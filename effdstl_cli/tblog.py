"""TensorBoard scalars of a run, written beside its metrics.jsonl.

``tensorboard --logdir results/<study>`` shows a whole study: each run writes one event file in
``runs/<hash>/tb/<label>-seed<N>/``, so TensorBoard names the run by its hash *and* its label
(``runs/3f2a…/tb/full-reg_cor-seed0``). The scalars are metrics.jsonl's numbers, one series per
metric (``SCALARS`` and ``loss/<name>`` per loss term), step = epoch.

The event file mirrors metrics.jsonl as the engine keeps it: rewritten whole (atomically) when a
run starts or resumes, so a resumed run never shows an epoch twice, and one epoch's records
appended after each epoch, so a live TensorBoard follows training. The records are encoded by
tensorboard's own protobufs and record writer; nothing here imports torch.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

EVENTS = "events.out.tfevents.0.effdstl"   # "tfevents" in the name is what TensorBoard looks for
# metrics.jsonl key -> TensorBoard tag
SCALARS = {"train_top1": "train/top1", "test_top1": "test/top1", "test_top5": "test/top5",
           "train_loss": "train/loss", "test_loss": "test/loss", "lr": "lr", "subset_frac": "subset_frac",
           "stage": "stage"}


def log_dir(run_dir: str | Path, cfg: dict) -> Path:
    """The run's TensorBoard folder: ``<run_dir>/tb/<label>-seed<N>`` (the label made path-safe)."""
    meta = cfg.get("meta") or {}
    label = str(meta.get("label") or cfg.get("model") or "run")
    slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", label).strip("-") or "run"
    return Path(run_dir) / "tb" / f"{slug}-seed{meta.get('seed', cfg.get('seed', 0))}"


def _events(rows: list[dict], t0: float) -> list[bytes]:
    from tensorboard.compat.proto import event_pb2, summary_pb2

    out = []
    for r in rows:
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(r[k]))
                  for k, tag in SCALARS.items() if isinstance(r.get(k), (int, float))]
        values += [summary_pb2.Summary.Value(tag=f"loss/{k}", simple_value=float(v))
                   for k, v in sorted((r.get("losses") or {}).items()) if isinstance(v, (int, float))]
        out.append(event_pb2.Event(wall_time=t0, step=int(r["epoch"]), summary=summary_pb2.Summary(value=values))
                   .SerializeToString())
    return out


def _header(t0: float) -> bytes:
    from tensorboard.compat.proto import event_pb2

    return event_pb2.Event(wall_time=t0, file_version="brain.Event:2").SerializeToString()


def _framed(records: list[bytes]) -> bytes:
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    buf = io.BytesIO()
    w = RecordWriter(buf)
    for rec in records:
        w.write(rec)
    return buf.getvalue()


def rewrite(run_dir: str | Path, cfg: dict, history: list[dict]) -> Path:
    """The event file for the whole ``history``, written atomically (start or resume of a run)."""
    d = log_dir(run_dir, cfg)
    d.mkdir(parents=True, exist_ok=True)
    path = d / EVENTS
    t0 = time.time()
    tmp = d / f".{EVENTS}.{os.getpid()}.tmp"
    try:
        tmp.write_bytes(_framed([_header(t0), *_events(history, t0)]))
        os.replace(tmp, path)
    except OSError as exc:  # disk full, quota: no temp file left behind, and the message names the file
        tmp.unlink(missing_ok=True)
        raise _named(exc, path) from None
    return path


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file name (a failed write() carries none): the CLI's one line
    then says which file could not be written."""
    return exc if exc.filename else OSError(exc.errno, exc.strerror or str(exc), str(path))


def append(run_dir: str | Path, cfg: dict, rows: list[dict] | dict) -> None:
    """Finished epochs' scalars (one row or several), appended (a killed writer leaves at most a
    torn last record, which TensorBoard skips and the next ``rewrite`` replaces)."""
    rows = [rows] if isinstance(rows, dict) else rows
    path = log_dir(run_dir, cfg) / EVENTS
    if not path.exists():
        rewrite(run_dir, cfg, rows)
        return
    try:
        with open(path, "ab") as f:
            f.write(_framed(_events(rows, time.time())))
    except OSError as exc:
        raise _named(exc, path) from None
