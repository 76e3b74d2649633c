"""Device decoding of folder data (workers read bytes; decode_jpeg + RandomResizedCrop + flip on
the device), run here through its CPU fallback: the same code with device='cpu'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from effdstl_cli.config import config_hash
from effdstl_cli.data import (augment_params, build_data, decode_images, keyed_uniforms,
                              resize_each, resize_windows, sample_keys)
from effdstl_cli.engine import Env, train_group
from effdstl_cli.files import read_jsonl


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
    pil = tr.get_batch(torch.arange(len(tr)), torch.Generator().manual_seed(3))
    print("mean |device - PIL|", float((x1 - pil).abs().mean()))
    assert (x1 - pil).abs().mean() < 0.01
    # evaluation transform (resize + centre crop), no randomness
    te = d.test
    e = te.decode_batch([te.read_bytes(i) for i in range(len(te))])
    assert e.shape == (8, 3, 24, 24)
    assert (e - torch.stack([te.load(i) for i in range(len(te))])).abs().mean() < 0.01


def test_workers_only_read_bytes_for_the_device(folder):
    from effdstl_cli.data import MixedView, collate_mixed
    tr = build_data(f"folder:{folder}", image_size=16).train
    view = MixedView(tr, 5)
    assert len(view) == len(tr)
    b, y, i = view[(3, False)]
    assert b.dtype == torch.uint8 and b.dim() == 1 and torch.equal(b, tr.read_bytes(3))
    assert y == int(tr.labels[3]) and i == 3
    x_pil, pos_pil, datas, pos_enc, ys, idx = collate_mixed([view[(k, False)] for k in (0, 1, 2)])
    assert x_pil is None and pos_pil.numel() == 0 and len(datas) == 3 and torch.equal(pos_enc, torch.arange(3))
    assert torch.equal(ys, tr.labels[:3]) and torch.equal(idx, torch.arange(3))


def test_engine_trains_folder_data_through_device_decoding(folder, tmp_path):
    a = _folder_run(folder, tmp_path, "a", gpu_decode=True, workers=2)
    b = _folder_run(folder, tmp_path, "b", gpu_decode=True, workers=2)
    assert len(a) == 2 and a == b  # augmentation keyed by (epoch, sample): reproducible


# -- the batched augmentation: parameters and resample -------------------------------------------

def test_augment_params_follow_random_resized_crop():
    sizes = [(500, 375), (333, 500), (64, 64), (1000, 10), (10, 1000)] * 400
    crops, flips = augment_params(sizes, torch.Generator().manual_seed(0))
    again, flips2 = augment_params(sizes, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again) and torch.equal(flips, flips2)            # seeded
    assert crops.dtype == torch.long and crops.shape == (2000, 4) and flips.shape == (2000,)
    top, left, h, w = crops.T
    W = torch.tensor([s[0] for s in sizes])
    H = torch.tensor([s[1] for s in sizes])
    assert bool((top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all())
    assert bool((top + h <= H).all() and (left + w <= W).all())                # inside the image
    frac = (h * w).double() / (H * W).double()
    normal = (W >= 300) & (H >= 300)  # large enough that rounding moves the aspect < 1.5%
    assert bool((frac[normal] >= 0.07).all() and (frac[normal] <= 1.0).all())
    aspect = w.double() / h.double()
    assert bool((aspect[normal] > 0.74).all() and (aspect[normal] < 1.36).all())
    # the slivers fall back to the centre crop with the nearest allowed aspect: hand-computed
    assert crops[3].tolist() == [0, 493, 10, 13] and crops[4].tolist() == [493, 0, 13, 10]
    assert 0.45 < float(flips.double().mean()) < 0.55
    # same distribution as torchvision's RandomResizedCrop.get_params (mean area fraction, aspect)
    from torchvision.transforms import RandomResizedCrop
    torch.manual_seed(0)
    ref = [RandomResizedCrop.get_params(torch.empty(3, 375, 500), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]
    ref_frac = sum(r[2] * r[3] for r in ref) / (2000 * 375 * 500)
    ours = augment_params([(500, 375)] * 2000, torch.Generator().manual_seed(1))[0]
    our_frac = float((ours[:, 2] * ours[:, 3]).double().mean()) / (375 * 500)
    assert abs(our_frac - ref_frac) < 0.03, (our_frac, ref_frac)
    # the whole (h, w) distribution on a small image, and crop positions reaching both ends
    torch.manual_seed(1)
    tv = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 20, 60), (0.08, 1.0), (3 / 4, 4 / 3))
                       for _ in range(20000)])
    ours = augment_params([(60, 20)] * 20000, torch.Generator().manual_seed(2))[0]

    def hist(c):
        return torch.bincount(c[:, 2] * 61 + c[:, 3], minlength=21 * 61).double() / len(c)
    assert 0.5 * float((hist(ours) - hist(tv)).abs().sum()) < 0.05           # total variation
    for hh in (10, 15):
        top = ours[ours[:, 2] == hh, 0]
        assert int(top.min()) == 0 and int(top.max()) == 20 - hh               # 0 .. H - h, both ends


def _reference_resize(imgs, crops, s, flips=None):
    """The per-image resize resize_windows batches: crop, then F.interpolate with antialias."""
    import torch.nn.functional as F
    out = []
    for k, im in enumerate(imgs):
        _, h, w = im.shape
        if crops is not None:
            t, l, ch, cw = crops[k].tolist()
            z = F.interpolate(im[None, :, t:t + ch, l:l + cw].float(), size=(s, s), mode="bilinear",
                              antialias=True, align_corners=False)
        else:
            r = round(s * 256 / 224)
            nh, nw = (r, int(r * w / h)) if h <= w else (int(r * h / w), r)
            z = F.interpolate(im[None].float(), size=(nh, nw), mode="bilinear", antialias=True,
                              align_corners=False)
            top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
            z = z[:, :, top:top + s, left:left + s]
        out.append(z.flip(3) if flips is not None and bool(flips[k]) else z)
    return torch.cat(out)


@pytest.mark.parametrize("precrop", [True, False], ids=["precrop (CPU default)", "whole images (GPU default)"])
@pytest.mark.parametrize("s", [8, 24, 57])
def test_resize_windows_equals_per_image_interpolate(s, precrop):
    g = torch.Generator().manual_seed(s)
    imgs = [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, generator=g)
            for h, w in torch.randint(12, 90, (9, 2), generator=g)]
    crops, flips = augment_params([(im.shape[2], im.shape[1]) for im in imgs], g)
    # up- and down-scaling (windows from ~4 px to 89 px), flips, and the evaluation transform
    got = resize_windows(imgs, crops, s, flips, precrop=precrop)
    assert got.shape == (9, 3, s, s) and got.dtype == torch.float32
    assert torch.allclose(got, _reference_resize(imgs, crops, s, flips), atol=2e-3)
    assert torch.allclose(resize_windows(imgs, None, s, precrop=precrop), _reference_resize(imgs, None, s), atol=2e-3)
    const = [torch.full((3, 30 + k, 40 - k), 77, dtype=torch.uint8) for k in range(5)]  # constant stays constant
    assert torch.allclose(resize_windows(const, None, s, precrop=precrop), torch.tensor(77.0), atol=1e-3)


@pytest.mark.parametrize("precrop", [True, False])
def test_resize_windows_chunks_keep_the_batch_order(monkeypatch, precrop):
    import effdstl_cli.data.resample as data
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, generator=g)
            for h, w in torch.randint(20, 70, (11, 2), generator=g)]
    crops, flips = augment_params([(im.shape[2], im.shape[1]) for im in imgs], g)
    whole = resize_windows(imgs, crops, 16, flips, precrop), resize_windows(imgs, None, 16, precrop=precrop)
    monkeypatch.setattr(data, "RESIZE_CHUNK_PX", 3 * 70 * 70)  # a few images per chunk, sorted by size
    parts = resize_windows(imgs, crops, 16, flips, precrop), resize_windows(imgs, None, 16, precrop=precrop)
    for a, b in zip(whole, parts):
        assert torch.allclose(a, b, atol=1e-4)


def test_batched_resize_failure_on_a_device_falls_back_once_and_on_the_cpu_raises(monkeypatch, folder):
    import effdstl_cli.data.folder as data  # where decode_batch looks these up
    tr = build_data(f"folder:{folder}", image_size=12).train
    datas = [tr.read_bytes(i) for i in range(6)]

    def broken(*a, **k):
        raise NotImplementedError("no nested kernel here")
    monkeypatch.setattr(data, "resize_windows", broken)
    monkeypatch.setattr(data, "_BATCHED_RESIZE_FAILED", [])
    with pytest.raises(NotImplementedError):                    # CPU: the tested path; a failure is a bug
        tr.decode_batch(datas, torch.Generator().manual_seed(0))
    # another device type (meta tensors stand in for a GPU's): warn once, then resize image by image
    monkeypatch.setattr(data, "decode_images", lambda d, dev: [im.to("meta") for im in decode_images(d)])
    with pytest.warns(RuntimeWarning, match="no nested kernel here"):
        x = tr.decode_batch(datas, torch.Generator().manual_seed(0))
    assert x.device.type == "meta" and x.shape == (6, 3, 12, 12)
    assert data._BATCHED_RESIZE_FAILED and "NotImplementedError" in data._BATCHED_RESIZE_FAILED[0]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)          # not again
        assert tr.decode_batch(datas, torch.Generator().manual_seed(0)).shape == (6, 3, 12, 12)


def test_resize_each_is_the_reference():
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, generator=g)
            for h, w in torch.randint(12, 60, (5, 2), generator=g)]
    crops, flips = augment_params([(im.shape[2], im.shape[1]) for im in imgs], g)
    assert torch.allclose(resize_each(imgs, crops, 16, flips), _reference_resize(imgs, crops, 16, flips))
    assert torch.allclose(resize_each(imgs, None, 16), _reference_resize(imgs, None, 16))


# -- keyed augmentation: a sample's crop depends on (epoch key, index) alone -----------------------

def test_keyed_uniforms_are_per_key_streams():
    keys = sample_keys(12345, torch.arange(4000))
    u = keyed_uniforms(keys, 23)
    assert u.shape == (4000, 23) and u.dtype == torch.float64
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005      # uniform
    assert abs(float(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1])) < 0.05         # streams uncorrelated
    assert torch.equal(keyed_uniforms(keys[[7, 3]], 23), u[[7, 3]])           # a row depends on its key alone
    assert len(set(keys.tolist())) == 4000                                     # distinct samples, distinct keys
    assert not np.array_equal(sample_keys(12346, torch.arange(4000)), keys)    # another epoch, other crops


def test_keyed_crops_agree_between_pil_and_device_and_ignore_the_batch(folder):
    tr = build_data(f"folder:{folder}", image_size=24).train
    idx = torch.arange(len(tr))
    datas = [tr.read_bytes(i) for i in range(len(tr))]
    dev = tr.decode_batch(datas, idx=idx, epoch_key=99)
    pil = tr.get_batch(idx, epoch_key=99)
    assert (dev - pil).abs().mean() < 0.01                                     # same crops and flips
    sub = [9, 2, 30, 17]                                                       # another batch, another order
    part = tr.decode_batch([datas[i] for i in sub], idx=torch.tensor(sub), epoch_key=99)
    assert (part - dev[sub]).abs().max() <= 1 / 255 + 1e-6                     # same image (to resampling rounding)
    assert torch.equal(tr.load(17, epoch_key=99), pil[17])                      # one sample alone: the same
    assert not torch.equal(tr.get_batch(idx, epoch_key=100), pil)               # the epoch key matters
    u8 = tr.get_batch(idx[:4], epoch_key=99, uint8=True)
    assert u8.dtype == torch.uint8 and torch.equal(u8.float() / 255, pil[:4])


def test_mixed_batches_split_each_batch_and_reassemble_in_order(folder):
    from effdstl_cli.data import MixedView, collate_mixed, decode_mixed, mixed_batches
    tr = build_data(f"folder:{folder}", image_size=24).train
    batches = [[5, 1, 9, 3, 7, 30, 12], [2, 8, 0]]
    items = mixed_batches(batches, 0.5, 99)
    assert [[i for i, _ in it] for it in items] == batches
    flags = {i: c for it in items for i, c in it}
    assert any(flags.values()) and not all(flags.values())                     # both decoders get work
    assert mixed_batches([[12, 2], [30, 5, 0]], 0.5, 99) == [[(i, flags[i]) for i in b] for b in [[12, 2], [30, 5, 0]]]
    many = mixed_batches([list(range(2000))], 0.3, 7)                          # ~ the share asked for
    assert 0.27 < sum(c for _, c in many[0]) / 2000 < 0.33
    view = MixedView(tr, 99)
    for b, it in zip(batches, items):
        got = collate_mixed([view[i] for i in it])
        x, y, idx = decode_mixed(tr, got, "cpu", None, 99)
        assert torch.equal(idx, torch.tensor(b)) and torch.equal(y, tr.labels[b])
        ref = tr.decode_batch([tr.read_bytes(i) for i in b], idx=torch.tensor(b), epoch_key=99)
        assert (x - ref).abs().max() <= 1 / 255 + 1e-6                          # PIL rows == device rows
    none = collate_mixed([view[i] for i in mixed_batches([[4, 6]], 0.0, 99)[0]])
    assert none[0] is None and none[1].numel() == 0                             # share 0: the device path


def _folder_run(folder, tmp_path, name, **env):
    cfg = {"role": "student", "dataset": f"folder:{folder}", "data_root": None, "image_size": 16,
           "model": "mlp:16", "seed": 0, "batch_size": 8, "epochs": 2,
           "stages": [{"epochs": 2, "distiller": {"name": "none"},
                       "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
                       "sched": {"warmup_epochs": 0, "min_lr": 0.0}}],
           "teachers": {}, "meta": {}}
    d = tmp_path / name / config_hash(cfg)
    (rec,) = train_group([(cfg, d)], Env(device="cpu", log=lambda m: None, **env))
    assert rec["status"] == "done", rec
    return [{k: v for k, v in r.items() if k != "epoch_s"} for r in read_jsonl(d / "metrics.jsonl")]


def test_pil_worker_path_does_not_depend_on_the_number_of_workers(folder, tmp_path):
    one = _folder_run(folder, tmp_path, "w1", gpu_decode=False, workers=1)
    three = _folder_run(folder, tmp_path, "w3", gpu_decode=False, workers=3)
    assert len(one) == 2 and one == three


def test_mixed_decoding_trains_reproducibly(folder, tmp_path):
    a = _folder_run(folder, tmp_path, "m1", gpu_decode=True, cpu_share=0.5, workers=2)
    b = _folder_run(folder, tmp_path, "m2", gpu_decode=True, cpu_share=0.5, workers=1)
    assert len(a) == 2 and a == b


def test_resample_survives_tf32_matmuls(monkeypatch):
    """A GPU process with TF32 on rounds fp32 matmul inputs to 10 mantissa bits; the resample
    splits weights and intermediate so the result stays within 1e-2 of a level. Emulated here:
    bmm/baddbmm with their inputs truncated to TF32, as tensor cores may."""
    g = torch.Generator().manual_seed(3)
    imgs = [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, generator=g)
            for h, w in torch.randint(150, 260, (6, 2), generator=g)]
    crops, flips = augment_params([(im.shape[2], im.shape[1]) for im in imgs], g)
    truth = _reference_resize(imgs, crops, 64, flips)
    bmm = torch.bmm

    def tf32(t):
        return (t.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)
    monkeypatch.setattr(torch, "bmm", lambda a, b: bmm(tf32(a).double(), tf32(b).double()).float())
    monkeypatch.setattr(torch, "baddbmm", lambda c, a, b: c + bmm(tf32(a).double(), tf32(b).double()).float())
    plain = resize_windows(imgs, crops, 64, flips, precrop=False, exact=False)  # the CPU's default
    assert (plain - truth).abs().max() > 0.05                                  # the emulation bites
    guarded = resize_windows(imgs, crops, 64, flips, precrop=False, exact=True)  # the GPU's default
    assert (guarded - truth).abs().max() < 0.01
