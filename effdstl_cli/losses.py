"""Losses of the paper, each a scalar batch mean exactly as docs/METHOD.md defines it.

``z_*`` are logits (B, N); ``q`` a target distribution (B, N); ``labels`` (B,). Any N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .targets import EPS, subset_mask, true_prob


def soft_ce(z_s: Tensor, q: Tensor, tau: float = 1.0) -> Tensor:
    """``-sum q * log p_s(tau)``, times ``tau^2`` when ``tau != 1`` (docs/METHOD.md 'Losses')."""
    loss = -(q * F.log_softmax(z_s / tau, dim=1)).sum(1).mean()
    return loss * tau**2 if tau != 1.0 else loss


def soft_ce_rows(z_s: Tensor, q: Tensor, tau: float = 1.0) -> Tensor:
    """:func:`soft_ce` per row, not averaged: logits and targets of any leading shape (..., N)."""
    loss = -(q * F.log_softmax(z_s / tau, dim=-1)).sum(-1)
    return loss * tau**2 if tau != 1.0 else loss


def kd_loss(z_s: Tensor, z_t: Tensor, tau: float) -> Tensor:
    """Hinton KD: ``L_KD = -tau^2 * sum_k p_t,k(tau) log p_s,k(tau)`` (docs/METHOD.md 'Losses').

    The cross-entropy form: it differs from KL(p_t || p_s) by the teacher's entropy, a constant,
    so gradients are identical. Always tau^2-scaled, including tau = 1 (where it is a no-op).
    """
    p_t = F.softmax(z_t.detach() / tau, dim=1)
    return -(p_t * F.log_softmax(z_s / tau, dim=1)).sum(1).mean() * tau**2


def ls_ce(z: Tensor, labels: Tensor, smoothing: float = 0.1) -> Tensor:
    """Label-smoothed cross entropy: target ``(1 - s) * onehot + s / N``."""
    return F.cross_entropy(z, labels, label_smoothing=smoothing)


def wsl_weight(z_s: Tensor, z_t: Tensor, labels: Tensor, T: float = 2.0) -> Tensor:
    """WSL's per-sample weight ``w = 1 - exp(-max(CE_s / CE_t, 0))`` (detached; docs/METHOD.md 'WSL').

    ``CE_s = CE(z_s / T, y)``, ``CE_t = CE(z_t / T, y)``: both cross entropies at the temperature T,
    as the official ``wsl_loss.py`` computes them (docs/METHOD.md 'WSL').
    """
    with torch.no_grad():
        ce_s = F.cross_entropy(z_s.detach() / T, labels, reduction="none")
        ce_t = F.cross_entropy(z_t.detach() / T, labels, reduction="none")
        return 1.0 - torch.exp(-(ce_s / ce_t.clamp_min(EPS)).clamp_min(0.0))


def wsl_loss(z_s: Tensor, z_t: Tensor, labels: Tensor, T: float = 2.0) -> Tensor:
    """Weighted soft labels (Zhou et al. 2021, paper ref. [53]):
    ``L_WSL = T^2 * mean(w * (-sum p_t(T) * log p_s(T)))`` (docs/METHOD.md 'WSL')."""
    w = wsl_weight(z_s, z_t, labels, T)
    p_t = F.softmax(z_t.detach() / T, dim=1)
    per_row = -(p_t * F.log_softmax(z_s / T, dim=1)).sum(1)
    return T**2 * (w * per_row).mean()


def wsl_released_loss(z_s: Tensor, z_t: Tensor, labels: Tensor, T: float = 2.0) -> Tensor:
    """The soft loss of WSL as its authors released it (bellymonster/Weighted-Soft-Label-Distillation,
    ``knowledge_distiller.py``; docs/METHOD.md 'WSL as released'): the weights' cross entropies at
    T = 1 (not at T, as EffDstl's stage-1 variant :func:`wsl_weight` has them), their ratio over
    ``CE_t + 1e-7`` as the released code writes it, then ``T^2 * mean(w * (-sum p_t(T) log p_s(T)))``.
    """
    with torch.no_grad():
        ce_s = F.cross_entropy(z_s.detach(), labels, reduction="none")
        ce_t = F.cross_entropy(z_t.detach(), labels, reduction="none")
        w = 1.0 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp_min(0.0))
    p_t = F.softmax(z_t.detach() / T, dim=1)
    per_row = -(p_t * F.log_softmax(z_s / T, dim=1)).sum(1)
    return T**2 * (w * per_row).mean()


def ckm_mask(z_s: Tensor, z_t: Tensor, labels: Tensor, tau_t: float = 0.7, tau_s: float = 1.0,
             subset: str | None = "reg_cor") -> Tensor:
    """Rows CKM mines: teacher correct AND ``p_t[y] < p_s[y]`` (subset ``reg_cor``, Sec. 5.1).

    ``subset='reg'`` also mines incorrectly predicted rows (the Fig. 8 contrast); ``None`` mines
    nothing (the 'CKM off' ablation of Table 4).
    """
    if subset is None:
        return torch.zeros_like(labels, dtype=torch.bool)
    p_t = F.softmax(z_t.detach().float() / tau_t, dim=1)
    p_s = F.softmax(z_s.detach().float() / tau_s, dim=1)
    return subset_mask(subset, p_t, p_s, labels)


def ckm_target(labels: Tensor, n: int, smooth: float = 0.99, dtype: torch.dtype = torch.float32) -> Tensor:
    """CKM's target for a mined row: ``smooth * onehot + (1 - smooth) / N`` (rows sum to 1)."""
    b = labels.shape[0]
    q = torch.full((b, n), (1.0 - float(smooth)) / n, device=labels.device, dtype=dtype)
    return q.scatter_add_(1, labels.view(-1, 1), torch.full((b, 1), float(smooth), device=labels.device, dtype=dtype))


def ckm_loss(z_s: Tensor, z_t: Tensor, labels: Tensor, tau_t: float = 0.7, tau_s: float = 1.0,
             smooth: float = 0.99, subset: str | None = "reg_cor") -> Tensor:
    """Consistent knowledge mining, EffDstl's stage-2 loss (Sec. 5.1; docs/METHOD.md 'CKM').

    Mined rows: CE of ``p_s(tau_s)`` against ``smooth * onehot + (1 - smooth) / N`` — the official
    ``wsl_loss.py`` writes ``onehot * 0.99 + 0.01 / 1000`` for its 1000 classes (true class 0.99001,
    every other 1e-5); we use N (docs/METHOD.md 'CKM'). Other rows:
    ``-sum p_t(tau_t) * log p_s(tau_s)`` with no tau^2 factor. Mean over all rows.
    """
    n = z_s.shape[1]
    mined = ckm_mask(z_s, z_t, labels, tau_t, tau_s, subset)
    p_t = F.softmax(z_t.detach() / tau_t, dim=1)
    hard = ckm_target(labels, n, smooth, p_t.dtype)
    q = torch.where(mined.view(-1, 1), hard, p_t)
    return -(q * F.log_softmax(z_s / tau_s, dim=1)).sum(1).mean()


def _pairwise_dist(e: Tensor) -> Tensor:
    e = e - e.mean(0, keepdim=True)  # distances are translation-invariant; centring keeps fp32 exact
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * e @ e.t()).clamp_min(EPS).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_loss(f_s: Tensor, f_t: Tensor, w_dist: float = 25.0, w_angle: float = 50.0) -> Tensor:
    """Relational KD (Park et al. 2019): distance + angle on penultimate features.

    Distances are normalized by their mean over distinct pairs; angles are cosines between the
    difference vectors of every triplet; both compared with smooth-L1. Student and teacher
    feature widths may differ (only relations are compared).
    """
    f_s, f_t = f_s.float().flatten(1), f_t.detach().float().flatten(1)
    b = len(f_s)
    if b < 2:
        return f_s.sum() * 0.0
    off = b * (b - 1)
    with torch.no_grad():
        d_t = _pairwise_dist(f_t)
        d_t = d_t / (d_t.sum() / off).clamp_min(EPS)
    d_s = _pairwise_dist(f_s)
    d_s = d_s / (d_s.sum() / off).clamp_min(EPS)
    loss_d = F.smooth_l1_loss(d_s, d_t)

    def angles(e: Tensor) -> Tensor:
        v = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(v, v.transpose(1, 2)).view(-1)

    with torch.no_grad():
        a_t = angles(f_t)
    loss_a = F.smooth_l1_loss(angles(f_s), a_t)
    return w_dist * loss_d + w_angle * loss_a


__all__ = ["soft_ce", "kd_loss", "ls_ce", "wsl_weight", "wsl_loss", "wsl_released_loss", "ckm_mask", "ckm_target", "ckm_loss",
           "rkd_loss", "true_prob"]
