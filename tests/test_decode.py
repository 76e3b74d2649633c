"""Device decoding of folder data (workers read bytes; decode_jpeg + RandomResizedCrop + flip on
the device), run here through its CPU fallback: the same code with device='cpu'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from effdstl_cli.config import config_hash
from effdstl_cli.data import build_data, collate_encoded, decode_images
from effdstl_cli.engine import Env, train_group
from effdstl_cli.io import read_jsonl


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageFolder of real-looking JPEGs of varied sizes (and one PNG) in 4 classes."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("val", 8)):
        for i in range(n):
            d = root / split / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            base = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
            if split == "train" and i == 5:
                im.save(d / f"{i}.png")
            elif i % 7 == 3:
                im.convert("L").save(d / f"{i}.jpg", quality=85)   # greyscale JPEG -> 3 channels
            else:
                im.save(d / f"{i}.jpg", quality=90)
    return root


def test_decode_batch_shape_range_determinism_and_pil_agreement(folder):
    d = build_data(f"folder:{folder}", image_size=24)
    tr = d.train
    datas = [tr.read_bytes(i) for i in range(len(tr))]
    imgs = decode_images(datas, "cpu")
    assert all(im.dtype == torch.uint8 and im.shape[0] == 3 for im in imgs)
    x1 = tr.decode_batch(datas, torch.Generator().manual_seed(3))
    x2 = tr.decode_batch(datas, torch.Generator().manual_seed(3))
    assert x1.shape == (32, 3, 24, 24) and x1.dtype == torch.float32
    assert float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0
    assert torch.equal(x1, x2)                                            # seeded: reproducible
    assert not torch.equal(x1, tr.decode_batch(datas, torch.Generator().manual_seed(4)))
    assert torch.equal(x1 * 255, (x1 * 255).round())                      # whole 8-bit levels, like PIL's
    # the same crop and flip draws as the PIL path: the images agree to resampling rounding
    g = torch.Generator().manual_seed(3)
    pil = torch.stack([tr.load(i, g) for i in range(len(tr))])
    assert (x1 - pil).abs().mean() < 0.01
    # evaluation transform (resize + centre crop), no randomness
    te = d.test
    e = te.decode_batch([te.read_bytes(i) for i in range(len(te))])
    assert e.shape == (8, 3, 24, 24)
    assert (e - torch.stack([te.load(i) for i in range(len(te))])).abs().mean() < 0.01


def test_encoded_view_and_collate(folder):
    tr = build_data(f"folder:{folder}", image_size=16).train
    view = tr.bytes_view()
    assert len(view) == len(tr)
    b, y, i = view[3]
    assert b.dtype == torch.uint8 and y == int(tr.labels[3]) and i == 3
    datas, ys, idx = collate_encoded([view[k] for k in (0, 1, 2)])
    assert len(datas) == 3 and torch.equal(ys, tr.labels[:3]) and torch.equal(idx, torch.arange(3))


def test_engine_trains_folder_data_through_device_decoding(folder, tmp_path):
    cfg = {"role": "student", "dataset": f"folder:{folder}", "data_root": None, "image_size": 16,
           "model": "mlp:16", "seed": 0, "batch_size": 8, "epochs": 2,
           "stages": [{"epochs": 2, "distiller": {"name": "none"},
                       "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
                       "sched": {"warmup_epochs": 0, "min_lr": 0.0}}],
           "teachers": {}, "meta": {}}
    rows = []
    for run in ("a", "b"):
        d = tmp_path / run / config_hash(cfg)
        (rec,) = train_group([(cfg, d)], Env(device="cpu", gpu_decode=True, workers=2, log=lambda m: None))
        assert rec["status"] == "done", rec
        rows.append([{k: v for k, v in r.items() if k != "epoch_s"} for r in read_jsonl(d / "metrics.jsonl")])
    assert len(rows[0]) == 2 and rows[0] == rows[1]  # augmentation drawn from the epoch's generator: reproducible
