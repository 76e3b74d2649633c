"""Teacher-output cache: variant ids, cached == recomputed logits, keying/invalidation by the
teacher's weights, engine results with the cache on == off, and on by default only where exact."""

from __future__ import annotations

import pytest
import torch

from effdstl_cli import engine
from effdstl_cli.cache import TeacherCache, cache_key, weights_sha
from effdstl_cli.config import config_hash
from effdstl_cli.data import CROP_FLIP_VARIANTS, TensorSplit
from effdstl_cli.engine import Env, train_group
from effdstl_cli.files import read_jsonl
from effdstl_cli.models import build_model, save_weights


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split(n=96, size=12, augment="crop_flip") -> TensorSplit:
    g = _gen(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return TensorSplit(x, torch.arange(n) % 10, True, augment)


def test_variant_ids_name_the_crop_and_flip_and_draw_nothing_extra():
    split = _split()
    assert split.num_variants == CROP_FLIP_VARIANTS == 162
    idx = torch.randperm(96, generator=_gen(1))[:40]
    x, var = split.get_batch(idx, _gen(7), return_variant=True)
    assert torch.equal(x, split.get_batch(idx, _gen(7)))          # same images with or without ids
    assert var.dtype == torch.long and var.device.type == "cpu" and var.shape == (40,)
    assert int(var.min()) >= 0 and int(var.max()) < 162
    clean = split.get_batch(idx, augment=False)
    padded = torch.nn.functional.pad(clean, (4, 4, 4, 4))
    for k, v in enumerate(var.tolist()):
        flip, ox, oy = v % 2, (v // 2) % 9, v // 18
        want = padded[k, :, oy:oy + 12, ox:ox + 12]
        assert torch.equal(x[k], want.flip(2) if flip else want), (k, v)
    plain = _split(augment="none")
    assert plain.num_variants == 1
    xp, vp = plain.get_batch(idx, _gen(7), return_variant=True)
    assert torch.equal(vp, torch.zeros(40, dtype=torch.long)) and torch.equal(xp, plain.get_batch(idx))
    _, va = split.get_batch(idx, _gen(7), augment=False, return_variant=True)
    assert torch.equal(va, torch.zeros(40, dtype=torch.long))


def test_cached_logits_equal_recomputed_ones():
    split = _split()
    torch.manual_seed(0)
    teacher = build_model("cnn:small", 10, 3, 12).eval()
    cache = TeacherCache("k", len(split), split.num_variants, "cpu")
    calls = []

    def run(x):
        def f(rows):
            calls.append(None if rows is None else len(rows))
            with torch.no_grad():
                return teacher(x if rows is None else x.index_select(0, rows))
        return f

    idx = torch.arange(32)
    x, var = split.get_batch(idx, _gen(3), return_variant=True)
    with torch.no_grad():
        ref = teacher(x)
    first = cache.fetch(idx, var, run(x))
    assert torch.equal(first, ref) and calls == [None]
    again = cache.fetch(idx, var, run(x))                           # all hits: no teacher call
    assert torch.equal(again, ref) and calls == [None]
    # a batch of 32 with 8 stored (sample, variant) pairs: only the 24 misses are computed
    idx2 = torch.cat([idx[:8], torch.arange(40, 64)])
    x2 = torch.cat([x[:8], split.get_batch(torch.arange(40, 64), _gen(4))])
    var2 = torch.cat([var[:8], torch.full((24,), 5)])
    got = cache.fetch(idx2, var2, run(x2), full_above=1.0)
    assert calls[-1] == 24 and len(calls) == 2
    with torch.no_grad():
        recomputed = teacher(x2)
    assert torch.equal(got[:8], ref[:8])                            # hits: the stored rows, bit for bit
    # fp32 on the CPU: a recomputation in another batch agrees to float rounding (here: exactly)
    torch.testing.assert_close(got, recomputed, rtol=1e-5, atol=1e-5)
    assert cache.stats()["hits"] == 32 + 8 and cache.stats()["rows"] == 56
    # logits are kept in the dtype they came in: bf16 rows come back bit-identical
    cb = TeacherCache("b", len(split), split.num_variants, "cpu")
    zb = torch.randn(32, 10).bfloat16()
    cb.put(idx, var, zb)
    hit, back = cb.get(idx, var)
    assert bool(hit.all()) and back.dtype == torch.bfloat16 and torch.equal(back, zb)


def test_cache_size_cap_stops_storing_but_still_serves():
    cache = TeacherCache("k", 100, 1, "cpu", max_bytes=10 * 4 * 10)  # room for 10 rows of 10 fp32
    z = torch.randn(30, 10)
    cache.put(torch.arange(30), torch.zeros(30, dtype=torch.long), z)
    hit, got = cache.get(torch.arange(30), torch.zeros(30, dtype=torch.long))
    assert int(hit.sum()) == 10 and torch.equal(got[:10], z[:10])


# -- through the engine -----------------------------------------------------------------------

def _cfg(teachers, dataset="synthetic", epochs=3, seed=0):
    st = {"epochs": epochs, "distiller": {"name": "kd", "teacher": "weak", "tau": 2.0, "lam": 0.7},
          "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False},
          "sched": {"warmup_epochs": 0, "min_lr": 0.0}}
    return {"role": "student", "dataset": dataset, "data_root": None, "image_size": None, "model": "mlp:32",
            "seed": seed, "batch_size": 64, "epochs": epochs, "stages": [st], "teachers": teachers,
            "meta": {}}


def _run(cfg, root, **env):
    d = root / config_hash(cfg)
    (rec,) = train_group([(cfg, d)], Env(device="cpu", log=lambda m: None, **env))
    assert rec["status"] == "done", rec
    return [{k: v for k, v in r.items() if k != "epoch_s"} for r in read_jsonl(d / "metrics.jsonl")], \
        torch.load(d / "model.pt", weights_only=True)["model"], dict(engine.last_cache_stats)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("t")
    torch.manual_seed(5)
    net = build_model("mlp:64", 10, 1, 8)
    save_weights(net, root / "weak.pt")
    return root / "weak.pt"


def test_engine_with_cache_equals_without(teacher_ckpt, tmp_path):
    cfg = _cfg({"weak": {"model": "mlp:64", "ckpt": str(teacher_ckpt)}})
    h_off, w_off, st_off = _run(cfg, tmp_path / "off", teacher_cache=False)
    h_on, w_on, st_on = _run(cfg, tmp_path / "on")               # default: on (synthetic has no aug)
    # epochs 2 and 3 hit all but the few samples an epoch's 31 full batches left out before
    assert st_off == {} and 0.6 < st_on["weak"]["hit_rate"] <= 2 / 3
    # fp32 logits stored as computed, full batches of 64 both ways: equal (we allow float rounding)
    for a, b in zip(h_off, h_on):
        assert a.keys() == b.keys()
        for k in ("train_loss", "test_loss", "train_top1", "test_top1"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), k
    for k, v in w_off.items():
        torch.testing.assert_close(w_on[k], v, rtol=1e-5, atol=1e-6)


def test_persistent_cache_is_keyed_by_the_teacher_weights(teacher_ckpt, tmp_path):
    cdir = tmp_path / "cache"
    ck = tmp_path / "weak.pt"
    ck.write_bytes(teacher_ckpt.read_bytes())
    cfg = _cfg({"weak": {"model": "mlp:64", "ckpt": str(ck)}}, epochs=2)
    _run(cfg, tmp_path / "r1", teacher_cache_dir=str(cdir))
    files = sorted(cdir.glob("teacher-*.pt"))
    assert len(files) == 1
    _, _, st = _run(cfg, tmp_path / "r2", teacher_cache_dir=str(cdir))
    assert st["weak"]["hit_rate"] == 1.0                          # a new process-level run: all hits
    # the teacher changes (retrained): a new key, nothing stale is served
    net = build_model("mlp:64", 10, 1, 8, ckpt=str(ck))
    with torch.no_grad():
        net.body.fc.weight.mul_(1.5)
    save_weights(net, ck)
    h_new, _, st = _run(cfg, tmp_path / "r3", teacher_cache_dir=str(cdir))
    assert st["weak"]["hit_rate"] < 0.5 and len(list(cdir.glob("teacher-*.pt"))) == 2
    h_ref, _, _ = _run(cfg, tmp_path / "r4", teacher_cache=False)
    assert [r["train_loss"] for r in h_new] == pytest.approx([r["train_loss"] for r in h_ref], rel=1e-6)
    # keys: the weights' sha, not the file name
    assert weights_sha(net) != weights_sha(build_model("mlp:64", 10, 1, 8, ckpt=str(teacher_ckpt)))
    assert cache_key("a", "m", "d", None, 1, "fp32") != cache_key("b", "m", "d", None, 1, "fp32")


def test_cache_on_by_default_only_where_exact(teacher_ckpt, tmp_path):
    from PIL import Image
    import numpy as np

    # crop+flip (finite set): on; an ImageFolder (RandomResizedCrop): never, even when asked
    z = np.random.default_rng(0).integers(0, 256, (64 + 8, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", x_train=z[:64], y_train=np.arange(64) % 10, x_test=z[64:], y_test=np.arange(8) % 10)
    cfg = _cfg({"weak": {"model": "mlp:64", "ckpt": str(teacher_ckpt)}}, dataset=f"npz:{tmp_path / 'g.npz'}", epochs=1)
    assert "weak" in _run(cfg, tmp_path / "npz")[2]
    for split, n in (("train", 64), ("val", 8)):
        for i in range(n):
            d = tmp_path / "f" / split / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(z[i], 3, axis=2)).save(d / f"{i}.jpg")
    t3 = tmp_path / "t3.pt"
    torch.manual_seed(0)
    save_weights(build_model("mlp:16", 10, 3, 8), t3)
    cfg = _cfg({"weak": {"model": "mlp:16", "ckpt": str(t3)}}, dataset=f"folder:{tmp_path / 'f'}", epochs=1)
    cfg["image_size"] = 8
    cfg["model"] = "mlp:8"
    assert _run(cfg, tmp_path / "folder", teacher_cache=True, workers=0)[2] == {}


def test_weights_sha_handles_batchnorm_counters_and_changes_with_weights():
    """BatchNorm's 0-dim num_batches_tracked once broke the hash (a 0-dim int64 cannot be viewed
    as bytes); a teacher with BN must hash, and any weight change must change the hash."""
    from effdstl_cli.cache import weights_sha
    from effdstl_cli.models import build_model

    torch.manual_seed(0)
    net = build_model("cnn:small", 10, 3, 32)
    before = weights_sha(net)
    assert before == weights_sha(net)
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)
    assert weights_sha(net) != before
