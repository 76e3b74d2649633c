"""SGD for the CPU, step for step torch's ``torch.optim.SGD`` (its single-tensor path), without
its import cost.

Why: building the first ``torch.optim`` optimizer calls methods wrapped in ``torch._disable_dynamo``,
which imports ``torch._dynamo`` (2.7 s on 2 cores, measured in issue 20) — a fixed cost every CPU
training command paid for nothing. On the CPU torch steps SGD with ``_single_tensor_sgd`` (its
foreach path is for accelerators); this class runs the same tensor operations in the same order,
so the numbers are bit-identical (tests/test_engine.py holds it), and its ``state_dict`` has
torch's layout, so checkpoints move between the two either way. On an accelerator the engine keeps
``torch.optim.SGD`` (whose foreach kernels are what its numbers were measured with).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch

DEFAULTS = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
            "maximize": False, "foreach": None, "differentiable": False, "fused": None}


class SGD:
    """``torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov)`` for CPU tensors:
    ``param_groups``, ``state`` (``momentum_buffer`` per parameter), ``step``, ``zero_grad``,
    ``state_dict`` and ``load_state_dict`` as torch has them."""

    def __init__(self, params: Iterable[torch.Tensor], **kw: Any):
        unknown = set(kw) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"SGD got unexpected options {sorted(unknown)}")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        self.defaults = {**DEFAULTS, **kw}
        self.param_groups: list[dict[str, Any]] = [{**self.defaults, "params": params}]
        self.state: defaultdict[torch.Tensor, dict] = defaultdict(dict)

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            wd, mom, damp, lr = g["weight_decay"], g["momentum"], g["dampening"], float(g["lr"])
            for p in g["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if not g["maximize"] else -p.grad
                if wd != 0:
                    grad = grad.add(p, alpha=wd)
                if mom != 0:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = grad.detach().clone()
                        self.state[p]["momentum_buffer"] = buf
                    else:
                        buf.mul_(mom).add_(grad, alpha=1 - damp)
                    grad = grad.add(buf, alpha=mom) if g["nesterov"] else buf
                p.add_(grad, alpha=-lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False)
                    p.grad.zero_()

    def state_dict(self) -> dict:
        """torch's layout: parameters numbered across groups in order."""
        ids: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            for p in g["params"]:
                ids.setdefault(id(p), len(ids))
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": [ids[id(p)] for p in g["params"]]})
        state = {ids[id(p)]: dict(s) for p, s in self.state.items() if id(p) in ids}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        saved = sd["param_groups"]
        if len(saved) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(self.param_groups, saved)):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters")
        by_id = {i: p for a, b in zip(self.param_groups, saved) for i, p in zip(b["params"], a["params"])}
        self.state = defaultdict(dict)
        for i, s in sd["state"].items():
            p = by_id[int(i)]
            self.state[p] = {k: (v.to(dtype=p.dtype, device=p.device) if isinstance(v, torch.Tensor)
                                 and v.is_floating_point() else v) for k, v in s.items()}
        for a, b in zip(self.param_groups, saved):
            a.update({k: v for k, v in b.items() if k != "params"})
