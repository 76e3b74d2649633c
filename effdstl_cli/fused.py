"""Horizontal fusion: K students of one architecture trained as one model (HFTA, MLSys 2021).

A Fig. 5 triplet is 17 small students of the same architecture that see the same batches. Stepped
one after another they are launch-bound on a GPU; fused, every layer holds the K copies side by
side and runs as one kernel:

* ``Conv2d(C, D, groups=g)``  -> ``Conv2d(K*C, K*D, groups=K*g)``; the first layer reads the shared
  input once (a plain convolution with K*D output channels);
* ``Linear(C, D)``            -> one GEMM on the shared input, else one ``baddbmm`` over the K copies;
* ``BatchNorm(C)``            -> ``BatchNorm(K*C)``: per-channel statistics are per-student statistics.

Activations keep one layout throughout: the K students' channels side by side in the channel
dimension, student-major (``[s0 c0..cC-1, s1 c0..cC-1, ...]``), so element-wise layers, pooling,
residual additions and flattening work unchanged. Every fused tensor is the concatenation of the K
students' tensors along dim 0 (scalars such as ``num_batches_tracked`` are shared), and parameters
keep their names and order, so a student's state dict and its SGD momentum are slices of the fused
ones: checkpoints stay per student. SGD with momentum and weight decay acts per element, so one
optimizer over the fused parameters is exactly K optimizers.

Which layers can be fused is decided by module type (parameters only in Conv2d, Linear and
BatchNorm; no dropout), and *that the forward code does not mix channels across students* nor
draws randomness is checked on a probe batch (:func:`fuse`). Anything else raises :class:`NotFusable` and the engine steps those students in a loop.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fusion import FUSE_MODES, family, policy  # noqa: F401 - torch-free (planning); re-exported


class NotFusable(Exception):
    """Why a group's students cannot be fused (the engine then loops over them)."""


# -- fused layers --------------------------------------------------------------------------------

class FusedConv2d(nn.Conv2d):
    """K ``Conv2d(C, D, groups=g)`` as ``Conv2d(K*C, K*D, groups=K*g)``; on the shared input
    (C channels) one convolution with K*D outputs."""

    def __init__(self, src: nn.Conv2d, k: int):
        if src.padding_mode != "zeros":
            raise NotFusable(f"Conv2d with padding_mode={src.padding_mode}")
        super().__init__(k * src.in_channels, k * src.out_channels, src.kernel_size, src.stride, src.padding,
                         src.dilation, k * src.groups, src.bias is not None, device=src.weight.device,
                         dtype=src.weight.dtype)
        self.k, self.src_in, self.src_groups = k, src.in_channels, src.groups

    def forward(self, x):
        if x.shape[1] == self.src_in:  # the shared input (first layer): read once
            if self.src_groups == 1:
                return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, 1)
            x = x.repeat(1, self.k, 1, 1)
        return super().forward(x)


class FusedLinear(nn.Module):
    """K ``Linear(C, D)``: weight (K*D, C), bias (K*D,); input (..., C) shared or (..., K*C) fused."""

    def __init__(self, src: nn.Linear, k: int):
        super().__init__()
        self.k, self.in_features, self.out_features = k, src.in_features, src.out_features
        kw = dict(device=src.weight.device, dtype=src.weight.dtype)
        self.weight = nn.Parameter(torch.empty(k * src.out_features, src.in_features, **kw))
        self.bias = nn.Parameter(torch.empty(k * src.out_features, **kw)) if src.bias is not None else None

    def forward(self, x):
        if x.shape[-1] == self.in_features:  # shared input: one GEMM with K*D outputs
            return F.linear(x, self.weight, self.bias)
        lead, k, c, d = x.shape[:-1], self.k, self.in_features, self.out_features
        xk = x.reshape(-1, k, c).transpose(0, 1)                       # (K, M, C), a strided view
        w = self.weight.view(k, d, c).transpose(1, 2)                  # (K, C, D)
        if self.bias is None:
            y = torch.bmm(xk, w)
        else:
            y = torch.baddbmm(self.bias.view(k, 1, d), xk, w)          # (K, M, D)
        return y.transpose(0, 1).reshape(*lead, k * d)


def _fused_bn(src: nn.modules.batchnorm._BatchNorm, k: int) -> nn.Module:
    """A BatchNorm (or a subclass such as timm's BatchNormAct2d, whose forward reads the same
    attributes) over K*C channels: a copy of ``src`` with K-fold parameters and statistics."""
    new = copy.deepcopy(src)
    new.num_features = k * src.num_features
    for name, t in list(src.named_parameters(recurse=False)):
        setattr(new, name, nn.Parameter(t.detach().repeat(k)))
    for name, t in list(src.named_buffers(recurse=False)):
        if t is not None and t.dim() == 1:
            setattr(new, name, t.repeat(k))
    return new


def _fused_layer(mod: nn.Module, k: int) -> nn.Module | None:
    t = type(mod)
    if t is nn.Conv2d:
        return FusedConv2d(mod, k)
    if t is nn.Linear:
        return FusedLinear(mod, k)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not isinstance(mod, nn.SyncBatchNorm):
        return _fused_bn(mod, k)
    return None


def _check_module(name: str, mod: nn.Module) -> None:
    """Refuse what fusion cannot reproduce: parameters or buffers in a layer it does not know,
    and randomness (dropout draws one mask for all K students; the loop draws K)."""
    own = [n for n, _ in mod.named_parameters(recurse=False)]
    own += [n for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set]
    if own:
        raise NotFusable(f"layer {name or 'model'} ({type(mod).__name__}) holds {own[0]}")
    p = getattr(mod, "p", None) if isinstance(mod, nn.modules.dropout._DropoutNd) else getattr(mod, "drop_prob", None)
    if p:
        raise NotFusable(f"layer {name} ({type(mod).__name__}) is random (p={p})")


def fused_copy(model: nn.Module, k: int) -> nn.Module:
    """``model``'s architecture with every Conv2d/Linear/BatchNorm holding K copies (uninitialised)."""
    net = copy.deepcopy(model)
    for name, mod in list(net.named_modules()):
        new = _fused_layer(mod, k)
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, new)
        else:
            _check_module(name, mod)
    return net


# -- state: fused <-> per student ----------------------------------------------------------------

def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The fused tensor of K students' tensors: concatenated along dim 0; scalars are shared."""
    if tensors[0].dim() == 0:
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise NotFusable("students differ in a scalar state (e.g. BatchNorm's num_batches_tracked)")
        return tensors[0].clone()
    return torch.cat(tensors, 0)


def part(fused: torch.Tensor, k: int, i: int) -> torch.Tensor:
    """Student ``i``'s slice of a fused tensor (a view)."""
    if fused.dim() == 0:
        return fused
    n = fused.shape[0] // k
    return fused[i * n:(i + 1) * n]


class FusedStudents(nn.Module):
    """K students as one module: ``forward(x)`` -> logits (K, B, N); with ``features=True`` also
    penultimate features (K, B, D). Wraps a fused copy of an effdstl ``Net`` (pixel-space input,
    normalization inside), so it takes exactly what a student takes."""

    def __init__(self, net: nn.Module, k: int):
        super().__init__()
        self.net, self.k = net, k

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b = t.shape[0]
        return t.reshape(b, self.k, -1).transpose(0, 1)

    def forward(self, x, features: bool = False):
        if not features:
            return self._split(self.net(x))
        z, f = self.net(x, features=True)
        return self._split(z), self._split(f)

    @torch.no_grad()
    def load_students(self, models: list[nn.Module]) -> None:
        sds = [m.state_dict() for m in models]
        for name, t in self.net.state_dict().items():
            t.copy_(stack([sd[name] for sd in sds]).to(t.dtype))

    @torch.no_grad()
    def store_students(self, models: list[nn.Module]) -> None:
        """Write the fused weights back into the K student modules (for evaluation and checkpoints)."""
        fused = self.net.state_dict()
        for i, m in enumerate(models):
            for name, t in m.state_dict().items():
                t.copy_(part(fused[name], self.k, i))


def fuse(models: list[nn.Module], probe: torch.Tensor, features: bool = False) -> FusedStudents:
    """Fuse K >= 2 students of one architecture, after checking on ``probe`` (a small input batch)
    that the fused forward equals the K forwards (both in eval mode, fp32, TF32 off) on K copies
    perturbed apart — identical students would hide a layer that mixes channels across students —
    and that two train-mode passes with different seeds agree (no randomness, which fusion would
    share across students). Raises NotFusable with the reason."""
    k = len(models)
    if k < 2:
        raise NotFusable("a single student")
    keys = [list(m.state_dict()) for m in models]
    if any(kk != keys[0] for kk in keys[1:]) or any(type(m) is not type(models[0]) for m in models):
        raise NotFusable("students differ in architecture")
    if any(getattr(m, "spec", None) != getattr(models[0], "spec", None) for m in models):
        raise NotFusable("students differ in model spec")
    fused = FusedStudents(fused_copy(models[0], k), k)
    _check_equal(models, fused, probe, features)
    fused.load_students(models)
    return fused


@torch.no_grad()
def _check_equal(models, fused: FusedStudents, probe: torch.Tensor, features: bool) -> None:
    gen = torch.Generator().manual_seed(12345)
    copies = []
    for m in models:
        c = copy.deepcopy(m).eval()
        for name, t in c.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.rand(t.shape, generator=gen).to(t.device, t.dtype)
            if name.endswith("running_var"):  # stays positive
                t.mul_(r + 0.5)
            else:
                sd = float(t.float().std()) if t.numel() > 1 else 0.0
                t.add_((r - 0.5) * (sd + 0.1))
        copies.append(c)
    fused.load_students(copies)
    fused.eval()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        try:
            got = fused(probe, features=True) if features else (fused(probe),)
        except Exception as exc:  # a shape the fused layout cannot take
            raise NotFusable(f"the fused forward fails ({type(exc).__name__}: {str(exc)[:120]})") from None
        want = [c(probe, features=True) if features else (c(probe),) for c in copies]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        fused.train()
    # Randomness (dropout, stochastic depth, functional dropout in a forward) draws one mask for all K
    # students where the loop draws K: two train-mode passes with different seeds must agree.
    devices = [probe.device] if probe.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        outs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append(fused(probe).float())
    if (outs[0] - outs[1]).abs().max() > 1e-3 * (outs[0].abs().max() + 1e-6):  # not kernel rounding
        raise NotFusable("the model is random in training (dropout or stochastic depth)")
    for j, g in enumerate(got):
        ref = torch.stack([w[j].float() for w in want])
        if g.shape != ref.shape:
            raise NotFusable(f"the fused forward gives shape {tuple(g.shape)}, not {tuple(ref.shape)}")
        # A layer that mixes students errs by about the students' spread; fp32 rounding (another
        # summation order in grouped kernels) by ~1e-6 of the activations: 1 % separates them.
        err = (g.float() - ref).abs().max().item()
        spread = (ref - ref.mean(0)).abs().max().item()
        if not err <= 1e-2 * spread:
            raise NotFusable(f"the fused forward differs from the students' by {err:.2g} (their spread "
                             f"{spread:.2g}): the model mixes channels across students")
