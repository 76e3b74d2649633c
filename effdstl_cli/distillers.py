"""One small class per target rule (mdistiller-style).

A distiller turns (student logits, student features, teacher outputs, labels) into
``{loss name: value}``; the engine only sums. Adding a scheme means adding one class here and
registering it. Parameters are validated when the distiller is built, so a typo in a study file
fails before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import losses, targets
from .errors import EffdstlError, unknown


@dataclass
class TeacherOut:
    logits: Tensor
    features: Tensor | None = None


class Distiller:
    """Base: ``params`` are validated against ``DEFAULTS``; subclasses implement ``losses``."""

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    needs_features: ClassVar[bool] = False

    def __init__(self, **params: Any):
        extra = set(params) - set(self.DEFAULTS) - {"name"}
        if extra:
            key = sorted(extra)[0]
            raise unknown(f"parameter of distiller '{self.name}'", key, self.DEFAULTS)
        self.p = {**self.DEFAULTS, **{k: v for k, v in params.items() if k != "name"}}
        self.validate()

    # -- helpers -------------------------------------------------------------------------
    def validate(self) -> None:
        for key in ("tau", "T", "tau_t", "tau_s", "lam", "t", "delta", "smooth", "ls", "w_ce", "w_wsl",
                    "w_dist", "w_angle"):
            v = self.p.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise EffdstlError(f"distiller '{self.name}': {key} must be a number, got {v!r}")
        for key in ("tau", "T", "tau_t", "tau_s"):
            if key in self.p and not float(self.p[key]) > 0:
                raise EffdstlError(f"distiller '{self.name}': {key} must be > 0, got {self.p[key]}")
        if "lam" in self.p and not 0.0 <= float(self.p["lam"]) <= 1.0:
            raise EffdstlError(f"distiller '{self.name}': lam must be in [0, 1], got {self.p['lam']}")

    @property
    def teachers(self) -> tuple[str, ...]:
        """Names of the teachers this distiller reads (the engine runs only those)."""
        return tuple(self.p[k] for k in ("teacher", "strong") if self.p.get(k))

    def losses(self, z_s: Tensor, f_s: Tensor | None, t: dict[str, TeacherOut], y: Tensor
               ) -> tuple[dict[str, Tensor], Tensor | None]:
        """-> ({loss name: scalar}, mask of the altered subset or None)."""
        raise NotImplementedError

    # -- many students at once (a fused group) --------------------------------------------------
    def batch_key(self) -> tuple | None:
        """Distillers of one class with equal keys compute their losses together in
        :meth:`losses_many` (one set of ops for R students); None: one by one."""
        return None

    @classmethod
    def losses_many(cls, ds: list["Distiller"], z_s: Tensor, f_s: Tensor | None, t: dict[str, TeacherOut],
                    y: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """R students' losses from logits (R, B, N): ({loss name: (R,)}, masks (R, B) or None),
        equal to R calls of :meth:`losses`. Only for distillers sharing :meth:`batch_key`."""
        raise NotImplementedError

    @staticmethod
    def _soft_many(lam: float, tau: float, z_s: Tensor, y: Tensor, q: Tensor) -> dict[str, Tensor]:
        """:meth:`_soft` for (R, B, N) logits and targets: each term per student, shape (R,)."""
        out = {}
        if lam < 1.0:
            ce = F.cross_entropy(z_s.transpose(1, 2), y.expand(z_s.shape[0], -1), reduction="none")
            out["ce"] = (1.0 - lam) * ce.mean(1)
        if lam > 0.0:
            out["kd"] = lam * losses.soft_ce_rows(z_s, q, tau).mean(-1)
        return out

    def _soft(self, z_s: Tensor, y: Tensor, q: Tensor) -> dict[str, Tensor]:
        """``(1 - lam) * CE + lam * soft-CE(q, tau)`` (docs/METHOD.md 'Losses'); zero terms omitted."""
        lam, tau = float(self.p["lam"]), float(self.p["tau"])
        out = {}
        if lam < 1.0:
            out["ce"] = (1.0 - lam) * F.cross_entropy(z_s, y)
        if lam > 0.0:
            out["kd"] = lam * losses.soft_ce(z_s, q, tau)
        return out


class NoDistill(Distiller):
    """Plain training on labels (the 'no distillation' baseline and teacher training)."""

    name = "none"
    DEFAULTS = {"ls": 0.0}

    def losses(self, z_s, f_s, t, y):
        return {"ce": losses.ls_ce(z_s, y, float(self.p["ls"]))}, None


class KD(Distiller):
    """Hinton KD from one teacher: ``(1 - lam) CE + lam * L_KD(tau)``."""

    name = "kd"
    DEFAULTS = {"teacher": "weak", "tau": 1.0, "lam": 1.0}

    def losses(self, z_s, f_s, t, y):
        z_t = t[self.p["teacher"]].logits.float()
        return self._soft(z_s, y, F.softmax(z_t / float(self.p["tau"]), dim=1)), None


class WSL(Distiller):
    """EffDstl stage 1: ``w_ce * CE_LS(ls) + w_wsl * L_WSL(T)`` (docs/METHOD.md 'WSL')."""

    name = "wsl"
    DEFAULTS = {"teacher": "weak", "T": 2.0, "ls": 0.1, "w_ce": 1.0, "w_wsl": 0.5}

    def losses(self, z_s, f_s, t, y):
        z_t = t[self.p["teacher"]].logits.float()
        return {"ce_ls": float(self.p["w_ce"]) * losses.ls_ce(z_s, y, float(self.p["ls"])),
                "wsl": float(self.p["w_wsl"]) * losses.wsl_loss(z_s, z_t, y, float(self.p["T"]))}, None


class CKM(Distiller):
    """EffDstl stage 2: consistent knowledge mining only (Sec. 5.1). ``subset: null`` = CKM off."""

    name = "ckm"
    DEFAULTS = {"teacher": "strong", "tau_t": 0.7, "tau_s": 1.0, "smooth": 0.99, "subset": "reg_cor"}

    def validate(self):
        super().validate()
        if self.p["subset"] is not None and self.p["subset"] not in targets.SUBSETS:
            raise unknown("subset", self.p["subset"], targets.SUBSETS)
        if not 0.0 < float(self.p["smooth"]) <= 1.0:
            raise EffdstlError(f"distiller 'ckm': smooth must be in (0, 1], got {self.p['smooth']}")

    def losses(self, z_s, f_s, t, y):
        z_t = t[self.p["teacher"]].logits.float()
        kw = dict(tau_t=float(self.p["tau_t"]), tau_s=float(self.p["tau_s"]), subset=self.p["subset"])
        mask = losses.ckm_mask(z_s, z_t, y, **kw)
        return {"ckm": losses.ckm_loss(z_s, z_t, y, smooth=float(self.p["smooth"]), **kw)}, mask


class RKD(Distiller):
    """Relational KD baseline: ``CE + RKD(distance, angle)`` on penultimate features."""

    name = "rkd"
    DEFAULTS = {"teacher": "weak", "w_ce": 1.0, "w_dist": 25.0, "w_angle": 50.0}
    needs_features = True

    def losses(self, z_s, f_s, t, y):
        f_t = t[self.p["teacher"]].features
        return {"ce": float(self.p["w_ce"]) * F.cross_entropy(z_s, y),
                "rkd": losses.rkd_loss(f_s, f_t, float(self.p["w_dist"]), float(self.p["w_angle"]))}, None


class Replace(Distiller):
    """Fig. 5: the weak teacher's target, replaced by the strong one's on a subset (Eq. 1, 2)."""

    name = "replace"
    DEFAULTS = {"teacher": "weak", "strong": "strong", "scheme": "full", "subset": "all",
                "tau": 1.0, "lam": 1.0}

    def validate(self):
        super().validate()
        if self.p["scheme"] not in targets.SCHEMES:
            raise unknown("replacement scheme", self.p["scheme"], targets.SCHEMES)
        if self.p["subset"] not in targets.SUBSETS:
            raise unknown("subset", self.p["subset"], targets.SUBSETS)

    def losses(self, z_s, f_s, t, y):
        tau = float(self.p["tau"])
        p_w = F.softmax(t[self.p["teacher"]].logits.float() / tau, dim=1)
        p_p = F.softmax(t[self.p["strong"]].logits.float() / tau, dim=1)
        p_s = F.softmax(z_s.detach().float() / tau, dim=1)
        # Subsets come from the teacher being altered (t-), recomputed every batch (docs/METHOD.md).
        mask = targets.subset_mask(self.p["subset"], p_w, p_s, y)
        q = targets.apply_on(mask, targets.replace(self.p["scheme"], p_w, p_p, y), p_w)
        return self._soft(z_s, y, q), mask

    def batch_key(self):
        return (self.p["teacher"], self.p["strong"], float(self.p["tau"]), float(self.p["lam"]))

    @classmethod
    def losses_many(cls, ds, z_s, f_s, t, y):
        """A Fig. 5 triplet's replacement students at once: each scheme's target is computed once
        (it does not depend on the student), the subsets from one comparison per row."""
        p0 = ds[0].p
        tau = float(p0["tau"])
        p_w = F.softmax(t[p0["teacher"]].logits.float() / tau, dim=1)
        p_p = F.softmax(t[p0["strong"]].logits.float() / tau, dim=1)
        p_s = F.softmax(z_s.detach().float() / tau, dim=-1)
        mask = targets.subset_masks([d.p["subset"] for d in ds], p_w, p_s, y)
        alt = {sc: targets.replace(sc, p_w, p_p, y) for sc in {d.p["scheme"] for d in ds}}
        q = torch.where(mask.unsqueeze(-1), torch.stack([alt[d.p["scheme"]] for d in ds]), p_w)
        return cls._soft_many(float(p0["lam"]), tau, z_s, y, q), mask


class Manipulate(Distiller):
    """Fig. 6: label smoothing / teacher or student amplification on a subset (Eq. 3-5)."""

    name = "manipulate"
    DEFAULTS = {"teacher": "weak", "kind": "teacher_amp", "subset": "all", "t": None, "delta": None,
                "tau": 1.0, "lam": 1.0}

    def validate(self):
        super().validate()
        kind = self.p["kind"]
        if kind not in targets.MANIPULATIONS:
            raise unknown("manipulation", kind, targets.MANIPULATIONS)
        if self.p["subset"] not in targets.SUBSETS:
            raise unknown("subset", self.p["subset"], targets.SUBSETS)
        if kind == "label_smoothing":
            t = self.p["t"]
            if t is None or not 0.0 < float(t) <= 1.0:
                raise EffdstlError(f"label_smoothing needs t in (0, 1], got {t}")
        else:
            d = self.p["delta"]
            if d is None or not float(d) >= 0.0:
                raise EffdstlError(f"{kind} needs delta >= 0, got {d}")

    def losses(self, z_s, f_s, t, y):
        tau = float(self.p["tau"])
        p_t = F.softmax(t[self.p["teacher"]].logits.float() / tau, dim=1)
        p_s = F.softmax(z_s.detach().float() / tau, dim=1)
        mask = targets.subset_mask(self.p["subset"], p_t, p_s, y)
        alt = targets.manipulate(self.p["kind"], p_t, y, t=self.p["t"], delta=self.p["delta"], p_student=p_s)
        return self._soft(z_s, y, targets.apply_on(mask, alt, p_t)), mask

    def batch_key(self):
        return (self.p["teacher"], float(self.p["tau"]), float(self.p["lam"]))

    @classmethod
    def losses_many(cls, ds, z_s, f_s, t, y):
        """A Fig. 6 sweep's students at once: one target per distinct manipulation (student
        amplification: per student, from its own probabilities), the subsets in one go."""
        p0 = ds[0].p
        tau = float(p0["tau"])
        p_t = F.softmax(t[p0["teacher"]].logits.float() / tau, dim=1)
        p_s = F.softmax(z_s.detach().float() / tau, dim=-1)
        mask = targets.subset_masks([d.p["subset"] for d in ds], p_t, p_s, y)
        alt, rows = {}, []
        for i, d in enumerate(ds):
            if d.p["kind"] == "student_amp":
                rows.append(targets.manipulate("student_amp", p_t, y, delta=d.p["delta"], p_student=p_s[i]))
                continue
            key = (d.p["kind"], d.p["t"], d.p["delta"])
            if key not in alt:
                alt[key] = targets.manipulate(d.p["kind"], p_t, y, t=d.p["t"], delta=d.p["delta"])
            rows.append(alt[key])
        q = torch.where(mask.unsqueeze(-1), torch.stack(rows), p_t)
        return cls._soft_many(float(p0["lam"]), tau, z_s, y, q), mask


REGISTRY: dict[str, type[Distiller]] = {
    cls.name: cls for cls in (NoDistill, KD, WSL, CKM, RKD, Replace, Manipulate)
}


def build_distiller(spec: dict[str, Any]) -> Distiller:
    """``{'name': 'replace', 'scheme': 'full', ...}`` -> a validated distiller."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise EffdstlError(f"a distiller needs a 'name' (one of {', '.join(REGISTRY)}), got {spec!r}")
    name = spec["name"]
    if name not in REGISTRY:
        raise unknown("distiller", name, REGISTRY)
    return REGISTRY[name](**spec)
