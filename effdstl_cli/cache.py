"""Teacher-output cache: a frozen teacher's logits per (sample, augmentation variant), reused.

A teacher is frozen and in eval mode, so its logits are a function of its input image alone. When
the training images come from a finite set — no augmentation (1 variant per sample) or the CIFAR
pad-crop + flip (9 x 9 offsets x 2 flips = 162 variants) — each (sample, variant) needs the
teacher only once per process (or once ever, with a cache folder). RandomResizedCrop draws from a
continuum, so folder/ImageNet data is never cached.

Exactness: logits are stored in the dtype the teacher produced them in (float32 without autocast,
bfloat16 under bf16 autocast), so a stored row is bit-for-bit the row the teacher returned. A
later recomputation of the same image in another batch can differ only by the backend's
batch-shape rounding (none seen on the CPU for batches of 17+ rows; bf16 rounding on a GPU).

Key: sha256 of the teacher's weights (state_dict bytes) + model spec + dataset + image size +
variant count + output dtype. New weights give a new key, so a cache never serves a changed
teacher; with a cache folder, files of other keys are simply not read. A cache file carries the
sha256 of its contents (the checkpoint layout, ``io.checked_blob``) and is verified when read: a
damaged one is said in one line on stderr and never served (its rows are recomputed and rewritten,
as the cache is derived data).

Lookups happen on the host (sample index and variant id are CPU tensors the data stream already
has), so neither hits nor stores cost a host-device sync; only the values live on the device.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from . import files as fio


def weights_sha(net: torch.nn.Module) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes, bytes) — its identity."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too (BN counters)
    return h.hexdigest()


def cache_key(teacher_sha: str, model: str, dataset: str, image_size, variants: int, dtype: str) -> str:
    ident = json.dumps({"teacher": teacher_sha, "model": model, "dataset": dataset,
                        "image_size": image_size, "variants": variants, "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


class TeacherCache:
    """Logits of one teacher on one training split: ``slot[sample * V + variant]`` -> row of ``values``.

    ``slot`` (int32, -1 = not yet computed) lives on the CPU; ``values`` (rows x classes) on
    ``device``, grown by doubling up to ``max_bytes`` (then new rows are no longer stored).
    """

    def __init__(self, key: str, n: int, variants: int, device, max_bytes: int = 1 << 30,
                 path: str | Path | None = None):
        self.key, self.n, self.variants = key, int(n), int(variants)
        self.device = torch.device(device)
        self.max_bytes = int(max_bytes)
        self.path = Path(path) if path else None
        self.slot = torch.full((self.n * self.variants,), -1, dtype=torch.int32)
        self.values: torch.Tensor | None = None  # allocated on the first store (dtype/classes known)
        self.count = 0
        self.dirty = False
        self.hits = self.misses = 0
        self.note: str | None = None  # why a cache file on disk was not used
        if self.path is not None and self.path.is_file():
            self._load()

    # -- lookups ---------------------------------------------------------------------------
    def keys(self, idx: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        idx, variant = idx.cpu().long(), variant.cpu().long()
        if len(idx) and (int(idx.max()) >= self.n or int(variant.max()) >= self.variants or int(variant.min()) < 0):
            raise IndexError(f"teacher cache: sample/variant out of range ({self.n} x {self.variants})")
        return idx * self.variants + variant

    def get(self, idx: torch.Tensor, variant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hit mask (B,) on the CPU, logits (B, C) on the device with rows of misses undefined)."""
        slots = self.slot[self.keys(idx, variant)]
        hit = slots >= 0
        if self.values is None or not bool(hit.any()):
            return hit, None
        rows = torch.where(hit, slots, 0).long().to(self.device, non_blocking=True)
        return hit, self.values[rows]

    def put(self, idx: torch.Tensor, variant: torch.Tensor, logits: torch.Tensor) -> None:
        """Store ``logits`` (B, C) for rows not yet stored (as long as the size cap allows)."""
        keys = self.keys(idx, variant)
        new = self.slot[keys] < 0
        if not bool(new.any()):
            return
        if self.values is None:
            self.values = torch.empty((0, logits.shape[1]), dtype=logits.dtype, device=self.device)
        if logits.dtype != self.values.dtype or logits.shape[1] != self.values.shape[1]:
            raise ValueError(f"teacher cache holds {self.values.dtype} x {self.values.shape[1]}, "
                             f"got {logits.dtype} x {logits.shape[1]}")
        row_bytes = self.values.element_size() * self.values.shape[1]
        room = max(self.max_bytes // max(row_bytes, 1) - self.count, 0)
        pos = new.nonzero().squeeze(1)[:room]
        k = len(pos)
        if k == 0:
            return
        self._reserve(self.count + k)
        dst = torch.arange(self.count, self.count + k, dtype=torch.int32)
        self.slot[keys[pos]] = dst
        self.values[dst.long().to(self.device, non_blocking=True)] = \
            logits[pos.to(logits.device, non_blocking=True)].detach()
        self.count += k
        self.dirty = True

    def _reserve(self, rows: int) -> None:
        cap = self.values.shape[0]
        if rows <= cap:
            return
        row_bytes = self.values.element_size() * self.values.shape[1]
        new_cap = min(max(rows, 2 * cap, 1024), max(self.max_bytes // max(row_bytes, 1), rows), self.n * self.variants)
        grown = torch.empty((new_cap, self.values.shape[1]), dtype=self.values.dtype, device=self.device)
        grown[:self.count] = self.values[:self.count]
        self.values = grown

    def fetch(self, idx: torch.Tensor, variant: torch.Tensor,
              compute: Callable[[torch.Tensor | None], torch.Tensor], bucket: int = 8,
              full_above: float = 0.5) -> torch.Tensor:
        """Logits for the batch: cached rows reused, the rest from ``compute(rows)``.

        ``compute(None)`` must return the teacher's logits for the whole batch, ``compute(rows)``
        those of the given rows (a device index tensor). Misses are computed as a sub-batch padded
        to a multiple of B/``bucket`` rows (few distinct shapes for cudnn.benchmark), or as the
        whole batch when more than ``full_above`` of it misses. New rows are then stored.
        """
        b = len(idx)
        hit, cached = self.get(idx, variant)
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += b - n_hit
        if n_hit == b:
            return cached
        if cached is None or (b - n_hit) > full_above * b:
            z = compute(None)
            self.put(idx, variant, z)
            if cached is None:
                return z
            # keep the stored rows (what the first computation gave), fill the misses
            keep = hit.to(z.device, non_blocking=True)[:, None]
            return torch.where(keep, cached.to(z.dtype), z)
        miss = (~hit).nonzero().squeeze(1)
        step = max(b // bucket, 1)
        padded = -(-len(miss) // step) * step
        rows = torch.cat([miss, miss[:1].expand(padded - len(miss))]) if padded > len(miss) else miss
        zm = compute(rows.to(cached.device, non_blocking=True))[:len(miss)]
        self.put(idx[miss], variant[miss], zm)
        out = cached.to(zm.dtype).clone()
        out[miss.to(out.device, non_blocking=True)] = zm
        return out

    # -- persistence -------------------------------------------------------------------------
    def save(self) -> None:
        """Write (atomically) when something new was stored; merge what another process added."""
        if self.path is None or not self.dirty or self.values is None:
            return
        if self.path.is_file():
            self._load(merge=True)
        state = {"key": self.key, "n": self.n, "variants": self.variants,
                 "slot": self.slot.clone(), "values": self.values[:self.count].cpu()}
        fio.atomic_write_bytes(self.path, fio.checked_blob(fio.tensor_bytes(state)))  # checksummed like a checkpoint
        self.dirty = False

    def _load(self, merge: bool = False) -> None:
        import io

        try:  # verified against the checksum written with it: a damaged row is never served
            obj = torch.load(io.BytesIO(fio.checked_payload(self.path.read_bytes())), map_location="cpu",
                             weights_only=True)
        except Exception as exc:  # damaged (or an older unchecked file): said once, recomputed, rewritten
            if not merge and self.note is None:
                self.note = f"teacher cache {self.path} is damaged ({exc}); its rows are recomputed"
                print(self.note, file=sys.stderr, flush=True)
            return
        if obj.get("key") != self.key or obj.get("n") != self.n or obj.get("variants") != self.variants:
            return
        slot, values = obj["slot"], obj["values"]
        have = (slot >= 0).nonzero().squeeze(1)
        if merge:
            have = have[self.slot[have] < 0]  # only what this process lacks
        if len(have) == 0:
            return
        dirty = self.dirty
        self.put(have // self.variants, have % self.variants, values[slot[have].long()].to(self.device))
        self.dirty = dirty or merge

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "rows": self.count, "mbytes": (self.values.element_size() * self.values.shape[1] * self.count / 2**20
                                               if self.values is not None else 0.0)}
