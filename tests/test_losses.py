"""Losses of METHOD.md — effdstl_cli/losses.py: KD, soft CE, LS-CE, WSL, CKM, RKD.

WSL and CKM are checked against values computed step by step with plain ``math`` following
METHOD.md; KD against its limits and the KL gradient; RKD against its invariances and a
plain-Python reference.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from effdstl_cli import losses

PROPS = settings(max_examples=50, deadline=None)
D = torch.float64


def T(rows, requires_grad=False):
    return torch.tensor(rows, dtype=D, requires_grad=requires_grad)


def Y(labels):
    return torch.tensor(labels, dtype=torch.long)


def softmax(z, tau=1.0):
    e = [math.exp(v / tau) for v in z]
    s = sum(e)
    return [v / s for v in e]


@st.composite
def logits(draw):
    b = draw(st.integers(1, 8))
    n = draw(st.integers(2, 12))
    scale = draw(st.floats(0.1, 10.0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z_s = scale * torch.randn(b, n, generator=g, dtype=D)
    z_t = scale * torch.randn(b, n, generator=g, dtype=D)
    y = torch.randint(n, (b,), generator=g)
    return z_s, z_t, y


# ---------------------------------------------------------------------------------------------
# soft CE / KD / LS-CE
# ---------------------------------------------------------------------------------------------

def test_soft_ce_hand_computed():
    z = [1.0, 2.0, 0.0]
    q = [0.2, 0.5, 0.3]
    ls = [math.log(v) for v in softmax(z)]
    expect = -sum(a * b for a, b in zip(q, ls))
    assert losses.soft_ce(T([z]), T([q])).item() == pytest.approx(expect, rel=1e-12)
    # tau = 2: -sum q log softmax(z / 2), times 2^2
    ls2 = [math.log(v) for v in softmax(z, 2.0)]
    expect2 = 4.0 * -sum(a * b for a, b in zip(q, ls2))
    assert losses.soft_ce(T([z]), T([q]), tau=2.0).item() == pytest.approx(expect2, rel=1e-12)


@PROPS
@given(logits())
def test_soft_ce_one_hot_is_cross_entropy(case):
    z_s, _, y = case
    q = F.one_hot(y, z_s.shape[1]).to(D)
    assert torch.allclose(losses.soft_ce(z_s, q), F.cross_entropy(z_s, y), rtol=1e-10, atol=1e-12)
    for tau in (0.5, 2.0, 4.0):
        assert torch.allclose(losses.soft_ce(z_s, q, tau), tau**2 * F.cross_entropy(z_s / tau, y),
                              rtol=1e-10, atol=1e-12)


@PROPS
@given(logits(), st.floats(0.1, 10.0))
def test_soft_ce_tau_squared_scaling(case, tau):
    z_s, z_t, _ = case
    q = torch.softmax(z_t, 1)
    expect = -(q * F.log_softmax(z_s / tau, 1)).sum(1).mean()
    if tau != 1.0:
        expect = expect * tau**2
    assert torch.allclose(losses.soft_ce(z_s, q, tau), expect, rtol=1e-10, atol=1e-12)


def test_soft_ce_tau_one_has_no_extra_factor():
    z, q = T([[3.0, -1.0, 0.5]]), T([[0.6, 0.1, 0.3]])
    assert torch.allclose(losses.soft_ce(z, q, 1.0), -(q * F.log_softmax(z, 1)).sum())


def test_kd_hand_computed():
    z_s, z_t, tau = [1.0, 0.0, -1.0], [2.0, 1.0, 0.5], 3.0
    p_t = softmax(z_t, tau)
    log_ps = [math.log(v) for v in softmax(z_s, tau)]
    expect = -tau**2 * sum(a * b for a, b in zip(p_t, log_ps))
    assert losses.kd_loss(T([z_s]), T([z_t]), tau).item() == pytest.approx(expect, rel=1e-12)


@PROPS
@given(logits(), st.floats(0.2, 8.0))
def test_kd_is_soft_ce_on_teacher_probabilities(case, tau):
    z_s, z_t, _ = case
    assert torch.allclose(losses.kd_loss(z_s, z_t, tau),
                          losses.soft_ce(z_s, torch.softmax(z_t / tau, 1), tau), rtol=1e-10, atol=1e-12)


@PROPS
@given(logits(), st.sampled_from([0.5, 1.0, 2.0, 4.0]))
def test_kd_gradient_is_kl_gradient(case, tau):
    z_s, z_t, _ = case
    a = z_s.clone().requires_grad_(True)
    losses.kd_loss(a, z_t, tau).backward()
    b = z_s.clone().requires_grad_(True)
    kl = F.kl_div(F.log_softmax(b / tau, 1), torch.softmax(z_t / tau, 1), reduction="batchmean")
    (tau**2 * kl).backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-8, atol=1e-12)
    # and the values differ exactly by tau^2 * the teacher's mean entropy (a constant)
    p_t = torch.softmax(z_t / tau, 1)
    ent = -(p_t * torch.log(p_t.clamp_min(1e-300))).sum(1).mean()
    assert torch.allclose(losses.kd_loss(z_s, z_t, tau), tau**2 * (kl.detach() + ent), rtol=1e-8, atol=1e-10)


def test_kd_teacher_gets_no_gradient():
    z_s, z_t = T([[1.0, 2.0, 3.0]], True), T([[0.0, 1.0, 0.0]], True)
    losses.kd_loss(z_s, z_t, 2.0).backward()
    assert z_t.grad is None and z_s.grad is not None


@pytest.mark.parametrize("n", [2, 3, 10, 100])
def test_kd_high_temperature_limit(n):
    g = torch.Generator().manual_seed(n)
    z_s, z_t = torch.randn(4, n, generator=g, dtype=D), 5 * torch.randn(4, n, generator=g, dtype=D)
    # p_t(tau) -> uniform, so L_KD / tau^2 = -sum p_t log p_s -> log N; the gap shrinks with tau.
    gaps = [abs(losses.kd_loss(z_s, z_t, tau).item() / tau**2 - math.log(n)) for tau in (10.0, 1e2, 1e4)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-6
    assert torch.allclose(torch.softmax(z_t / 1e4, 1), torch.full((4, n), 1.0 / n, dtype=D), rtol=1e-2, atol=0)


def test_ls_ce_hand_computed():
    z, s = [2.0, 0.0, -1.0], 0.1
    # target: (1 - s) * onehot + s / N on y = 1 -> [0.0333.., 0.9333.., 0.0333..]
    q = [s / 3, 1 - s + s / 3, s / 3]
    log_p = [math.log(v) for v in softmax(z)]
    expect = -sum(a * b for a, b in zip(q, log_p))
    assert losses.ls_ce(T([z]), Y([1]), s).item() == pytest.approx(expect, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# WSL (METHOD.md 'WSL')
# ---------------------------------------------------------------------------------------------

WSL_ZS = [[2.0, 0.5, -1.0], [0.1, 0.3, 1.2], [-0.5, 1.5, 0.0]]
WSL_ZT = [[3.0, 0.0, -0.5], [0.2, 2.0, 0.1], [0.0, 0.5, 1.0]]
WSL_Y = [0, 2, 1]


def wsl_by_hand(zs_rows, zt_rows, ys, T_=2.0):
    """METHOD.md step by step: returns (loss, weights, per-row soft CE)."""
    ws, rows = [], []
    for zs, zt, y in zip(zs_rows, zt_rows, ys):
        ps, pt = softmax(zs, T_), softmax(zt, T_)
        ce_s, ce_t = -math.log(ps[y]), -math.log(pt[y])      # CE(z / T, y)
        w = 1.0 - math.exp(-max(ce_s / ce_t, 0.0))
        row = -sum(a * math.log(b) for a, b in zip(pt, ps))  # -sum p_t(T) log p_s(T)
        ws.append(w)
        rows.append(row)
    loss = T_**2 * sum(w * r for w, r in zip(ws, rows)) / len(ws)
    return loss, ws, rows


def test_wsl_hand_computed():
    expect, ws, _ = wsl_by_hand(WSL_ZS, WSL_ZT, WSL_Y)
    got = losses.wsl_loss(T(WSL_ZS), T(WSL_ZT), Y(WSL_Y), 2.0)
    assert got.item() == pytest.approx(expect, rel=1e-12)
    w = losses.wsl_weight(T(WSL_ZS), T(WSL_ZT), Y(WSL_Y), 2.0)
    assert w.tolist() == pytest.approx(ws, rel=1e-12)
    # the weights of this batch are not all alike, so the per-row weighting is exercised
    assert max(ws) - min(ws) > 0.1
    # T = 1 gives a different (hand-computed) value: T enters both the weight and the tau^2 factor
    assert losses.wsl_loss(T(WSL_ZS), T(WSL_ZT), Y(WSL_Y), 1.0).item() == pytest.approx(
        wsl_by_hand(WSL_ZS, WSL_ZT, WSL_Y, 1.0)[0], rel=1e-12)


def test_wsl_weight_is_detached():
    _, ws, _ = wsl_by_hand(WSL_ZS, WSL_ZT, WSL_Y)
    z = T(WSL_ZS, True)
    losses.wsl_loss(z, T(WSL_ZT), Y(WSL_Y), 2.0).backward()
    # reference: the weights as constants
    ref = T(WSL_ZS, True)
    p_t = torch.softmax(T(WSL_ZT) / 2.0, 1)
    per_row = -(p_t * F.log_softmax(ref / 2.0, 1)).sum(1)
    (4.0 * (T(ws) * per_row).mean()).backward()
    assert torch.allclose(z.grad, ref.grad, rtol=1e-10, atol=1e-12)
    # a weight that let gradient through would give a clearly different gradient here
    leak = T(WSL_ZS, True)
    ce_s = F.cross_entropy(leak / 2.0, Y(WSL_Y), reduction="none")
    ce_t = F.cross_entropy(T(WSL_ZT) / 2.0, Y(WSL_Y), reduction="none")
    w_live = 1 - torch.exp(-(ce_s / ce_t).clamp_min(0))
    (4.0 * (w_live * -(p_t * F.log_softmax(leak / 2.0, 1)).sum(1)).mean()).backward()
    assert (leak.grad - ref.grad).abs().max() > 1e-3


def test_wsl_teacher_gets_no_gradient():
    z_t = T(WSL_ZT, True)
    losses.wsl_loss(T(WSL_ZS, True), z_t, Y(WSL_Y)).backward()
    assert z_t.grad is None


@pytest.mark.parametrize("n", [2, 7, 1000])
def test_wsl_any_number_of_classes(n):
    g = torch.Generator().manual_seed(n)
    z_s, z_t = torch.randn(5, n, generator=g, dtype=D), 3 * torch.randn(5, n, generator=g, dtype=D)
    y = torch.randint(n, (5,), generator=g)
    expect, _, _ = wsl_by_hand(z_s.tolist(), z_t.tolist(), y.tolist())
    got = losses.wsl_loss(z_s, z_t, y)
    assert torch.isfinite(got) and got.item() == pytest.approx(expect, rel=1e-10)


def test_wsl_weight_range_and_confident_teacher():
    # a teacher with CE_t ~ 0 (certain and right) must not give NaN: w -> 1
    z_s, z_t, y = T([[0.0, 1.0, 2.0]]), T([[1e4, 0.0, 0.0]]), Y([0])
    w = losses.wsl_weight(z_s, z_t, y)
    assert torch.isfinite(w).all() and 0.0 <= w.item() <= 1.0
    assert torch.isfinite(losses.wsl_loss(z_s, z_t, y))


# ---------------------------------------------------------------------------------------------
# CKM (METHOD.md 'Consistent knowledge mining')
# ---------------------------------------------------------------------------------------------

# row 0: teacher right (argmax 0 = y) and p_t(0.7)[0] ~ 0.578 < p_s(1)[0] ~ 0.909  -> mined
# row 1: teacher right, p_t(0.7)[1] ~ 0.897 > p_s(1)[1] ~ 0.486                     -> not mined
# row 2: teacher wrong (argmax 0, y = 2) but p_t(0.7)[2] ~ 0.10 < p_s(1)[2] ~ 0.79  -> not mined
#        (reg but not correct; mined when subset='reg', the Fig. 8 contrast)
CKM_ZS = [[3.0, 0.0, 0.0], [0.5, 1.0, 0.2], [0.0, 0.0, 2.0]]
CKM_ZT = [[1.0, 0.5, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.5]]
CKM_Y = [0, 1, 2]


def ckm_by_hand(zs_rows, zt_rows, ys, tau_t=0.7, tau_s=1.0, smooth=0.99, mine_incorrect=False):
    total, mined = 0.0, []
    for zs, zt, y in zip(zs_rows, zt_rows, ys):
        n = len(zs)
        pt, ps = softmax(zt, tau_t), softmax(zs, tau_s)
        correct = max(range(n), key=lambda i: zt[i]) == y
        m = (correct or mine_incorrect) and pt[y] < ps[y]
        # the official target: smooth * onehot + (1 - smooth) / N (docs/METHOD.md 'CKM')
        q = [smooth * (i == y) + (1 - smooth) / n for i in range(n)] if m else pt
        total += -sum(a * math.log(b) for a, b in zip(q, ps))  # no tau^2 factor
        mined.append(m)
    return total / len(ys), mined


def test_ckm_hand_computed():
    expect, mined = ckm_by_hand(CKM_ZS, CKM_ZT, CKM_Y)
    assert mined == [True, False, False]  # the batch is what the comment says
    zs, zt, y = T(CKM_ZS), T(CKM_ZT), Y(CKM_Y)
    assert losses.ckm_mask(zs, zt, y).tolist() == mined
    assert losses.ckm_loss(zs, zt, y).item() == pytest.approx(expect, rel=1e-12)
    # written out for the mined row (N = 3): true class 0.99 + 0.01/3, others 0.01/3 each
    ps0 = softmax(CKM_ZS[0])
    hi, lo = 0.99 + 0.01 / 3, 0.01 / 3
    row0 = -(hi * math.log(ps0[0]) + lo * math.log(ps0[1]) + lo * math.log(ps0[2]))
    assert losses.ckm_loss(zs[:1], zt[:1], y[:1]).item() == pytest.approx(row0, rel=1e-12)


def test_ckm_target_is_the_official_one():
    """0.99 * onehot + 0.01 / N: for 1000 classes the true class gets 0.99001, every other 1e-5
    (the official wsl_loss.py); not 0.01 spread over the N - 1 others."""
    y = Y([3, 0])
    q = losses.ckm_target(y, 1000, 0.99, torch.float64)
    assert q[0, 3].item() == pytest.approx(0.99001, abs=1e-12)
    assert q[0, 0].item() == pytest.approx(1e-5, abs=1e-15) and q[1, 1].item() == pytest.approx(1e-5, abs=1e-15)
    assert torch.allclose(q.sum(1), torch.ones(2, dtype=torch.float64), atol=1e-12)
    q3 = losses.ckm_target(Y([1]), 3, 0.9, torch.float64)[0].tolist()
    assert q3 == pytest.approx([0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3], abs=1e-12)


def test_ckm_subset_variants():
    zs, zt, y = T(CKM_ZS), T(CKM_ZT), Y(CKM_Y)
    expect, mined = ckm_by_hand(CKM_ZS, CKM_ZT, CKM_Y, mine_incorrect=True)
    assert mined == [True, False, True]
    assert losses.ckm_mask(zs, zt, y, subset="reg").tolist() == mined
    assert losses.ckm_loss(zs, zt, y, subset="reg").item() == pytest.approx(expect, rel=1e-12)
    # CKM off: plain -sum p_t(0.7) log p_s(1) on every row
    off = losses.ckm_loss(zs, zt, y, subset=None)
    ref = -(torch.softmax(zt / 0.7, 1) * F.log_softmax(zs, 1)).sum(1).mean()
    assert not losses.ckm_mask(zs, zt, y, subset=None).any()
    assert torch.allclose(off, ref, rtol=1e-12)


def test_ckm_temperatures_matter():
    zs, zt, y = T(CKM_ZS), T(CKM_ZT), Y(CKM_Y)
    for tau_t, tau_s in ((1.0, 1.0), (0.8, 1.0), (0.7, 2.0)):
        expect, _ = ckm_by_hand(CKM_ZS, CKM_ZT, CKM_Y, tau_t=tau_t, tau_s=tau_s)
        got = losses.ckm_loss(zs, zt, y, tau_t=tau_t, tau_s=tau_s)
        assert got.item() == pytest.approx(expect, rel=1e-12), (tau_t, tau_s)


@pytest.mark.parametrize("n", [2, 7])
def test_ckm_any_number_of_classes(n):
    g = torch.Generator().manual_seed(7 * n)
    z_t = 2 * torch.randn(64, n, generator=g, dtype=D)
    y = z_t.argmax(1).clone()
    y[::4] = torch.randint(n, (16,), generator=g)  # some teacher-wrong rows
    z_s = 3 * torch.randn(64, n, generator=g, dtype=D)
    expect, mined = ckm_by_hand(z_s.tolist(), z_t.tolist(), y.tolist())
    assert 0 < sum(mined) < 64  # both kinds of row present
    assert losses.ckm_mask(z_s, z_t, y).tolist() == mined
    assert losses.ckm_loss(z_s, z_t, y).item() == pytest.approx(expect, rel=1e-10)


def test_ckm_gradient_only_to_student():
    zs, zt = T(CKM_ZS, True), T(CKM_ZT, True)
    losses.ckm_loss(zs, zt, Y(CKM_Y)).backward()
    assert zt.grad is None and torch.isfinite(zs.grad).all()


# ---------------------------------------------------------------------------------------------
# RKD (Park et al. 2019)
# ---------------------------------------------------------------------------------------------

def rkd_by_hand(fs, ft, w_dist=25.0, w_angle=50.0):
    """Plain-Python RKD: distances normalised by their mean over distinct pairs, the full BxB
    matrix compared with smooth-L1 (beta 1, mean); cosines of every triplet's difference
    vectors, BxBxB, smooth-L1 mean."""
    b = len(fs)

    def sl1(a, c):
        d = abs(a - c)
        return 0.5 * d * d if d < 1 else d - 0.5

    def dist(f):
        d = [[math.dist(f[i], f[j]) if i != j else 0.0 for j in range(b)] for i in range(b)]
        mu = sum(map(sum, d)) / (b * (b - 1))
        return [[v / mu for v in r] for r in d]

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v] if n > 1e-12 else [0.0] * len(v)

    def ang(f):
        out = []
        for i, j, k in itertools.product(range(b), repeat=3):
            u = unit([a - c for a, c in zip(f[j], f[i])])
            v = unit([a - c for a, c in zip(f[k], f[i])])
            out.append(sum(a * c for a, c in zip(u, v)))
        return out

    ds, dt = dist(fs), dist(ft)
    loss_d = sum(sl1(a, c) for ra, rc in zip(ds, dt) for a, c in zip(ra, rc)) / b**2
    loss_a = sum(sl1(a, c) for a, c in zip(ang(fs), ang(ft))) / b**3
    return w_dist * loss_d + w_angle * loss_a


def test_rkd_hand_computed():
    fs = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    ft = [[0.0, 0.0, 1.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    got = losses.rkd_loss(T(fs), T(ft))
    assert got.item() == pytest.approx(rkd_by_hand(fs, ft), rel=1e-5)
    assert losses.rkd_loss(T(fs), T(ft), 1.0, 0.0).item() == pytest.approx(rkd_by_hand(fs, ft, 1.0, 0.0), rel=1e-5)
    assert losses.rkd_loss(T(fs), T(ft), 0.0, 1.0).item() == pytest.approx(rkd_by_hand(fs, ft, 0.0, 1.0), rel=1e-5)


@pytest.mark.parametrize("scale", [1.0, 3.0, 0.01, 100.0])
def test_rkd_zero_for_same_relations(scale):
    g = torch.Generator().manual_seed(0)
    f_t = torch.randn(8, 16, generator=g)
    assert losses.rkd_loss(scale * f_t, f_t).item() < 1e-5
    # rotation + translation + scale keep every distance ratio and angle. (The translation is kept
    # modest against the scale: the float32 |a|^2 + |b|^2 - 2ab distance loses precision when
    # features sit far from the origin relative to their spread.)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert losses.rkd_loss(scale * (f_t @ q + 2.0), f_t).item() < 1e-5


def test_rkd_positive_when_relations_differ():
    g = torch.Generator().manual_seed(1)
    f_t = torch.randn(8, 16, generator=g)
    assert losses.rkd_loss(torch.randn(8, 16, generator=g), f_t).item() > 1e-2
    # an anisotropic scale changes relations
    stretch = torch.ones(16)
    stretch[:4] = 5.0
    assert losses.rkd_loss(f_t * stretch, f_t).item() > 1e-2


def test_rkd_different_widths_and_gradients():
    g = torch.Generator().manual_seed(2)
    f_s = torch.randn(6, 5, generator=g, requires_grad=True)
    f_t = torch.randn(6, 12, generator=g, requires_grad=True)
    loss = losses.rkd_loss(f_s, f_t)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(f_s.grad).all() and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    # 4-d feature maps are flattened
    assert torch.isfinite(losses.rkd_loss(torch.randn(6, 2, 3, 3, generator=g), f_t.detach()))


def test_rkd_tiny_batches():
    assert losses.rkd_loss(torch.randn(1, 4), torch.randn(1, 4)).item() == 0.0
    assert torch.isfinite(losses.rkd_loss(torch.randn(2, 4), torch.randn(2, 4)))
    # duplicate student rows (zero distance) give finite gradients
    f_s = torch.zeros(3, 4, requires_grad=True)
    losses.rkd_loss(f_s, torch.randn(3, 4)).backward()
    assert torch.isfinite(f_s.grad).all()
