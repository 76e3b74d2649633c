"""The batch stream: what the engine asks for batches, and nothing else — the training batches of
an epoch (this rank's share, with augmentation) and the evaluation batches of a split, from
in-memory tensors, PIL in DataLoader workers, or bytes decoded on the device.

``StreamOptions`` is its own small options object (workers, device decoding, the PIL share of a
batch); ``--decode`` is parsed by it (:meth:`StreamOptions.parse_decode`). It lives in ``spec``,
which imports no torch, so a dry run can parse and describe it.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import warnings

import torch

from .folder import KeyedView, MixedView, collate_mixed, decode_mixed, mixed_batches
from .spec import DECODE, StreamOptions  # noqa: F401 - torch-free (a dry run parses --decode); re-exported

_WORKERS_TOLD: set[int] = set()


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, as torch counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _loader(dataset, **kw):
    """The batches of a DataLoader. torch warns of more workers than cores twice per loader (when
    it is built and when it is iterated), two lines with its own source path each time; here it is
    said once per process, in one line."""
    n, cores = int(kw.get("num_workers") or 0), cpu_cores()
    if n > cores and n not in _WORKERS_TOLD:
        _WORKERS_TOLD.add(n)
        print(f"note: --workers {n} starts more DataLoader workers than the {cores} CPU cores this "
              f"process may use; fewer may be faster", file=sys.stderr, flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        it = iter(torch.utils.data.DataLoader(dataset, **kw))
    yield from it


def train_batches(split, order, gbatch: int, steps: int, gen, device, opts: StreamOptions, rank: int = 0,
                  world: int = 1, chl: bool = False, with_variant: bool = False):
    """Yield (step, local indices, x, y, variant ids or None) of this rank's share of each global batch.

    In-memory splits augment the whole global batch with the epoch's generator and slice this
    rank's rows, so a DDP job sees exactly the samples and augmentations of a single process.
    On-disk splits go through DataLoader workers (same order): with device decoding (default on
    CUDA) the workers only read bytes and the device decodes + augments each batch one batch ahead
    in a side thread (``opts.cpu_share`` of each batch decoded by PIL in the workers instead); else
    workers decode with PIL. Either way a sample's crop and flip are keyed by (an epoch key from
    the epoch's generator, its index), so they do not depend on the decoder, the number of workers
    or the DDP rank that handles it.
    """
    per = gbatch // world
    lo = rank * per
    glob = [order[s * gbatch:(s + 1) * gbatch] for s in range(steps)]
    if getattr(split, "in_memory", False):
        labels = split.labels.to(device)
        for s, idx in enumerate(glob):
            if with_variant:
                x, var = split.get_batch(idx, gen, device, return_variant=True)
                x, var = x[lo:lo + per], var[lo:lo + per]
            else:
                x, var = split.get_batch(idx, gen, device)[lo:lo + per], None
            idx_l = idx[lo:lo + per]
            if chl and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield s, idx_l, x, labels[idx_l.to(device)], var
        return
    local = [idx[lo:lo + per].tolist() for idx in glob]
    key = int(torch.randint(0, 2 ** 62, (1,), generator=gen))  # the epoch's augmentation key
    if opts.device_decode(device, split):
        for s, (x, y, idx_l) in enumerate(decoded(split, local, key, device, opts, None)):
            if chl:
                x = x.contiguous(memory_format=torch.channels_last)
            yield s, idx_l, x, y, None
        return
    loader = _loader(
        KeyedView(split, key), batch_sampler=local, num_workers=opts.workers, pin_memory=device.type == "cuda",
        persistent_workers=False)
    for s, (x, y, idx_l) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        if chl:
            x = x.contiguous(memory_format=torch.channels_last)
        yield s, idx_l, x, y.to(device, non_blocking=True), None


def decoded(split, batches: list[list[int]], epoch_key: int | None, device, opts: StreamOptions, augment):
    """(x, y, indices) per batch: DataLoader workers read the files (and decode ``opts.cpu_share``
    of each batch with PIL), ``decode_mixed`` decodes and transforms the rest on ``device``.
    On CUDA a side thread prepares the next batches on its own stream (nvJPEG's host part and the
    launches overlap the training step); on the CPU inline."""
    loader = _loader(
        MixedView(split, epoch_key, augment), batch_sampler=mixed_batches(batches, opts.cpu_share, epoch_key),
        num_workers=opts.workers, collate_fn=collate_mixed, pin_memory=device.type == "cuda",
        persistent_workers=False)
    if device.type != "cuda":
        for item in loader:
            yield decode_mixed(split, item, device, augment, epoch_key)
        return
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    side = torch.cuda.Stream(device)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            with torch.cuda.device(device), torch.cuda.stream(side):
                for item in loader:
                    x, y, idx = decode_mixed(split, item, device, augment, epoch_key)
                    ev = torch.cuda.Event()
                    ev.record(side)
                    if not put((x, y, idx, ev)):
                        return
            put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    th = threading.Thread(target=work, name="effdstl-decode", daemon=True)
    th.start()
    try:
        cur = torch.cuda.current_stream(device)
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            x, y, idx, ev = item
            cur.wait_event(ev)
            x.record_stream(cur)
            y.record_stream(cur)
            yield x, y, idx
    finally:
        stop.set()
        th.join(timeout=30)


def eval_batches(split, idx, batch: int, device, opts: StreamOptions):
    """(x, y) on ``device`` for samples ``idx`` of ``split`` in batches of ``batch``, with the
    evaluation transform (no augmentation)."""
    if getattr(split, "in_memory", False):
        labels = split.labels.to(device)
        for i in idx.split(batch):
            yield split.get_batch(i, None, device), labels[i.to(device)]
    elif opts.device_decode(device, split):
        for x, y, _ in decoded(split, [i.tolist() for i in idx.split(batch)], None, device, opts, False):
            yield x, y
    else:
        loader = _loader(torch.utils.data.Subset(KeyedView(split, None, False), idx.tolist()),
                         batch_size=batch, num_workers=opts.workers)
        for x, y, _ in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
