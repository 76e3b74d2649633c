"""The GPU paths, where a CUDA GPU is visible (skipped elsewhere, so in CI here): the device
decode + batched resample against the CPU's, the engine on folder data through nvJPEG, and the
teacher cache under bf16 autocast. On a GPU node: ``pytest tests/test_gpu.py``, then
``effdstl bench --device cuda --profile prof/`` for the rates (docs/PERFORMANCE.md)."""

from __future__ import annotations

import pytest
import torch

from effdstl_cli.bench import make_jpegs
from effdstl_cli.config import config_hash
from effdstl_cli.data import augment_params, build_data, decode_images, resize_each, resize_windows
from effdstl_cli.engine import Env, train_group
from effdstl_cli.files import read_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """An ImageFolder of 64 + 16 ImageNet-sized JPEGs (400-500 x 333-400, quality 90) in 4 classes."""
    root = tmp_path_factory.mktemp("jpegs")
    make_jpegs(root, 64, 16, 0, 4, None, 4)
    return root


def _cfg(dataset, model, epochs, teachers=None, dist=None, image_size=None, batch=32):
    st = {"epochs": epochs, "distiller": dist or {"name": "none"},
          "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False},
          "sched": {"warmup_epochs": 0, "min_lr": 0.0}}
    return {"role": "student", "dataset": dataset, "data_root": None, "image_size": image_size, "model": model,
            "seed": 0, "batch_size": batch, "epochs": epochs, "stages": [st], "teachers": teachers or {}, "meta": {}}


@pytest.fixture(params=[True, False], ids=["tf32", "fp32"])
def tf32(request):
    """fp32 matmuls with TF32 on (as the engine sets it) and off."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = old


def test_batched_resample_on_the_gpu_equals_the_cpu(jpegs, tf32, monkeypatch):
    import effdstl_cli.data.resample as data
    tr = build_data(f"folder:{jpegs}", image_size=224).train
    imgs = decode_images([tr.read_bytes(i) for i in range(48)], "cpu")  # the same pixels on both sides
    gimgs = [im.cuda() for im in imgs]
    crops, flips = augment_params([(im.shape[2], im.shape[1]) for im in imgs], torch.Generator().manual_seed(0))
    cpu = resize_windows(imgs, crops, 224, flips)
    for precrop in (False, True):  # whole images (the GPU default) and cut windows
        gpu = resize_windows(gimgs, crops, 224, flips, precrop=precrop)
        assert gpu.is_cuda and gpu.shape == (48, 3, 224, 224)
        assert (gpu.cpu() - cpu).abs().max() < 0.02  # levels of 0..255, TF32 or not
    assert (resize_windows(gimgs, None, 224).cpu() - resize_windows(imgs, None, 224)).abs().max() < 0.02
    ref = resize_each(gimgs, crops, 224, flips)
    assert (resize_windows(gimgs, crops, 224, flips) - ref).abs().max() < 0.05
    monkeypatch.setattr(data, "RESIZE_CHUNK_PX", 8 * 500 * 500)  # several chunks, sorted, reassembled
    assert (resize_windows(gimgs, crops, 224, flips).cpu() - cpu).abs().max() < 0.02


def test_decode_batch_on_the_gpu(jpegs):
    d = build_data(f"folder:{jpegs}", image_size=224)
    tr = d.train
    datas = [tr.read_bytes(i) for i in range(32)]
    x = tr.decode_batch(datas, torch.Generator().manual_seed(0), "cuda")
    assert x.is_cuda and x.shape == (32, 3, 224, 224) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x, tr.decode_batch(datas, torch.Generator().manual_seed(0), "cuda"))  # deterministic
    cpu = tr.decode_batch(datas, torch.Generator().manual_seed(0), "cpu")
    # nvJPEG and libjpeg differ in IDCT and chroma upsampling (~3 levels), not in the crops
    assert (x.cpu() - cpu).abs().mean() < 0.02
    pil = tr.get_batch(torch.arange(32), torch.Generator().manual_seed(0))
    assert (x.cpu() - pil).abs().mean() < 0.02
    e = d.test.decode_batch([d.test.read_bytes(i) for i in range(16)], None, "cuda")
    assert e.shape == (16, 3, 224, 224)


def test_engine_trains_folder_data_through_nvjpeg_reproducibly(jpegs, tmp_path):
    c = _cfg(f"folder:{jpegs}", "tv:resnet18", 2, image_size=64)
    rows = []
    for r in ("a", "b"):
        d = tmp_path / r / config_hash(c)
        (rec,) = train_group([(c, d)], Env(device="cuda", workers=4, log=lambda m: None))
        assert rec["status"] == "done", rec
        rows.append([{k: v for k, v in x.items() if k != "epoch_s"} for x in read_jsonl(d / "metrics.jsonl")])
    assert len(rows[0]) == 2 and rows[0] == rows[1]


def test_mixed_decoding_on_the_gpu(jpegs, tmp_path):
    from effdstl_cli.data import MixedView, collate_mixed, decode_mixed, mixed_batches
    tr = build_data(f"folder:{jpegs}", image_size=224).train
    b = list(range(32))
    (items,) = mixed_batches([b], 0.5, 7)
    x, y, idx = decode_mixed(tr, collate_mixed([MixedView(tr, 7)[it] for it in items]), "cuda", None, 7)
    ref = tr.decode_batch([tr.read_bytes(i) for i in b], None, "cuda", None, torch.tensor(b), 7)
    assert x.is_cuda and torch.equal(idx, torch.tensor(b)) and (x - ref).abs().mean() < 0.02
    c = _cfg(f"folder:{jpegs}", "tv:resnet18", 2, image_size=64)
    rows = []
    for r in ("a", "b"):
        d = tmp_path / r / config_hash(c)
        (rec,) = train_group([(c, d)], Env(device="cuda", workers=4, cpu_share=0.5, log=lambda m: None))
        assert rec["status"] == "done", rec
        rows.append([{k: v for k, v in x.items() if k != "epoch_s"} for x in read_jsonl(d / "metrics.jsonl")])
    assert rows[0] == rows[1]


def test_teacher_cache_under_bf16_autocast(tmp_path):
    from effdstl_cli.cache import TeacherCache
    from effdstl_cli.models import build_model, save_weights

    torch.manual_seed(0)
    save_weights(build_model("mlp:64", 10, 1, 8), tmp_path / "t.pt")
    c = _cfg("synthetic", "mlp:32", 3, {"weak": {"model": "mlp:64", "ckpt": str(tmp_path / "t.pt")}},
             {"name": "kd", "teacher": "weak", "tau": 2.0, "lam": 0.7}, batch=64)
    losses = {}
    for on in (False, True):
        d = tmp_path / str(on) / config_hash(c)
        (rec,) = train_group([(c, d)], Env(device="cuda", teacher_cache=on, log=lambda m: None))
        assert rec["status"] == "done", rec
        losses[on] = [x["train_loss"] for x in read_jsonl(d / "metrics.jsonl")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    tc = TeacherCache("k", 100, 162, "cuda")
    z = torch.randn(32, 10, device="cuda").bfloat16()
    idx, var = torch.arange(32), torch.randint(0, 162, (32,))
    tc.put(idx, var, z)
    hit, back = tc.get(idx, var)
    assert bool(hit.all()) and torch.equal(back, z)                  # bf16 rows kept bit for bit


# -- fused student groups on the GPU (fused.py) -------------------------------------------------

def test_fused_step_on_the_gpu_equals_the_loop():
    """Grouped cuDNN convolutions, BatchNorm over K*C and baddbmm give the students' own logits and
    gradients (fp32, TF32 off: the comparison is of the algorithms, not of TF32's rounding)."""
    import torch.nn.functional as F

    from effdstl_cli.fused import fuse
    from effdstl_cli.models import build_model

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ms = []
        for i in range(5):
            torch.manual_seed(0)
            m = build_model("resnet20", 10, image_size=32).cuda().train()
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.05 * (i + 1) * torch.randn_like(p))
            ms.append(m)
        x = torch.rand(64, 3, 32, 32, device="cuda")
        y = torch.randint(0, 10, (64,), device="cuda")
        fz = fuse(ms, x[:2]).train()
        z = fz(x)
        sum(F.cross_entropy(z[i], y) for i in range(5)).backward()
        for i, m in enumerate(ms):
            zi = m(x)
            F.cross_entropy(zi, y).backward()
            assert (z[i] - zi).abs().max() <= 1e-4 * zi.abs().max()
        for j, p in enumerate(fz.parameters()):
            g = torch.cat([list(m.parameters())[j].grad for m in ms])
            assert (p.grad - g).abs().max() <= 1e-3 * g.abs().max() + 1e-7
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_engine_fuses_on_the_gpu_and_matches_the_loop(tmp_path):
    """A group of 4 CIFAR ResNets through the engine (bf16 autocast, channels_last): fused by
    default on CUDA, every run done, accuracies within the rounding drift of the loop."""
    cfgs = [_cfg("synthetic", "resnet8", 2, dist={"name": "none", "ls": ls}, batch=64) for ls in (0.0, 0.05, 0.1, 0.2)]
    logs: list = []
    fused = train_group([(c, tmp_path / "f" / config_hash(c)) for c in cfgs], Env(device="cuda", log=logs.append))
    assert any("4 students of resnet8 fused" in m for m in logs), logs
    loop = train_group([(c, tmp_path / "l" / config_hash(c)) for c in cfgs], Env(device="cuda", fuse="off", log=print))
    for a, b in zip(fused, loop):
        assert a["status"] == b["status"] == "done"
        assert abs(a["last_top1"] - b["last_top1"]) <= 3.0, (a, b)
