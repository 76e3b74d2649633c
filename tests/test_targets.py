"""The soft-target algebra of METHOD.md (Eq. 1-5, subsets) — effdstl_cli/targets.py.

Hand-computed 3-class cases write the expected numbers out; property tests (hypothesis) check
that every output row is a distribution, including degenerate teachers (p_k = 1, p_k = 0,
one-hot on a wrong class), in float32 and float64, for any N in [2, 20].
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effdstl_cli import targets
from effdstl_cli.errors import EffdstlError

PROPS = settings(max_examples=50, deadline=None)
ROW_KINDS = ("soft", "sharp", "onehot_true", "near_onehot", "zero_true", "onehot_wrong", "uniform")
DEGENERATE = ("onehot_true", "near_onehot", "zero_true", "onehot_wrong")


def T(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def Y(labels):
    return torch.tensor(labels, dtype=torch.long)


def assert_rows_are_distributions(q: torch.Tensor, atol: float = 1e-5) -> None:
    assert torch.isfinite(q).all(), q
    assert (q >= 0).all(), q
    sums = q.double().sum(1)
    assert torch.allclose(sums, torch.ones_like(sums), rtol=0, atol=atol), sums


def _probs(g: torch.Generator, kinds, labels, n: int, dtype) -> torch.Tensor:
    rows = []
    for kind, y in zip(kinds, labels.tolist()):
        wrong = (y + 1 + int(torch.randint(n - 1, (1,), generator=g))) % n
        z = torch.randn(n, generator=g, dtype=torch.float64)
        if kind == "soft":
            p = torch.softmax(2.0 * z, 0)
        elif kind == "sharp":
            p = torch.softmax(40.0 * z, 0)
        elif kind == "onehot_true":
            p = torch.zeros(n, dtype=torch.float64)
            p[y] = 1.0
        elif kind == "near_onehot":  # a teacher with a logit margin ~30: tiny but positive rest
            p = torch.softmax(z, 0) * 1e-13
            p[y] = 0.0
            p[y] = 1.0 - p.sum()
        elif kind == "zero_true":
            p = torch.softmax(2.0 * z, 0)
            p[y] = 0.0
            p = p / p.sum()
        elif kind == "onehot_wrong":
            p = torch.zeros(n, dtype=torch.float64)
            p[wrong] = 1.0
        else:
            p = torch.full((n,), 1.0 / n, dtype=torch.float64)
        rows.append(p)
    return torch.stack(rows).to(dtype)


@st.composite
def batches(draw, degenerate_only: bool = False):
    """A batch: weak / strong teacher and student probabilities, labels, dtype."""
    n = draw(st.integers(2, 20))
    b = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kinds = st.sampled_from(DEGENERATE if degenerate_only else ROW_KINDS)
    labels = torch.randint(n, (b,), generator=g)
    ps = [_probs(g, draw(st.lists(kinds, min_size=b, max_size=b)), labels, n, dtype) for _ in range(3)]
    return {"n": n, "dtype": dtype, "y": labels, "p_w": ps[0], "p_p": ps[1], "p_s": ps[2]}


# ---------------------------------------------------------------------------------------------
# 1. every output is a probability row; no in-place edits; no autograd leaks
# ---------------------------------------------------------------------------------------------

@PROPS
@given(batches(), st.sampled_from(list(targets.SCHEMES)))
def test_replace_gives_distributions(b, scheme):
    q = targets.replace(scheme, b["p_w"], b["p_p"], b["y"])
    assert q.shape == b["p_w"].shape and q.dtype == b["dtype"]
    assert_rows_are_distributions(q)


@PROPS
@given(batches(degenerate_only=True), st.sampled_from(list(targets.SCHEMES)))
def test_replace_degenerate_rows_only(b, scheme):
    assert_rows_are_distributions(targets.replace(scheme, b["p_w"], b["p_p"], b["y"]))


@PROPS
@given(batches(), st.floats(0.0, 2.0), st.floats(1e-3, 1.0))
def test_manipulate_gives_distributions(b, delta, t):
    for kind in targets.MANIPULATIONS:
        q = targets.manipulate(kind, b["p_w"], b["y"], t=t, delta=delta, p_student=b["p_s"])
        assert q.shape == b["p_w"].shape and q.dtype == b["dtype"], kind
        assert_rows_are_distributions(q)


@PROPS
@given(batches(), st.sampled_from(list(targets.SUBSETS)), st.sampled_from(list(targets.SCHEMES)))
def test_apply_on_gives_distributions_and_picks_rows(b, subset, scheme):
    mask = targets.subset_mask(subset, b["p_w"], b["p_s"], b["y"])
    alt = targets.replace(scheme, b["p_w"], b["p_p"], b["y"])
    q = targets.apply_on(mask, alt, b["p_w"])
    assert_rows_are_distributions(q)
    assert torch.equal(q[mask], alt[mask])
    assert torch.equal(q[~mask], b["p_w"][~mask])


@PROPS
@given(batches(), st.sampled_from(list(targets.SUBSETS)))
def test_no_in_place_edits_and_no_autograd_leak(b, subset):
    p_w = b["p_w"].clone().requires_grad_(True)
    p_p = b["p_p"].clone().requires_grad_(True)
    p_s = b["p_s"].clone().requires_grad_(True)
    y = b["y"].clone()
    before = [x.detach().clone() for x in (p_w, p_p, p_s)]
    outs = [targets.replace(s, p_w, p_p, y) for s in targets.SCHEMES]
    outs += [targets.manipulate(k, p_w, y, t=0.7, delta=0.2, p_student=p_s) for k in targets.MANIPULATIONS]
    mask = targets.subset_mask(subset, p_w, p_s, y)
    outs.append(targets.apply_on(mask, p_p, p_w))
    for q in outs:
        assert not q.requires_grad
        assert q.grad_fn is None
    assert not mask.requires_grad and mask.dtype == torch.bool and mask.shape == y.shape
    for x, x0 in zip((p_w, p_p, p_s), before):
        assert torch.equal(x.detach(), x0)
    assert torch.equal(y, b["y"])
    # the returned tensors are not views of the inputs: editing them leaves the inputs alone
    for q in outs:
        q.add_(1.0)
    for x, x0 in zip((p_w, p_p, p_s), before):
        assert torch.equal(x.detach(), x0)


# ---------------------------------------------------------------------------------------------
# 2. hand-computed 3-class cases (METHOD.md Eq. 1-5)
# ---------------------------------------------------------------------------------------------

P_MINUS = [0.5, 0.3, 0.2]
P_PLUS = [0.8, 0.15, 0.05]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_replace_hand_computed(dtype):
    # row 0: y = 0 (the brief's example); row 1: the same numbers reversed with y = 2.
    p_w = T([P_MINUS, P_MINUS[::-1]], dtype)
    p_p = T([P_PLUS, P_PLUS[::-1]], dtype)
    y = Y([0, 2])
    tol = dict(rtol=0, atol=1e-6)
    # full: q = p_+
    assert torch.allclose(targets.replace("full", p_w, p_p, y), p_p, **tol)
    # partial (Eq. 1): q_k = 0.5; q_1 = 0.15 * 0.5 / 0.2 = 0.375; q_2 = 0.05 * 0.5 / 0.2 = 0.125
    assert torch.allclose(targets.replace("partial", p_w, p_p, y),
                          T([[0.5, 0.375, 0.125], [0.125, 0.375, 0.5]], dtype), **tol)
    # confidence (Eq. 2): q_k = 0.8; q_1 = 0.3 * 0.2 / 0.5 = 0.12; q_2 = 0.2 * 0.2 / 0.5 = 0.08
    assert torch.allclose(targets.replace("confidence", p_w, p_p, y),
                          T([[0.8, 0.12, 0.08], [0.08, 0.12, 0.8]], dtype), **tol)


def test_replace_hand_computed_wrong_teachers():
    # Both teachers wrong on y = 1: partial keeps p_-[1] = 0.3 and spreads 0.7 as p_+ does
    # over {0, 2}: 0.8/0.85 * 0.7, 0.05/0.85 * 0.7.
    y = Y([1])
    q = targets.replace("partial", T([P_MINUS]), T([P_PLUS]), y)
    assert torch.allclose(q, T([[0.8 / 0.85 * 0.7, 0.3, 0.05 / 0.85 * 0.7]]), atol=1e-12)
    # confidence takes p_+[1] = 0.15 and spreads 0.85 as p_- does over {0, 2}: 0.5/0.7, 0.2/0.7.
    q = targets.replace("confidence", T([P_MINUS]), T([P_PLUS]), y)
    assert torch.allclose(q, T([[0.5 / 0.7 * 0.85, 0.15, 0.2 / 0.7 * 0.85]]), atol=1e-12)


def test_replace_certain_teachers():
    # p_-,k = 1 (partial): q_k = 1, nothing left for the others.
    q = targets.replace("partial", T([[1.0, 0.0, 0.0]]), T([P_PLUS]), Y([0]))
    assert torch.allclose(q, T([[1.0, 0.0, 0.0]]), atol=1e-12)
    # p_+,k = 1 (confidence): q = one-hot.
    q = targets.replace("confidence", T([P_MINUS]), T([[1.0, 0.0, 0.0]]), Y([0]))
    assert torch.allclose(q, T([[1.0, 0.0, 0.0]]), atol=1e-12)
    # 0/0: p_- certain, p_+ not -> confidence has no t- shape to keep; targets.py documents the
    # even spread of 1 - p_+,k = 0.2 over the two other classes.
    q = targets.replace("confidence", T([[1.0, 0.0, 0.0]]), T([P_PLUS]), Y([0]))
    assert torch.allclose(q, T([[0.8, 0.1, 0.1]]), atol=1e-12)
    # and the mirror case for partial: p_+ certain -> 1 - p_-,k = 0.5 spread evenly.
    q = targets.replace("partial", T([P_MINUS]), T([[1.0, 0.0, 0.0]]), Y([0]))
    assert torch.allclose(q, T([[0.5, 0.25, 0.25]]), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearly_certain_teacher_keeps_its_shape(dtype):
    # softmax([30, 0, 1]) = [1 - 3.48e-13, 9.36e-14, 2.54e-13]: 1 - p_+,k is tiny but not 0 (in
    # float32 p_+,k even rounds to 1), so Eq. 1 is well defined: q = [0.5, 0.5 * 0.2689, 0.5 * 0.7311]
    # with 0.2689 = 1 / (1 + e). Spreading evenly ([0.5, 0.25, 0.25]) would not be Eq. 1.
    p_p = torch.softmax(T([[30.0, 0.0, 1.0]], dtype), 1)
    a = 1.0 / (1.0 + 2.718281828459045)
    q = targets.replace("partial", T([P_MINUS], dtype), p_p, Y([0]))
    assert torch.allclose(q, T([[0.5, 0.5 * a, 0.5 * (1 - a)]], dtype), rtol=0, atol=1e-6)
    # Eq. 2 likewise, with the nearly certain teacher as t-: its rest keeps its 1 : e ratio
    q = targets.replace("confidence", p_p, T([P_PLUS], dtype), Y([0]))
    assert torch.allclose(q, T([[0.8, 0.2 * a, 0.2 * (1 - a)]], dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_manipulate_hand_computed(dtype):
    p = T([P_MINUS, P_MINUS], dtype)
    tol = dict(rtol=0, atol=1e-6)
    # Eq. 3 label smoothing t = 0.7: (1 - 0.7) / 2 = 0.15 on each other class.
    q = targets.manipulate("label_smoothing", p, Y([0, 1]), t=0.7)
    assert torch.allclose(q, T([[0.7, 0.15, 0.15], [0.15, 0.7, 0.15]], dtype), **tol)
    # Eq. 4 teacher amplification delta = 0.2: q_0 = 0.7; q_1 = 0.3 * 0.3 / 0.5 = 0.18; q_2 = 0.12.
    q = targets.manipulate("teacher_amp", p, Y([0, 0]), delta=0.2)
    assert torch.allclose(q, T([[0.7, 0.18, 0.12]] * 2, dtype), **tol)
    # on y = 2: q_2 = 0.4; q_0 = 0.5 * 0.6 / 0.8 = 0.375; q_1 = 0.3 * 0.6 / 0.8 = 0.225.
    q = targets.manipulate("teacher_amp", p, Y([2, 2]), delta=0.2)
    assert torch.allclose(q, T([[0.375, 0.225, 0.4]] * 2, dtype), **tol)
    # clipping: 0.5 + 0.9 > 1 -> min(., 1) = 1 -> one-hot (the printed max{., 1} is a typo).
    q = targets.manipulate("teacher_amp", p, Y([0, 0]), delta=0.9)
    assert torch.allclose(q, T([[1.0, 0.0, 0.0]] * 2, dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_student_amp_hand_computed(dtype):
    # Eq. 5: the student's p_s = [0.6, 0.1, 0.3], delta = 0.2, y = 0:
    # q_0 = 0.8; q_1 = 0.1 * 0.2 / 0.4 = 0.05; q_2 = 0.3 * 0.2 / 0.4 = 0.15. p_t plays no part.
    p_s = T([[0.6, 0.1, 0.3]], dtype)
    expect = T([[0.8, 0.05, 0.15]], dtype)
    for p_t in (T([P_MINUS], dtype), T([P_PLUS], dtype)):
        q = targets.manipulate("student_amp", p_t, Y([0]), delta=0.2, p_student=p_s)
        assert torch.allclose(q, expect, rtol=0, atol=1e-6)


def test_teacher_amp_degenerate_rows():
    # p_k = 1: stays one-hot; p_k = 0: q_k = delta, the rest keeps its shape scaled by 1 - delta.
    p = T([[1.0, 0.0, 0.0], [0.0, 0.75, 0.25], [0.0, 1.0, 0.0]])
    q = targets.manipulate("teacher_amp", p, Y([0, 0, 0]), delta=0.2)
    assert torch.allclose(q, T([[1.0, 0.0, 0.0], [0.2, 0.6, 0.2], [0.2, 0.8, 0.0]]), atol=1e-12)


# Hand-built batch: which rows are correct / reg is known by construction.
#   row 0: teacher argmax 0 = y (correct);  p_t[y] 0.6 < p_s[y] 0.7 (reg)
#   row 1: correct;                         0.6 > 0.5 (not reg)
#   row 2: teacher argmax 1 != y = 2;      0.3 < 0.7 (reg)
#   row 3: incorrect;                       0.3 > 0.2 (not reg)
#   row 4: correct;                         0.6 == 0.6 (not reg: the test is strict)
SUB_PT = [[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3]]
SUB_PS = [[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2]]
SUB_Y = [0, 0, 2, 2, 1]
SUB_EXPECT = {
    "all": [1, 1, 1, 1, 1],
    "correct": [1, 1, 0, 0, 1],
    "not_correct": [0, 0, 1, 1, 0],
    "reg": [1, 0, 1, 0, 0],
    "not_reg": [0, 1, 0, 1, 1],
    "reg_cor": [1, 0, 0, 0, 0],
    "reg_not_cor": [0, 0, 1, 0, 0],
    "not_reg_cor": [0, 1, 0, 0, 1],
}


def test_subset_names_are_the_contract():
    assert set(targets.SUBSETS) == set(SUB_EXPECT)


@pytest.mark.parametrize("name", sorted(SUB_EXPECT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subsets_hand_built(name, dtype):
    mask = targets.subset_mask(name, T(SUB_PT, dtype), T(SUB_PS, dtype), Y(SUB_Y))
    assert mask.dtype == torch.bool
    assert mask.tolist() == [bool(v) for v in SUB_EXPECT[name]]


def test_subset_reg_direction_is_student_above_teacher():
    # Swapping teacher and student flips row 0 out of reg (METHOD.md: the printed y^t_k > y^t_k
    # is a typo; reg means the student is more confident on the true class than the teacher).
    swapped = targets.subset_mask("reg", T(SUB_PS), T(SUB_PT), Y(SUB_Y))
    assert swapped.tolist() == [False, True, False, True, False]


def test_subset_correct_uses_the_teacher_only():
    # a wrong student changes nothing about "correct"
    p_s = torch.roll(T(SUB_PS), 1, dims=1)
    mask = targets.subset_mask("correct", T(SUB_PT), p_s, Y(SUB_Y))
    assert mask.tolist() == [bool(v) for v in SUB_EXPECT["correct"]]


@PROPS
@given(batches())
def test_subsets_partition(b):
    m = {s: targets.subset_mask(s, b["p_w"], b["p_s"], b["y"]) for s in targets.SUBSETS}
    assert m["all"].all()
    assert torch.equal(m["not_correct"], ~m["correct"])
    assert torch.equal(m["not_reg"], ~m["reg"])
    assert torch.equal(m["reg_cor"] | m["reg_not_cor"], m["reg"])
    assert not (m["reg_cor"] & m["reg_not_cor"]).any()
    assert torch.equal(m["reg_cor"] | m["not_reg_cor"], m["correct"])
    assert not (m["reg_cor"] & m["not_reg_cor"]).any()
    # independent recomputation
    k = b["y"].view(-1, 1)
    correct = b["p_w"].argmax(1) == b["y"]
    reg = b["p_w"].gather(1, k).squeeze(1) < b["p_s"].gather(1, k).squeeze(1)
    assert torch.equal(m["correct"], correct) and torch.equal(m["reg"], reg)


# ---------------------------------------------------------------------------------------------
# 3. limits and invariants
# ---------------------------------------------------------------------------------------------

def _others_shape(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Non-true-class ratios: the row with the true class zeroed, renormalised."""
    o = p.double().scatter(1, y.view(-1, 1), 0.0)
    return o / o.sum(1, keepdim=True)


def _tp(p, y):
    return p.gather(1, y.view(-1, 1)).squeeze(1)


@PROPS
@given(batches())
def test_delta_zero_is_identity(b):
    for kind, p in (("teacher_amp", b["p_w"]), ("student_amp", b["p_s"])):
        q = targets.manipulate(kind, b["p_w"], b["y"], delta=0.0, p_student=b["p_s"])
        assert torch.allclose(q, p, rtol=0, atol=1e-6), kind


@PROPS
@given(batches())
def test_full_replacement_is_strong(b):
    assert torch.equal(targets.replace("full", b["p_w"], b["p_p"], b["y"]), b["p_p"])


@PROPS
@given(batches())
def test_confidence_and_partial_invariants(b):
    y, p_w, p_p = b["y"], b["p_w"], b["p_p"]
    tol = 1e-5 if b["dtype"] == torch.float32 else 1e-10
    qc = targets.replace("confidence", p_w, p_p, y)
    qp = targets.replace("partial", p_w, p_p, y)
    # confidence: takes t+'s true-class value, keeps t-'s non-true ratios
    assert torch.allclose(_tp(qc, y), _tp(p_p, y), rtol=0, atol=tol)
    # partial: keeps t-'s true-class value, takes t+'s non-true ratios
    assert torch.allclose(_tp(qp, y), _tp(p_w, y), rtol=0, atol=tol)
    for q, src, conf in ((qc, p_w, _tp(p_p, y)), (qp, p_p, _tp(p_w, y))):
        # every row where the source has any mass off the true class (also a tiny one) and the
        # target leaves some room for it
        rows = (src.double().scatter(1, y.view(-1, 1), 0.0).sum(1) > 0) & ((1 - conf.double()) > 1e-3)
        if rows.any():
            assert torch.allclose(_others_shape(q, y)[rows], _others_shape(src, y)[rows],
                                  rtol=0, atol=1e-4 if b["dtype"] == torch.float32 else 1e-9)


@PROPS
@given(batches(), st.floats(0.0, 1.0))
def test_teacher_amp_moves_confidence_by_delta(b, delta):
    y, p = b["y"], b["p_w"]
    q = targets.manipulate("teacher_amp", p, y, delta=delta)
    expect = torch.clamp(_tp(p, y).double() + delta, max=1.0)
    assert torch.allclose(_tp(q, y).double(), expect, rtol=0, atol=1e-6)
    rows = (p.double().scatter(1, y.view(-1, 1), 0.0).sum(1) > 0) & ((1 - expect) > 1e-3)
    if rows.any():
        assert torch.allclose(_others_shape(q, y)[rows], _others_shape(p, y)[rows], rtol=0, atol=1e-4)


@PROPS
@given(batches())
def test_label_smoothing_limits(b):
    y, p, n = b["y"], b["p_w"], b["n"]
    one = targets.manipulate("label_smoothing", p, y, t=1.0)
    assert torch.equal(one, torch.nn.functional.one_hot(y, n).to(p.dtype))
    uni = targets.manipulate("label_smoothing", p, y, t=1.0 / n)
    assert torch.allclose(uni, torch.full_like(p, 1.0 / n), rtol=0, atol=1e-6)
    # the teacher's probabilities play no part
    assert torch.equal(targets.manipulate("label_smoothing", b["p_p"], y, t=0.3),
                       targets.manipulate("label_smoothing", p, y, t=0.3))


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_unknown_names_suggest_the_nearest():
    p, y = T([P_MINUS]), Y([0])
    with pytest.raises(EffdstlError, match="did you mean 'reg_cor'"):
        targets.subset_mask("reg_corr", p, p, y)
    with pytest.raises(EffdstlError, match="did you mean 'confidence'"):
        targets.replace("confidense", p, p, y)
    with pytest.raises(EffdstlError, match="did you mean 'teacher_amp'"):
        targets.manipulate("teacher_ampp", p, y, delta=0.1)


@pytest.mark.parametrize("t", [None, 0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_label_smoothing_rejects_t_outside_unit_interval(t):
    with pytest.raises(EffdstlError):
        targets.manipulate("label_smoothing", T([P_MINUS]), Y([0]), t=t)


@pytest.mark.parametrize("kind", ["teacher_amp", "student_amp"])
@pytest.mark.parametrize("delta", [None, -1e-6, -0.5, float("nan")])
def test_amplification_rejects_negative_delta(kind, delta):
    with pytest.raises(EffdstlError):
        targets.manipulate(kind, T([P_MINUS]), Y([0]), delta=delta, p_student=T([P_PLUS]))


def test_student_amp_needs_the_student():
    with pytest.raises(EffdstlError, match="p_student"):
        targets.manipulate("student_amp", T([P_MINUS]), Y([0]), delta=0.1)
