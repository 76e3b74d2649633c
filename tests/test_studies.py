"""The study expanders against the paper (docs/METHOD.md), the FGSM attack and the probe's sample
selection, the step schedule, and the dry run's science."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effdstl_cli.attack import _manipulated, fgsm, select_probe_samples
from effdstl_cli.config import load_study
from effdstl_cli.engine import lr_at
from effdstl_cli.errors import EffdstlError
from effdstl_cli.studies import describe_run, plan, probe_targets

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "studies"


def _plan(name: str, tmp_path, sets=None):
    return plan(load_study(STUDIES / f"{name}.yaml", sets), tmp_path)


def _students(p):
    return [(c, d, j) for j in p.jobs if j.work == "train" for c, d in j.runs if c["role"] == "student"]


def _teacher_models(c, stage):
    role = stage["distiller"].get("teacher")
    return c["teachers"][role]["model"] if role else None


# -- Table 1 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["table1-imagenet", "table1-digits", "table1-cifar10"])
def test_table1_baselines_switch_teacher_for_the_last_stage(name, tmp_path):
    """Sec. 6.1: KD, RKD and WSL change to the stronger teacher for the last stage, same loss;
    no distillation is one run over all the epochs; EffDstl is WSL then CKM."""
    p = _plan(name, tmp_path)
    runs = _students(p)
    assert runs
    by_group: dict[str, dict[str, dict]] = {}
    for c, _, j in runs:
        by_group.setdefault(j.name, {})[c["meta"]["label"]] = c
    for group, cfgs in by_group.items():
        assert set(cfgs) == {"EffDstl", "no distill", "KD", "RKD", "WSL"}, group
        eff = cfgs["EffDstl"]
        s1, s2 = eff["stages"]
        t1, t2 = _teacher_models(eff, s1), _teacher_models(eff, s2)
        assert t1 != t2, "EffDstl's stage 2 uses the stronger teacher"
        assert (s1["distiller"]["name"], s2["distiller"]["name"]) == ("wsl", "ckm")
        for lab in ("KD", "RKD", "WSL"):
            c = cfgs[lab]
            assert len(c["stages"]) == 2, f"{lab} must be two stages"
            b1, b2 = c["stages"]
            assert (b1["epochs"], b2["epochs"]) == (s1["epochs"], s2["epochs"])
            # Table 1's WSL is WSL as released (docs/METHOD.md 'Losses'), not EffDstl's stage-1 variant
            assert b1["distiller"]["name"] == b2["distiller"]["name"] == {"WSL": "wsl_released"}.get(lab, lab.lower())
            assert _teacher_models(c, b1) == t1 and _teacher_models(c, b2) == t2, f"{lab} must switch teacher"
            assert {k: v for k, v in b1["distiller"].items() if k != "teacher"} == \
                   {k: v for k, v in b2["distiller"].items() if k != "teacher"}, f"{lab}: same loss in both stages"
            assert b2["optim"] == s2["optim"] and b2["sched"] == s2["sched"], "stage 2 schedule as EffDstl's"
        nd = cfgs["no distill"]
        assert len(nd["stages"]) == 1 and nd["stages"][0]["distiller"] == {"name": "none"}
        assert nd["epochs"] == eff["epochs"] == s1["epochs"] + s2["epochs"]


def test_table1_imagenet_pairs_and_settings(tmp_path):
    p = _plan("table1-imagenet", tmp_path)
    runs = _students(p)
    eff = {(c["meta"]["pair"], c["meta"]["setting"]): c for c, _, _ in runs if c["meta"]["label"] == "EffDstl"}
    assert set(eff) == {(pr, st) for pr in ("ResNet34->ResNet18", "ResNet50->MobileNetV1")
                        for st in ("advanced", "100ep-step")}
    mb = eff[("ResNet50->MobileNetV1", "advanced")]
    assert mb["model"] == "timm:mobilenetv1_100"
    assert mb["teachers"]["weak"]["model"] == "tv:resnet50.IMAGENET1K_V1"
    assert mb["teachers"]["strong"]["model"] == "timm:resnet50.ram_in1k"
    adv, step = eff[("ResNet34->ResNet18", "advanced")], eff[("ResNet34->ResNet18", "100ep-step")]
    assert [s["epochs"] for s in adv["stages"]] == [240, 60]
    assert "kind" not in adv["stages"][0]["sched"]  # cosine: the default adds no key
    assert adv["stages"][0]["optim"]["lr"] == 0.5 and adv["stages"][1]["optim"]["lr"] == 0.05
    assert adv["stages"][1]["distiller"] == {"name": "ckm", "teacher": "strong", "tau_t": 0.7, "tau_s": 1.0,
                                             "smooth": 0.99, "subset": "reg_cor"}
    assert step["epochs"] == 100 and step["stages"][0]["sched"]["kind"] == "step"
    nd = next(c for c, _, _ in runs if c["meta"]["label"] == "no distill" and c["meta"]["setting"] == "100ep-step")
    assert nd["epochs"] == 100 and nd["stages"][0]["sched"]["milestones"] == [30.0, 60.0, 90.0]
    assert len({j.name for _, _, j in runs}) == 4  # one group per pair x setting (one seed)


def test_step_schedule_lr():
    st = {"epochs": 100, "optim": {"lr": 0.4}, "sched": {"kind": "step", "milestones": [30, 60, 90], "gamma": 0.1,
                                                          "min_lr": 0.0, "warmup_epochs": 0}}
    assert lr_at(st, 0.0) == pytest.approx(0.4)
    assert lr_at(st, 29.99) == pytest.approx(0.4)
    assert lr_at(st, 30.0) == pytest.approx(0.04)
    assert lr_at(st, 75.0) == pytest.approx(0.004)
    assert lr_at(st, 95.0) == pytest.approx(0.0004)
    cos = {"epochs": 10, "optim": {"lr": 1.0}, "sched": {"min_lr": 0.0, "warmup_epochs": 0}}
    assert lr_at(cos, 5.0) == pytest.approx(0.5)  # cosine stays the default


@pytest.mark.parametrize("sched, msg", [
    ({"kind": "linear"}, "unknown schedule kind"),
    ({"milestones": [30]}, "milestones and gamma need kind: step"),
    ({"kind": "step", "milestones": [60, 30]}, "ascending list"),
    ({"kind": "step", "gamma": 1.5}, r"gamma must be a number in \(0, 1\]"),
])
def test_step_schedule_validation(sched, msg, tmp_path):
    with pytest.raises(EffdstlError, match=msg):
        load_study(STUDIES / "figure5-digits.yaml", [f"schedule={sched}"])


# -- Table 4, Fig. 8 ---------------------------------------------------------------------------------

def test_ablation_expander_parts(tmp_path):
    """Table 4 as the paper prints it: (a) four teacher pairs for MobileNet V3-Small, (c) the
    switch, (d) tau, (e) CKM, with the paper's students (docs/METHOD.md 'Table 4')."""
    p = _plan("table4-imagenet", tmp_path)
    runs = {c["meta"]["label"]: c for c, _, _ in _students(p)}
    full = runs["(c) switch, ResNet18"]
    assert full["model"] == "tv:resnet18"
    assert full["stages"][1]["distiller"]["tau_t"] == 0.7 and full["stages"][1]["distiller"]["subset"] == "reg_cor"
    assert runs["(d) tau 0.8, ResNet18"]["stages"][1]["distiller"]["tau_t"] == 0.8
    assert runs["(d) tau 1.0, MobileNet V1"]["stages"][1]["distiller"]["tau_t"] == 1.0
    assert runs["(e) CKM off, ResNet34d"]["stages"][1]["distiller"]["subset"] is None
    assert runs["(e) CKM on, ResNet34d"]["model"] == "timm:resnet34d"
    ns = runs["(c) no switch, MobileNet V1"]
    assert ns["model"] == "timm:mobilenetv1_100"
    assert _teacher_models(ns, ns["stages"][1]) == _teacher_models(ns, ns["stages"][0]) == "tv:resnet50.IMAGENET1K_V1"
    sw = runs["(c) switch, MobileNet V1"]
    assert _teacher_models(sw, sw["stages"][1]) == "timm:resnet50.ram_in1k"
    assert _teacher_models(full, full["stages"][1]) == "timm:resnet34d"
    parts = {lab: c["meta"]["part"] for lab, c in runs.items()}
    assert all(parts[lab] == lab[1] for lab in parts)          # the paper's letters
    pairs = {lab: c for lab, c in runs.items() if c["meta"]["part"] == "a"}
    assert {c["model"] for c in pairs.values()} == {"timm:tf_mobilenetv3_small_075"}
    assert {(_teacher_models(c, c["stages"][0]), _teacher_models(c, c["stages"][1])) for c in pairs.values()} == \
           {(a, b) for a in ("tv:resnet34", "timm:mobilenetv2_100")
            for b in ("timm:resnet34d", "timm:tf_mobilenetv3_large_100")}


def test_fig8_expander(tmp_path):
    p = _plan("figure8-digits", tmp_path)
    runs = _students(p)
    assert len(runs) == 2 * 3  # two variants x three seeds
    subsets = {c["meta"]["label"]: c["stages"][1]["distiller"]["subset"] for c, _, _ in runs}
    assert subsets == {"keep incorrect (reg_cor)": "reg_cor", "manipulate incorrect (reg)": "reg"}
    for c, _, _ in runs:
        s1, s2 = c["stages"]
        assert (s1["distiller"]["name"], s2["distiller"]["name"]) == ("wsl", "ckm")
        assert _teacher_models(c, s1) != _teacher_models(c, s2)


# -- Fig. 7 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["figure7-digits", "figure7-cifar10", "figure7-imagenet"])
def test_fgsm_expander_manipulates_with_label_smoothing_on_reg_cor(name, tmp_path):
    p = _plan(name, tmp_path)
    runs = _students(p)
    dist = [c for c, _, _ in runs if c["meta"]["label"] == "distilled"]
    assert len(dist) == len(p.study["seeds"])
    d = dist[0]["stages"][-1]["distiller"]
    assert (d["name"], d["kind"], d["subset"]) == ("manipulate", "label_smoothing", "reg_cor")
    tg = probe_targets(p)
    assert len(tg) == len(dist) and all(t["subset"] == "reg_cor" and t["teacher"] == "weak" for t in tg)
    und = p.study["probe"]["undistilled"]
    if isinstance(und, dict):  # hub weights (ImageNet): no training run, the probe loads them
        assert all(t["undistilled_hub"]["model"] == und["model"] for t in tg)
    else:  # its own model spec, trained on labels in the study
        u = [c for c, _, _ in runs if c["meta"]["label"] == "undistilled"]
        assert [c["model"] for c in u] == [und] * len(dist)
        assert u[0]["stages"][0]["distiller"] == {"name": "none"} and u[0]["teachers"] == {}
        assert all(t["undistilled"] is not None for t in tg)


def test_select_probe_samples_counts_membership_and_seed():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(5000, generator=g) < 0.3
    chosen, pools = select_probe_samples(mask, 1000, seed=7)
    assert pools == {"manipulated": int(mask.sum()), "kept": int((~mask).sum())}
    assert len(chosen["manipulated"]) == 1000 and len(chosen["kept"]) == 1000
    assert mask[chosen["manipulated"]].all(), "manipulated samples must come from the manipulated subset"
    assert not mask[chosen["kept"]].any(), "kept samples must come from outside it"
    assert len(set(chosen["manipulated"].tolist())) == 1000  # without replacement
    again, _ = select_probe_samples(mask, 1000, seed=7)
    other, _ = select_probe_samples(mask, 1000, seed=8)
    assert torch.equal(again["kept"], chosen["kept"]) and torch.equal(again["manipulated"], chosen["manipulated"])
    assert not torch.equal(other["manipulated"], chosen["manipulated"])
    # random, not the first 1000 of the pool
    assert chosen["manipulated"].tolist() != torch.arange(5000)[mask][:1000].tolist()
    small, pools = select_probe_samples(mask[:100], 1000, seed=0)  # fewer exist than asked: all of them
    assert len(small["manipulated"]) == pools["manipulated"] == int(mask[:100].sum())


def test_probe_reads_the_runs_own_subset_record(tmp_path):
    """manipulated = altered in at least one epoch by the run (its subset.pt), not a guess."""
    hits = torch.tensor([0, 3, 0, 1, 0, 0, 2, 0])
    torch.save({"hits": hits, "epochs": torch.tensor(5)}, tmp_path / "subset.pt")
    mask, how = _manipulated({"run": str(tmp_path)}, None, None, None, None, None, "cpu")
    assert mask.tolist() == [False, True, False, True, False, False, True, False]
    assert "at least one epoch" in how


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, -1.0, 0.5], [-2.0, 1.0, 0.0]]))

    def forward(self, x):
        return x @ self.w.t()


def test_fgsm_steps_along_the_gradient_sign_and_clips():
    net = _Lin()
    x = torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 0.99]])
    y = torch.tensor([0, 1])
    eps = 0.1
    x_ = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(x_), y), x_)
    adv = fgsm(net, x, y, eps)
    assert torch.allclose(adv, (x + eps * g.sign()).clamp(0, 1))
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= eps + 1e-7
    assert not x.requires_grad and not adv.requires_grad
    # the attack raises the loss (lowers the true-class confidence) of the model it used
    p0 = F.softmax(net(x), 1).gather(1, y[:, None])
    p1 = F.softmax(net(adv), 1).gather(1, y[:, None])
    assert (p1 < p0).all()


# -- the dry run ---------------------------------------------------------------------------------------

def test_describe_run_shows_every_loss_hyperparameter(tmp_path):
    p = _plan("table1-imagenet", tmp_path)
    runs = {c["meta"]["label"]: c for c, _, _ in _students(p) if c["meta"]["setting"] == "advanced"
            and c["meta"]["pair"] == "ResNet34->ResNet18"}
    eff = describe_run(runs["EffDstl"])
    for s in ("240 ep wsl[T 2, ls 0.1, w_ce 1, w_wsl 0.5; teacher weak=tv:resnet34]",
              "60 ep ckm[tau_t 0.7, tau_s 1, smooth 0.99, subset reg_cor; teacher strong=timm:resnet34d]"):
        assert s in eff
    kd = describe_run(runs["KD"])
    assert "kd[tau 1, lam 0.9; teacher weak=tv:resnet34]" in kd and "teacher strong=timm:resnet34d" in kd
    step = next(c for c, _, _ in _students(p) if c["meta"]["setting"] == "100ep-step")
    assert "step x0.1 at 30,60" in describe_run(step)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "effdstl_cli.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_dry_run_verbose_lists_every_run(tmp_path):
    r = _cli("train", "recipe", "--study", "studies/table1-imagenet.yaml", "--dry-run", "--verbose",
             "--results", str(tmp_path))
    assert r.returncode == 0, r.stderr
    runs = [ln for ln in r.stdout.splitlines() if ln.startswith("      ") and "fuse --" not in ln]
    assert len(runs) == 20 and not any("more runs" in ln for ln in runs)
    assert sum("| 60 ep kd[" in ln for ln in runs) == 2 and sum("| 20 ep rkd[" in ln for ln in runs) == 2
    short = _cli("train", "recipe", "--study", "studies/table1-imagenet.yaml", "--dry-run", "--results", str(tmp_path))
    assert "... and 2 more runs (--verbose lists every run)" in short.stdout


def test_cli_table_refuses_a_sweep_in_one_line(tmp_path):
    r = _cli("table", "table1", "figure6-digits", "--results", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "table1 shows recipe studies" in lines[0] and "manipulation" in lines[0]


# -- augmentation by role ----------------------------------------------------------------------------

def test_augment_by_role_keeps_teacher_hashes_and_reaches_the_students_data(tmp_path):
    """``augment: {teacher: true, student: false}``: teachers plan exactly as without the key (their
    hashes, hence finished runs, are kept), students' configs say ``augment: false`` (a new hash),
    and the data a student run builds has no augmentation while a teacher's keeps crop + flip."""
    import numpy as np

    from effdstl_cli.config import config_hash
    from effdstl_cli.data import data_for

    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), y_train=np.arange(40) % 4,
             x_test=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), y_test=np.arange(8) % 4)
    sets = [f"dataset=npz:{npz}", "seeds=[0]"]
    base = _plan("figure5-digits", tmp_path / "a", sets)
    split = _plan("figure5-digits", tmp_path / "b", sets + ["augment={teacher: true, student: false}"])
    roles = lambda p: {r: [c for j in p.jobs for c, _ in j.runs if c["role"] == r] for r in ("teacher", "student")}
    b, s = roles(base), roles(split)
    assert [config_hash(c) for c in b["teacher"]] == [config_hash(c) for c in s["teacher"]]
    assert all("augment" not in c for c in b["teacher"] + b["student"] + s["teacher"])
    assert s["student"] and all(c["augment"] is False for c in s["student"])
    assert not {config_hash(c) for c in b["student"]} & {config_hash(c) for c in s["student"]}
    assert data_for(s["teacher"][0]).train.augment == "crop_flip"
    assert data_for(s["student"][0]).train.augment == "none"
    everyone = _plan("figure5-digits", tmp_path / "c", sets + ["augment=false"])
    assert all(c["augment"] is False for j in everyone.jobs for c, _ in j.runs)


@pytest.mark.parametrize("value, msg", [("3", "augment must be true or false"),
                                        ("{students: false}", "unknown key of augment .*'students'"),
                                        ("{student: maybe}", "augment.student must be true or false")])
def test_augment_bad_values_are_one_line(value, msg, tmp_path):
    with pytest.raises(EffdstlError, match=msg):
        _plan("figure5-digits", tmp_path, [f"augment={value}"])


def test_cli_no_augment_reaches_single_runs_and_the_dry_run(tmp_path):
    args = ("train", "teacher", "-m", "mlp:8", "--epochs", "1", "--dry-run", "--results", str(tmp_path))
    on, off = _cli(*args), _cli(*args, "--no-augment")
    assert on.returncode == off.returncode == 0, on.stderr + off.stderr
    run = lambda r: next(ln.split()[0] for ln in r.stdout.splitlines() if "mlp:8" in ln and "bs " in ln)
    assert "no-aug" in off.stdout and "no-aug" not in on.stdout
    assert run(on) != run(off)                       # a different run (hash), not a relabelled one
