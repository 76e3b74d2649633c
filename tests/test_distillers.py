"""Distillers (effdstl_cli/distillers.py): validation at build time, and that each one's losses
are the METHOD.md formulas on the right rows from the right teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from effdstl_cli import losses, targets
from effdstl_cli.distillers import REGISTRY, TeacherOut, build_distiller
from effdstl_cli.errors import EffdstlError

PROPS = settings(max_examples=30, deadline=None)


def batch(seed=0, b=32, n=5):
    """Student / weak / strong logits where weak and strong disagree on correctness."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(n, (b,), generator=g)
    onehot = F.one_hot(y, n).float()
    z_w = 2 * torch.randn(b, n, generator=g) + 1.0 * onehot      # weak: right on some rows
    z_p = 2 * torch.randn(b, n, generator=g) + 4.0 * onehot      # strong: right on most rows
    z_s = 2 * torch.randn(b, n, generator=g) + 1.5 * onehot
    f_s, f_w, f_p = (torch.randn(b, d, generator=g) for d in (8, 16, 16))
    t = {"weak": TeacherOut(z_w, f_w), "strong": TeacherOut(z_p, f_p)}
    return z_s, f_s, t, y


def run(spec, z_s, f_s, t, y):
    return build_distiller(spec).losses(z_s, f_s, t, y)


def total(parts):
    return sum(parts.values())


@st.composite
def batches(draw):
    return batch(draw(st.integers(0, 10_000)), draw(st.integers(2, 24)), draw(st.integers(2, 12)))


# ---------------------------------------------------------------------------------------------
# validation when built
# ---------------------------------------------------------------------------------------------

def test_registry_names():
    assert {"none", "kd", "wsl", "ckm", "rkd", "replace", "manipulate"} <= set(REGISTRY)


@pytest.mark.parametrize("bad, near", [("replac", "replace"), ("kdd", "kd"), ("manipulat", "manipulate"),
                                       ("wls", "wsl")])
def test_unknown_distiller_suggests_nearest(bad, near):
    with pytest.raises(EffdstlError, match=f"did you mean '{near}'"):
        build_distiller({"name": bad})


@pytest.mark.parametrize("spec", [{}, {"scheme": "full"}, "kd", None])
def test_distiller_needs_a_name(spec):
    with pytest.raises(EffdstlError):
        build_distiller(spec)


@pytest.mark.parametrize("spec, near", [({"name": "kd", "tua": 2.0}, "tau"),
                                        ({"name": "replace", "shceme": "full"}, "scheme"),
                                        ({"name": "ckm", "tau_tt": 0.7}, "tau_t")])
def test_unknown_parameter(spec, near):
    with pytest.raises(EffdstlError, match=f"did you mean '{near}'"):
        build_distiller(spec)


@pytest.mark.parametrize("spec", [
    {"name": "kd", "tau": 0.0}, {"name": "kd", "tau": -1.0},
    {"name": "replace", "tau": 0.0}, {"name": "manipulate", "kind": "teacher_amp", "delta": 0.1, "tau": -2},
    {"name": "wsl", "T": 0.0}, {"name": "ckm", "tau_t": 0.0}, {"name": "ckm", "tau_s": -1.0},
    {"name": "kd", "lam": 1.5}, {"name": "replace", "lam": -0.1},
    {"name": "ckm", "smooth": 0.0}, {"name": "ckm", "smooth": 1.5},
])
def test_bad_numbers_rejected(spec):
    with pytest.raises(EffdstlError):
        build_distiller(spec)


@pytest.mark.parametrize("t", [None, 0.0, -0.2, 1.01, 3.0])
def test_label_smoothing_t_outside_unit_interval(t):
    with pytest.raises(EffdstlError):
        build_distiller({"name": "manipulate", "kind": "label_smoothing", "t": t})


@pytest.mark.parametrize("kind", ["teacher_amp", "student_amp"])
@pytest.mark.parametrize("delta", [None, -0.01, -1.0])
def test_negative_delta_rejected(kind, delta):
    with pytest.raises(EffdstlError):
        build_distiller({"name": "manipulate", "kind": kind, "delta": delta})


def test_edge_values_accepted():
    build_distiller({"name": "manipulate", "kind": "label_smoothing", "t": 1.0})
    build_distiller({"name": "manipulate", "kind": "teacher_amp", "delta": 0.0})
    build_distiller({"name": "kd", "lam": 0.0})
    build_distiller({"name": "ckm", "subset": None})


@pytest.mark.parametrize("spec, near", [
    ({"name": "replace", "scheme": "confidense"}, "confidence"),
    ({"name": "replace", "scheme": "ful"}, "full"),
    ({"name": "replace", "subset": "reg_corr"}, "reg_cor"),
    ({"name": "manipulate", "subset": "not_corect", "delta": 0.1}, "not_correct"),
    ({"name": "manipulate", "kind": "teacher_ampp", "delta": 0.1}, "teacher_amp"),
    ({"name": "manipulate", "kind": "label_smooth", "t": 0.5}, "label_smoothing"),
    ({"name": "ckm", "subset": "reg_cr"}, "reg_cor"),
])
def test_unknown_choice_names_the_nearest(spec, near):
    with pytest.raises(EffdstlError, match=f"did you mean '{near}'"):
        build_distiller(spec)


def test_teachers_read():
    assert build_distiller({"name": "replace"}).teachers == ("weak", "strong")
    assert build_distiller({"name": "kd", "teacher": "strong"}).teachers == ("strong",)
    assert build_distiller({"name": "ckm"}).teachers == ("strong",)
    assert build_distiller({"name": "none"}).teachers == ()


# ---------------------------------------------------------------------------------------------
# Replace (Fig. 5)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_replace_full_on_all_is_kd_from_strong(tau):
    z_s, f_s, t, y = batch()
    a = z_s.clone().requires_grad_(True)
    rep, mask = run({"name": "replace", "scheme": "full", "subset": "all", "tau": tau}, a, f_s, t, y)
    b = z_s.clone().requires_grad_(True)
    kd, none = run({"name": "kd", "teacher": "strong", "tau": tau}, b, f_s, t, y)
    assert none is None and mask.all()
    assert torch.allclose(total(rep), total(kd), rtol=1e-6)
    assert torch.allclose(total(rep), losses.kd_loss(z_s, t["strong"].logits, tau), rtol=1e-6)
    total(rep).backward()
    total(kd).backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("scheme", targets.SCHEMES)
def test_replace_on_correct_rows_only(scheme):
    z_s, f_s, t, y = batch(1)
    tau = 2.0
    p_w = torch.softmax(t["weak"].logits / tau, 1)
    p_p = torch.softmax(t["strong"].logits / tau, 1)
    weak_correct = t["weak"].logits.argmax(1) == y
    strong_correct = t["strong"].logits.argmax(1) == y
    assert 0 < weak_correct.sum() < len(y) and not torch.equal(weak_correct, strong_correct)
    parts, mask = run({"name": "replace", "scheme": scheme, "subset": "correct", "tau": tau}, z_s, f_s, t, y)
    # the subset is the weak teacher's (the one being altered), not the strong one's
    assert torch.equal(mask, weak_correct)
    q = torch.where(weak_correct.view(-1, 1), targets.replace(scheme, p_w, p_p, y), p_w)
    assert torch.allclose(total(parts), losses.soft_ce(z_s, q, tau), rtol=1e-6)
    # per row: weak target on the incorrect rows exactly
    per_row = -(q * F.log_softmax(z_s / tau, 1)).sum(1)
    weak_rows = -(p_w * F.log_softmax(z_s / tau, 1)).sum(1)
    assert torch.allclose(per_row[~mask], weak_rows[~mask])


@PROPS
@given(batches(), st.sampled_from(list(targets.SCHEMES)),
       st.sampled_from([("reg", "not_reg"), ("correct", "not_correct")]), st.sampled_from([1.0, 3.0]))
def test_replace_on_complementary_subsets(case, scheme, pair, tau):
    """Every row gets the altered target in exactly one of a subset and its complement, so
    L(S) + L(not S) = L(all) + L(weak only)."""
    z_s, f_s, t, y = case
    spec = {"name": "replace", "scheme": scheme, "tau": tau}
    l_a, m_a = run({**spec, "subset": pair[0]}, z_s, f_s, t, y)
    l_b, m_b = run({**spec, "subset": pair[1]}, z_s, f_s, t, y)
    l_all, _ = run({**spec, "subset": "all"}, z_s, f_s, t, y)
    l_weak, _ = run({"name": "kd", "teacher": "weak", "tau": tau}, z_s, f_s, t, y)
    assert torch.equal(m_a, ~m_b)
    assert torch.allclose(total(l_a) + total(l_b), total(l_all) + total(l_weak), rtol=1e-5, atol=1e-6)


@PROPS
@given(batches(), st.sampled_from(list(targets.SUBSETS)), st.sampled_from([1.0, 2.0]))
def test_mask_mean_is_subset_fraction(case, subset, tau):
    z_s, f_s, t, y = case
    _, mask = run({"name": "replace", "subset": subset, "tau": tau}, z_s, f_s, t, y)
    p_w = torch.softmax(t["weak"].logits / tau, 1)
    p_s = torch.softmax(z_s / tau, 1)
    k = y.view(-1, 1)
    correct = (t["weak"].logits.argmax(1) == y).float()
    reg = (p_w.gather(1, k) < p_s.gather(1, k)).squeeze(1).float()
    frac = {"all": torch.ones_like(reg), "correct": correct, "not_correct": 1 - correct, "reg": reg,
            "not_reg": 1 - reg, "reg_cor": reg * correct, "reg_not_cor": reg * (1 - correct),
            "not_reg_cor": (1 - reg) * correct}[subset].mean()
    assert mask.shape == y.shape and mask.dtype == torch.bool
    assert mask.float().mean().item() == pytest.approx(frac.item(), abs=1e-7)


def test_replace_lambda_mixes_ce():
    z_s, f_s, t, y = batch(2)
    parts, _ = run({"name": "replace", "scheme": "full", "lam": 0.25}, z_s, f_s, t, y)
    assert set(parts) == {"ce", "kd"}
    assert torch.allclose(parts["ce"], 0.75 * F.cross_entropy(z_s, y))
    assert torch.allclose(parts["kd"], 0.25 * losses.kd_loss(z_s, t["strong"].logits, 1.0))
    parts, _ = run({"name": "replace", "lam": 0.0}, z_s, f_s, t, y)
    assert set(parts) == {"ce"} and torch.allclose(parts["ce"], F.cross_entropy(z_s, y))


def test_replace_gives_no_gradient_to_teachers():
    z_s, f_s, t, y = batch(3)
    z_w = t["weak"].logits.clone().requires_grad_(True)
    t = {**t, "weak": TeacherOut(z_w)}
    zs = z_s.clone().requires_grad_(True)
    parts, _ = run({"name": "replace", "scheme": "confidence", "subset": "reg"}, zs, f_s, t, y)
    total(parts).backward()
    assert z_w.grad is None and zs.grad is not None


# ---------------------------------------------------------------------------------------------
# Manipulate (Fig. 6)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_manipulate_delta_zero_is_kd_from_weak(tau):
    z_s, f_s, t, y = batch(4)
    parts, mask = run({"name": "manipulate", "kind": "teacher_amp", "delta": 0.0, "tau": tau}, z_s, f_s, t, y)
    assert mask.all()
    assert torch.allclose(total(parts), losses.kd_loss(z_s, t["weak"].logits, tau), rtol=1e-5)


def test_manipulate_label_smoothing_one_is_ce():
    z_s, f_s, t, y = batch(5)
    parts, _ = run({"name": "manipulate", "kind": "label_smoothing", "t": 1.0}, z_s, f_s, t, y)
    assert torch.allclose(total(parts), F.cross_entropy(z_s, y), rtol=1e-6)
    parts, _ = run({"name": "manipulate", "kind": "label_smoothing", "t": 0.9}, z_s, f_s, t, y)
    assert torch.allclose(total(parts), F.cross_entropy(z_s, y, label_smoothing=(1 - 0.9) * 5 / 4), rtol=1e-6)


@pytest.mark.parametrize("kind, kw", [("label_smoothing", {"t": 0.8}), ("teacher_amp", {"delta": 0.3}),
                                      ("student_amp", {"delta": 0.3})])
@pytest.mark.parametrize("subset", ["correct", "reg", "not_reg_cor"])
def test_manipulate_on_subset(kind, kw, subset):
    z_s, f_s, t, y = batch(6)
    tau = 2.0
    parts, mask = run({"name": "manipulate", "kind": kind, "subset": subset, "tau": tau, **kw}, z_s, f_s, t, y)
    p_t = torch.softmax(t["weak"].logits / tau, 1)
    p_s = torch.softmax(z_s / tau, 1)
    assert torch.equal(mask, targets.subset_mask(subset, p_t, p_s, y))
    assert 0 < mask.sum() < len(y)
    alt = targets.manipulate(kind, p_t, y, p_student=p_s, **kw)
    q = torch.where(mask.view(-1, 1), alt, p_t)
    assert torch.allclose(total(parts), losses.soft_ce(z_s, q, tau), rtol=1e-6)


def test_student_amp_target_is_detached():
    # delta = 0: the target is the student's own (detached) p_s, so the gradient of
    # -sum p_s log p_s(z) at z is p_s - p_s = 0; an attached target would not give zero.
    z_s, f_s, t, y = batch(7)
    zs = z_s.clone().requires_grad_(True)
    parts, _ = run({"name": "manipulate", "kind": "student_amp", "delta": 0.0}, zs, f_s, t, y)
    total(parts).backward()
    assert zs.grad.abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# KD, WSL, CKM, RKD, none
# ---------------------------------------------------------------------------------------------

def test_kd_distiller():
    z_s, f_s, t, y = batch(8)
    parts, mask = run({"name": "kd", "tau": 4.0}, z_s, f_s, t, y)
    assert mask is None and set(parts) == {"kd"}
    assert torch.allclose(parts["kd"], losses.kd_loss(z_s, t["weak"].logits, 4.0), rtol=1e-6)
    parts, _ = run({"name": "kd", "tau": 4.0, "lam": 0.5}, z_s, f_s, t, y)
    assert torch.allclose(parts["ce"], 0.5 * F.cross_entropy(z_s, y))
    assert torch.allclose(parts["kd"], 0.5 * losses.kd_loss(z_s, t["weak"].logits, 4.0), rtol=1e-6)


def test_wsl_distiller_is_the_stage1_recipe():
    z_s, f_s, t, y = batch(9)
    parts, mask = run({"name": "wsl"}, z_s, f_s, t, y)
    assert mask is None and set(parts) == {"ce_ls", "wsl"}
    assert torch.allclose(parts["ce_ls"], F.cross_entropy(z_s, y, label_smoothing=0.1))
    assert torch.allclose(parts["wsl"], 0.5 * losses.wsl_loss(z_s, t["weak"].logits, y, 2.0))


@pytest.mark.parametrize("subset", ["reg_cor", "reg", None])
def test_ckm_distiller(subset):
    z_s, f_s, t, y = batch(10)
    parts, mask = run({"name": "ckm", "subset": subset}, z_s, f_s, t, y)
    z_t = t["strong"].logits
    assert set(parts) == {"ckm"}
    assert torch.equal(mask, losses.ckm_mask(z_s, z_t, y, 0.7, 1.0, subset))
    assert torch.allclose(parts["ckm"], losses.ckm_loss(z_s, z_t, y, 0.7, 1.0, 0.99, subset))
    if subset is None:
        assert not mask.any()
    else:
        assert mask.any()


def test_rkd_distiller():
    z_s, f_s, t, y = batch(11)
    parts, mask = run({"name": "rkd"}, z_s, f_s, t, y)
    assert mask is None and set(parts) == {"ce", "rkd"}
    assert build_distiller({"name": "rkd"}).needs_features
    assert torch.allclose(parts["ce"], F.cross_entropy(z_s, y))
    assert torch.allclose(parts["rkd"], losses.rkd_loss(f_s, t["weak"].features))


def test_no_distillation():
    z_s, f_s, t, y = batch(12)
    parts, mask = run({"name": "none"}, z_s, f_s, {}, y)
    assert mask is None and torch.allclose(parts["ce"], F.cross_entropy(z_s, y))
    parts, _ = run({"name": "none", "ls": 0.1}, z_s, f_s, {}, y)
    assert torch.allclose(parts["ce"], F.cross_entropy(z_s, y, label_smoothing=0.1))


# -- many students at once (fused groups) --------------------------------------------------------

def test_losses_many_equal_the_students_one_by_one():
    """Replacement (every scheme x subset) and manipulation (every kind, student amplification
    from each student's own probabilities) computed for R students at once equal R calls."""
    import itertools

    import torch

    from effdstl_cli.distillers import TeacherOut, build_distiller
    from effdstl_cli.targets import MANIPULATIONS, SCHEMES, SUBSETS

    g = torch.Generator().manual_seed(0)
    b, n = 32, 7
    y = torch.randint(0, n, (b,), generator=g)
    t = {"weak": TeacherOut(torch.randn(b, n, generator=g) * 3), "strong": TeacherOut(torch.randn(b, n, generator=g) * 3)}
    specs = [[{"name": "replace", "scheme": sc, "subset": su, "tau": 2.0, "lam": 0.7}
              for sc, su in itertools.product(SCHEMES, SUBSETS)],
             [{"name": "manipulate", "kind": k, "subset": su, "tau": 1.0, "lam": 1.0,
               **({"t": 0.9} if k == "label_smoothing" else {"delta": 0.2})}
              for k, su in itertools.product(MANIPULATIONS, SUBSETS)]]
    for spec in specs:
        ds = [build_distiller(s) for s in spec]
        assert len({d.batch_key() for d in ds}) == 1
        z = torch.randn(len(ds), b, n, generator=g) * 2
        parts, mask = type(ds[0]).losses_many(ds, z, None, t, y)
        assert mask.shape == (len(ds), b) and mask.any() and not mask.all()
        for i, d in enumerate(ds):
            p1, m1 = d.losses(z[i], None, t, y)
            assert set(p1) == set(parts), spec[i]
            for k in p1:
                assert torch.allclose(parts[k][i], p1[k], rtol=1e-6, atol=1e-7), (spec[i], k)
            assert torch.equal(mask[i], m1), spec[i]


class ReleasedWSL(torch.nn.Module):
    """A transcription of WSLDistiller.forward from the WSL authors' released code
    (bellymonster/Weighted-Soft-Label-Distillation, knowledge_distiller.py): the same lines with
    ``.cuda()`` dropped, the networks' outputs passed in, and ``num_classes=1000`` made N."""

    def __init__(self):
        super().__init__()
        self.T = 2
        self.alpha = 2.5
        self.softmax = torch.nn.Softmax(dim=1)
        self.logsoftmax = torch.nn.LogSoftmax(dim=1)
        self.hard_loss = torch.nn.CrossEntropyLoss()   # the released configuration: label_smooth = False

    def forward(self, fc_s, fc_t, label):
        s_input_for_softmax = fc_s / self.T
        t_input_for_softmax = fc_t / self.T
        t_soft_label = self.softmax(t_input_for_softmax)
        softmax_loss = - torch.sum(t_soft_label * self.logsoftmax(s_input_for_softmax), 1, keepdim=True)
        fc_s_auto = fc_s.detach()
        fc_t_auto = fc_t.detach()
        log_softmax_s = self.logsoftmax(fc_s_auto)
        log_softmax_t = self.logsoftmax(fc_t_auto)
        one_hot_label = F.one_hot(label, num_classes=fc_s.shape[1]).float()
        softmax_loss_s = - torch.sum(one_hot_label * log_softmax_s, 1, keepdim=True)
        softmax_loss_t = - torch.sum(one_hot_label * log_softmax_t, 1, keepdim=True)
        focal_weight = softmax_loss_s / (softmax_loss_t + 1e-7)
        ratio_lower = torch.zeros(1)
        focal_weight = torch.max(focal_weight, ratio_lower)
        focal_weight = 1 - torch.exp(- focal_weight)
        softmax_loss = focal_weight * softmax_loss
        soft_loss = (self.T ** 2) * torch.mean(softmax_loss)
        hard_loss = self.hard_loss(fc_s, label)
        return hard_loss + self.alpha * soft_loss


@pytest.mark.parametrize("n", [10, 1000])
def test_wsl_released_equals_the_released_loss(n):
    """Table 1's WSL baseline is the released WSL loss, in value and gradient, to 1e-6."""
    g = torch.Generator().manual_seed(n)
    z_s = (2 * torch.randn(16, n, generator=g)).requires_grad_(True)
    z_t = 4 * torch.randn(16, n, generator=g)
    y = torch.randint(n, (16,), generator=g)
    parts, mask = run({"name": "wsl_released", "teacher": "weak"}, z_s, None, {"weak": TeacherOut(z_t)}, y)
    ours = total(parts)
    (g_ours,) = torch.autograd.grad(ours, z_s)
    ref = ReleasedWSL()(z_s, z_t, y)
    (g_ref,) = torch.autograd.grad(ref, z_s)
    assert mask is None and set(parts) == {"ce", "wsl"}
    assert abs(ours.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    assert (g_ours - g_ref).abs().max().item() <= 1e-6
    # EffDstl's stage-1 variant (weights at T, CE with label smoothing + 0.5 WSL) is another loss
    other = total(run({"name": "wsl", "teacher": "weak"}, z_s, None, {"weak": TeacherOut(z_t)}, y)[0])
    assert abs(other.item() - ref.item()) > 1e-3
    # the weights at T = 1, not at T: computing them at T = 2 changes the soft loss
    assert abs(losses.wsl_released_loss(z_s, z_t, y, 2.0).item()
               - losses.wsl_loss(z_s, z_t, y, 2.0).item()) > 1e-4
