"""Fused student groups (fused.py, engine.FusedMembers): K students as one horizontally fused model.

Equivalence is tested at two depths:
* one step, exactly: logits, every gradient and BatchNorm's running statistics of K different
  students fused equal the K students stepped one by one, to fp32 rounding (1e-5 relative);
* whole engine runs (a group of 4 distillers, resumed half-way), fused vs loop. Grouped kernels sum
  in another order than the plain ones, so the runs differ by rounding, which SGD then amplifies:
  measured here, a 1e-7 relative perturbation of the *loop's* initial weights moves the training
  loss of cnn:small (plain CE, lr 0.05) by 2.5e-4 after one epoch and 1.6e-3 after two, and test
  accuracy by 1.6 points -- exactly the fused-vs-loop differences of the same runs. At lr 0.01 the
  RKD student (the most sensitive) drifts by 2e-3 relative in test loss. The tolerances below
  (losses 5e-3 relative, accuracy 1.5 points, all weights 1 % in norm) sit above that drift; the exact parts
  (momentum, BN statistics, weights through a checkpoint) are tested exactly above.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effdstl_cli.engine import Env, FusedMembers, fusion_plan, make_optimizer, train_group
from effdstl_cli.fused import NotFusable, fuse, policy
from effdstl_cli.files import read_jsonl
from effdstl_cli.models import build_model

from test_engine import run_cfg, stage, train, weights

SHAPES = {"mlp:32": (1, 8, 8), "cnn:small": (3, 16, 16), "resnet8": (3, 16, 16), "wrn_16_1": (3, 16, 16)}


def students(spec: str, k: int = 3, seed: int = 0) -> list[nn.Module]:
    """K students of one architecture made different (a fused layer that mixed students would
    go unnoticed on identical copies)."""
    c, h, _ = SHAPES[spec]
    out = []
    for i in range(k):
        torch.manual_seed(seed)
        m = build_model(spec, 10, in_chans=c, image_size=h)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * (i + 1) * torch.randn_like(p))
        out.append(m.train())
    return out


@pytest.mark.parametrize("spec", ["mlp:32", "cnn:small", "resnet8", "wrn_16_1"])
def test_one_fused_step_equals_the_students_steps(spec):
    """MLP (no BatchNorm), plain CNN and CIFAR ResNet/WRN (BatchNorm, residuals, shortcuts)."""
    ms = students(spec)
    x = torch.rand(32, *SHAPES[spec])
    y = torch.randint(0, 10, (32,))
    fz = fuse(ms, x[:2], features=True)
    fz.train()
    z, f = fz(x, features=True)
    assert z.shape == (3, 32, 10) and f.shape[:2] == (3, 32)
    sum(F.cross_entropy(z[i], y) * (i + 1) for i in range(3)).backward()  # a different loss per student
    for i, m in enumerate(ms):
        zi, fi = m(x, features=True)
        (F.cross_entropy(zi, y) * (i + 1)).backward()
        assert torch.allclose(z[i], zi, rtol=1e-5, atol=1e-5)
        assert torch.allclose(f[i], fi, rtol=1e-5, atol=1e-5)
    fused_sd = fz.net.state_dict()
    for j, (name, p) in enumerate(ms[0].named_parameters()):
        g = torch.cat([list(m.parameters())[j].grad for m in ms])
        fg = list(fz.parameters())[j].grad
        assert (fg - g).abs().max() <= 1e-5 * g.abs().max() + 1e-9, name  # fp32 rounding of the sums
    for name, t in ms[1].state_dict().items():
        if "running" in name:  # per-student statistics fall out of per-channel ones
            n = t.shape[0]
            assert torch.allclose(fused_sd[name][n:2 * n], t, rtol=1e-5, atol=1e-6), name


def test_state_round_trip_is_exact():
    """Weights, BN statistics and SGD momentum go fused -> per student -> fused unchanged: the
    checkpoints of a fused group are the students' own."""
    ms = students("resnet8")
    x = torch.rand(8, 3, 16, 16)
    fz = fuse(ms, x[:2])
    members = []
    for m in ms:
        mem = type("M", (), {})()
        mem.model, mem.opt = m, make_optimizer(m, stage(1, {"name": "none"}))
        members.append(mem)
    g = FusedMembers(members, fz, ddp=fz, opt=make_optimizer(fz, stage(1, {"name": "none"})))
    fz(x).sum().backward()
    g.opt.step()  # momentum buffers exist now
    g.store()
    for i, m in enumerate(ms):
        for name, t in m.state_dict().items():
            ft = fz.net.state_dict()[name]
            assert torch.equal(t, ft if ft.dim() == 0 else ft[i * t.shape[0]:(i + 1) * t.shape[0]]), name
    fresh = FusedMembers(members, fuse(ms, x[:2]), opt=None)
    fresh.opt = make_optimizer(fresh.net, stage(1, {"name": "none"}))
    fresh.load_optim_state()
    for p, q in zip(fz.parameters(), fresh.net.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(g.opt.state[p]["momentum_buffer"], fresh.opt.state[q]["momentum_buffer"])


class Mixer(nn.Module):
    """Flips the channel order: harmless for one student, mixes students when fused."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 10)

    def forward(self, x, features=False):
        h = self.conv(x).flip(1).mean((2, 3))
        return self.fc(h)


def test_refuses_what_it_cannot_reproduce():
    x = torch.rand(2, 3, 8, 8)
    torch.manual_seed(0)
    with pytest.raises(NotFusable, match="mixes channels"):
        fuse([Mixer(), Mixer()], x)
    drop = [nn.Sequential(nn.Flatten(), nn.Linear(192, 10), nn.Dropout(0.5)) for _ in range(2)]
    with pytest.raises(NotFusable, match="random"):
        fuse(drop, x)
    from torchvision.ops import StochasticDepth  # random, but no Dropout module: caught in train mode

    sd = [nn.Sequential(nn.Conv2d(3, 4, 3), StochasticDepth(0.5, "row"), nn.Flatten(), nn.Linear(144, 10))
          for _ in range(2)]
    with pytest.raises(NotFusable, match="random in training"):
        fuse(sd, x)
    ln = [nn.Sequential(nn.Flatten(), nn.LayerNorm(192), nn.Linear(192, 10)) for _ in range(2)]
    with pytest.raises(NotFusable, match="LayerNorm"):
        fuse(ln, x)
    with pytest.raises(NotFusable, match="architecture|model spec"):
        fuse([build_model("mlp:32", 10, 3, 8), build_model("mlp:16", 10, 3, 8)], x)


def test_policy_follows_the_measurements():
    assert policy("auto", "mlp:32", "cpu")[0] is True
    assert policy("auto", "cnn:small", "cpu")[0] is False          # grouped convs lose on a CPU
    assert policy("auto", "resnet20", "cuda", 32)[0] is True       # launch-bound on a GPU
    assert policy("auto", "tv:resnet18", "cuda", 224)[0] is False  # compute-bound: not measured to win
    assert policy("off", "mlp:32", "cuda")[0] is False and policy("on", "cnn:small", "cpu")[0] is True
    cfgs = [run_cfg("mlp:32", [stage(2, {"name": "none"})]) for _ in range(3)]
    cfgs.append(run_cfg("mlp:32", [stage(2, {"name": "none"}, lr=0.5)]))  # another schedule: its own set
    lines = fusion_plan(cfgs, "cpu", "auto")
    assert lines == ["3 students of mlp:32: fused into one model (auto: MLPs fuse)"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused-teacher")
    cfg = run_cfg("mlp:128", [stage(2, {"name": "none"}, lr=0.1)])
    cfg["role"] = "teacher"
    (pair,), _ = train([cfg], root)
    return {"model": "mlp:128", "ckpt": str(pair[1] / "model.pt")}


@pytest.mark.parametrize("spec", ["mlp:32", "cnn:small", "resnet8"])
def test_fused_group_equals_the_loop_through_a_resume(spec, teacher, tmp_path):
    ds = [{"name": "none"}, {"name": "kd", "teacher": "weak", "tau": 4.0, "lam": 0.9},
          {"name": "replace", "teacher": "weak", "strong": "strong", "scheme": "partial", "subset": "reg"},
          {"name": "rkd", "teacher": "weak"},
          # computed together with the first replacement run (Replace.losses_many)
          {"name": "replace", "teacher": "weak", "strong": "strong", "scheme": "full", "subset": "correct"}]
    cfgs = [run_cfg(spec, [stage(2, d, lr=0.01)], teachers={"weak": teacher, "strong": teacher}, label=d["name"])
            for d in ds]
    logs: list[str] = []
    loop, _ = train(cfgs, tmp_path / "loop", fuse="off")
    _, part = train(cfgs, tmp_path / "fused", fuse="on", stop_after_epochs=1)
    assert [r["status"] for r in part] == ["partial"] * 5
    pairs = [(c, tmp_path / "fused" / d.name) for c, d in loop]
    recs = train_group(pairs, Env(device="cpu", fuse="on", log=logs.append))
    assert any("5 students of" in m and "fused" in m for m in logs), logs
    assert any("resumed from epoch 1" in m for m in logs), logs
    for (c, dl), (_, df), rec in zip(loop, pairs, recs):
        assert rec["status"] == "done"
        hl, hf = read_jsonl(dl / "metrics.jsonl"), read_jsonl(df / "metrics.jsonl")
        assert [r["epoch"] for r in hf] == [1, 2]
        for a, b in zip(hl, hf):
            for key in ("train_loss", "test_loss"):
                assert b[key] == pytest.approx(a[key], rel=5e-3), (c["meta"]["label"], key)
            assert abs(a["test_top1"] - b["test_top1"]) <= 1.5
            assert a["lr"] == pytest.approx(b["lr"]) and a["subset_frac"] == pytest.approx(b["subset_frac"], abs=0.02)
            assert set(a["losses"]) == set(b["losses"])
        wl, wf = weights(dl), weights(df)
        assert set(wl) == set(wf)
        flat = lambda w: torch.cat([w[k].float().flatten() for k in sorted(w)])  # noqa: E731
        assert (flat(wl) - flat(wf)).norm() <= 1e-2 * flat(wl).norm(), c["meta"]["label"]
        fin = json.loads((df / "final.json").read_text())
        assert fin["epochs"] == 2
    # the replacement run recorded its altered samples, as in the loop
    assert (pairs[2][1] / "subset.pt").exists()


def test_stage_switch_after_the_first_student_failed(teacher, tmp_path):
    """The fused optimizer follows the stage switch even when member 0 failed in stage 1 (its own
    stage is no longer updated), and stage 2's metrics name only stage 2's losses."""
    from effdstl_cli.models import save_weights

    net = build_model("mlp:16", 10, in_chans=1, image_size=8)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1e30)  # finite weights (a NaN checkpoint is refused on load) whose logits overflow: inf/NaN targets
    save_weights(net, tmp_path / "nan.pt")
    ts = {"bad": {"model": "mlp:16", "ckpt": str(tmp_path / "nan.pt")}, "weak": teacher}
    two = lambda d1: [stage(1, d1), stage(1, {"name": "none"}, lr=0.02, wd=0.0)]  # noqa: E731
    cfgs = [run_cfg("mlp:32", two({"name": "kd", "teacher": "bad"}), teachers=ts, label="nan"),
            run_cfg("mlp:32", two({"name": "kd", "teacher": "weak"}), teachers=ts, label="ok")]
    loop, _ = train(cfgs, tmp_path / "loop", fuse="off")
    fused, recs = train(cfgs, tmp_path / "fused", fuse="on")
    assert [r["status"] for r in recs] == ["failed", "done"]
    hl, hf = read_jsonl(loop[1][1] / "metrics.jsonl"), read_jsonl(fused[1][1] / "metrics.jsonl")
    assert set(hf[1]["losses"]) == set(hl[1]["losses"]) == {"ce"}
    for a, b in zip(hl, hf):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_a_failing_student_fails_alone_in_a_fused_group(tmp_path):
    """A student whose loss turns non-finite (KD from a teacher with NaN weights) fails; the
    other student of its fused group trains on."""
    from effdstl_cli.models import save_weights

    net = build_model("mlp:16", 10, in_chans=1, image_size=8)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1e30)  # finite weights (a NaN checkpoint is refused on load) whose logits overflow: inf/NaN targets
    save_weights(net, tmp_path / "nan.pt")
    nan_teacher = {"bad": {"model": "mlp:16", "ckpt": str(tmp_path / "nan.pt")}}
    ok = run_cfg("mlp:32", [stage(2, {"name": "none"})], teachers=nan_teacher, label="fine")
    bad = run_cfg("mlp:32", [stage(2, {"name": "kd", "teacher": "bad"})], teachers=nan_teacher, label="nan")
    logs: list[str] = []
    pairs = [(c, tmp_path / str(i)) for i, c in enumerate([ok, bad])]
    recs = train_group(pairs, Env(device="cpu", fuse="on", log=logs.append))
    assert any("2 students of mlp:32 fused" in m for m in logs), logs
    assert recs[0]["status"] == "done" and recs[0]["best_top1"] > 30
    assert recs[1]["status"] == "failed" and "non-finite" in recs[1]["reason"]


def test_cannot_fuse_falls_back_to_the_loop(tmp_path):
    """--fuse on with a model fusion refuses (torchvision's MobileNet V3 has dropout): the loop
    trains it, and the log says why."""
    from effdstl_cli.bench import _write_npz

    _write_npz(tmp_path / "rgb.npz", 128, 32, 16, 10)
    cfgs = [run_cfg("tv:mobilenet_v3_small", [stage(1, {"name": "none"})], batch=64, label=str(i)) for i in range(2)]
    for c in cfgs:
        c["dataset"] = f"npz:{tmp_path / 'rgb.npz'}"
    logs: list[str] = []
    recs = train_group([(c, tmp_path / str(i)) for i, c in enumerate(cfgs)],
                       Env(device="cpu", fuse="on", log=logs.append))
    assert [r["status"] for r in recs] == ["done", "done"]
    assert any("2 students of tv:mobilenet_v3_small stepped in a loop: cannot fuse" in m and "Dropout" in m
               for m in logs), logs
