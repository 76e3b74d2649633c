"""The paper's soft-target algebra as pure tensor functions (docs/METHOD.md, Sec. 4).

Probabilities in, probabilities out; batched over rows; no autograd side effects (inputs are
detached). Every output row is finite, >= 0 and sums to 1, also when a teacher is certain
(p_k = 1) or gives the true class nothing (p_k = 0): every division is guarded, and the
degenerate ``0/0`` case falls back to spreading the mass evenly, which is the limit that keeps a
row a distribution.

Notation (docs/METHOD.md): ``k = y`` is the true class; ``p_-`` the weak teacher, ``p_+`` the strong one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import EffdstlError, unknown

EPS = 1e-12

SUBSETS = ("all", "correct", "not_correct", "reg", "not_reg", "reg_cor", "reg_not_cor", "not_reg_cor")
SCHEMES = ("full", "partial", "confidence")
MANIPULATIONS = ("label_smoothing", "teacher_amp", "student_amp")


def true_prob(p: Tensor, labels: Tensor) -> Tensor:
    """``p[i, y_i]`` as a (B,) tensor."""
    return p.gather(1, labels.view(-1, 1)).squeeze(1)


def _onehot(labels: Tensor, p: Tensor) -> Tensor:
    return torch.zeros_like(p).scatter_(1, labels.view(-1, 1), 1.0)


def subset_mask(name: str, p_teacher: Tensor, p_student: Tensor, labels: Tensor) -> Tensor:
    """Which rows belong to subset ``name`` (docs/METHOD.md 'Sample subsets'; Sec. 4.1, Fig. 4).

    correct: the (weak) teacher's argmax is the label. reg ("regularization sample"):
    ``p_t[y] < p_s[y]`` — the printed ``y^t_k > y^t_k`` is a typo (docs/METHOD.md). Recomputed every
    batch, since it depends on the student as it trains.
    """
    return subset_masks([name], p_teacher, p_student.unsqueeze(0), labels)[0]


def subset_masks(names: list[str], p_teacher: Tensor, p_student: Tensor, labels: Tensor) -> Tensor:
    """:func:`subset_mask` for R students at once: ``p_student`` (R, B, N), one subset name per
    student -> (R, B). The same definitions, computed once for every subset and then picked."""
    for n in names:
        if n not in SUBSETS:
            raise unknown("subset", n, SUBSETS)
    p_teacher, p_student = p_teacher.detach(), p_student.detach()
    r = p_student.shape[0]
    correct = (p_teacher.argmax(1) == labels).expand(r, -1)
    reg = true_prob(p_teacher, labels) < p_student.gather(2, labels.view(1, -1, 1).expand(r, -1, 1)).squeeze(2)
    table = torch.stack([torch.ones_like(reg), correct, ~correct, reg, ~reg, reg & correct, reg & ~correct,
                         ~reg & correct])  # in the order of SUBSETS
    if len(set(names)) == 1:  # no index tensor: one subset for all (and the single-student path)
        return table[SUBSETS.index(names[0])]
    return torch.stack([table[SUBSETS.index(n), i] for i, n in enumerate(names)])  # views: no host copy


def _rescale_others(p_src: Tensor, labels: Tensor, q_k: Tensor, src_k: Tensor) -> Tensor:
    """Row with ``q_k`` on the true class and ``p_src``'s non-true classes rescaled to fill
    ``1 - q_k``: ``q_i = p_src,i * (1 - q_k) / (1 - src_k)``. The shared core of Eq. 1, 2, 4, 5.

    When ``p_src`` has no mass off the true class (``src_k = 1``) the ratio is 0/0; the limit that
    keeps a distribution is to spread ``1 - q_k`` evenly over the other classes. Only an exact 0
    takes that path: a tiny but positive mass (a teacher with a logit margin > ~28, e.g. 1e-13)
    still has a well-defined shape, and ``others / mass`` is exact there (each ``others_i <= mass``),
    whereas clamping the denominator at ``EPS`` would make such a row sum to ``mass / EPS < 1``.
    """
    n = p_src.shape[1]
    onehot = _onehot(labels, p_src)
    others = p_src * (1.0 - onehot)
    mass = others.sum(1, keepdim=True)  # = 1 - src_k, computed without cancellation
    even = (1.0 - onehot) / max(n - 1, 1)
    has_mass = mass > 0
    shape = torch.where(has_mass, others / torch.where(has_mass, mass, torch.ones_like(mass)), even)
    q = shape * (1.0 - q_k).clamp_min(0.0).unsqueeze(1)
    return q + onehot * q_k.unsqueeze(1)


def replace(scheme: str, p_weak: Tensor, p_strong: Tensor, labels: Tensor) -> Tensor:
    """Replace the weak teacher's target with the strong one's (Sec. 4.1, Fig. 3), every row.

    full:       ``q = p_+``.
    partial:    ``q_k = p_-,k``; others from ``p_+`` rescaled to ``1 - p_-,k``      (Eq. 1)
    confidence: ``q_k = p_+,k``; others from ``p_-`` rescaled to ``1 - p_+,k``      (Eq. 2)
    The caller masks rows with :func:`apply_on`.
    """
    p_weak, p_strong = p_weak.detach(), p_strong.detach()
    if scheme == "full":
        return p_strong.clone()
    if scheme == "partial":  # Eq. 1: keep t-'s confidence, t+'s distribution over the rest
        return _rescale_others(p_strong, labels, true_prob(p_weak, labels), true_prob(p_strong, labels))
    if scheme == "confidence":  # Eq. 2: take t+'s confidence, keep t-'s distribution over the rest
        return _rescale_others(p_weak, labels, true_prob(p_strong, labels), true_prob(p_weak, labels))
    raise unknown("replacement scheme", scheme, SCHEMES)


def manipulate(kind: str, p: Tensor, labels: Tensor, *, t: float | None = None,
               delta: float | None = None, p_student: Tensor | None = None) -> Tensor:
    """Alter one teacher's target without a second teacher (Sec. 4.2, Fig. 6), every row.

    label_smoothing(t): ``q_k = t``; ``q_i = (1 - t) / (N - 1)``                    (Eq. 3)
    teacher_amp(delta): ``q_k = min(p_k + delta, 1)``; ``q_i = p_i (1 - q_k) / (1 - p_k)``  (Eq. 4)
    student_amp(delta): Eq. 4 with the (detached) student's ``p_s`` in place of ``p_t``     (Eq. 5)
    The printed Eq. 4/5 say ``max{., 1}`` and invert the ratio; both are typos (docs/METHOD.md).
    """
    p = p.detach()
    if kind == "label_smoothing":
        if t is None or not (0.0 < float(t) <= 1.0):
            raise EffdstlError(f"label_smoothing needs t in (0, 1], got {t}")
        n = p.shape[1]
        q = torch.full_like(p, (1.0 - float(t)) / max(n - 1, 1))
        return q.scatter_(1, labels.view(-1, 1), float(t))
    if kind in ("teacher_amp", "student_amp"):
        if delta is None or not float(delta) >= 0.0:
            raise EffdstlError(f"{kind} needs delta >= 0, got {delta}")
        if kind == "student_amp":
            if p_student is None:
                raise EffdstlError("student_amp needs the student's probabilities (p_student)")
            p = p_student.detach()
        p_k = true_prob(p, labels)
        return _rescale_others(p, labels, (p_k + float(delta)).clamp(max=1.0), p_k)
    raise unknown("manipulation", kind, MANIPULATIONS)


def apply_on(mask: Tensor, altered: Tensor, original: Tensor) -> Tensor:
    """Rows of ``altered`` where ``mask``, rows of ``original`` elsewhere (detached, like every
    target in this module: a soft target carries no autograd graph)."""
    return torch.where(mask.view(-1, 1), altered.detach(), original.detach())
