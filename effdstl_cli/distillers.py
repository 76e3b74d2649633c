"""One small class per target rule (mdistiller-style).

A distiller turns (student logits, student features, teacher outputs, labels) into
``{loss name: value}``; the engine only sums. A new target rule is one class here (listed in
``REGISTRY``); what others need to know about it (its default teacher, whether it alters a subset)
are its class attributes. Schemes, subsets and manipulations live in ``targets``' registries.
Parameters are validated when the distiller is built, so a typo in a study file
fails before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from . import targets
from .errors import EffdstlError, unknown
from .lazy import LazyModule

if TYPE_CHECKING:
    from torch import Tensor

# Imported when a loss is first computed: planning builds distillers (a study's names and
# parameters are validated before anything trains) and must not pay for torch.
torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")
losses = LazyModule(f"{__package__}.losses")


@dataclass
class TeacherOut:
    logits: Tensor
    features: Tensor | None = None


class Distiller:
    """Base: ``params`` are validated against :meth:`defaults`; subclasses implement ``losses``.

    What the rest of the code asks a distiller, it asks the class: ``default_teacher`` (the
    teacher it reads when a spec names none; None: it reads no teacher), ``alters_subset`` (its
    target is altered on a sample subset: what an FGSM probe can attack), ``needs_features``.
    """

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    default_teacher: ClassVar[str | None] = None
    alters_subset: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    NUMBERS: ClassVar[tuple[str, ...]] = ("tau", "T", "tau_t", "tau_s", "lam", "smooth", "ls", "w_ce", "w_wsl",
                                          "w_dist", "w_angle", "alpha")

    def __init__(self, **params: Any):
        defaults = self.defaults()
        extra = set(params) - set(defaults) - {"name"}
        if extra:
            key = sorted(extra)[0]
            raise unknown(f"parameter of distiller '{self.name}'", key, defaults)
        self.p = {**defaults, **{k: v for k, v in params.items() if k != "name"}}
        self.validate()

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every parameter with its default (``teacher`` first where the distiller reads one)."""
        return {**({"teacher": cls.default_teacher} if cls.default_teacher else {}), **cls.DEFAULTS}

    # -- helpers -------------------------------------------------------------------------
    def validate(self) -> None:
        for key in self.NUMBERS:
            v = self.p.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise EffdstlError(f"distiller '{self.name}': {key} must be a number, got {v!r}")
        for key in ("tau", "T", "tau_t", "tau_s"):
            if key in self.p and not float(self.p[key]) > 0:
                raise EffdstlError(f"distiller '{self.name}': {key} must be > 0, got {self.p[key]}")
        if "lam" in self.p and not 0.0 <= float(self.p["lam"]) <= 1.0:
            raise EffdstlError(f"distiller '{self.name}': lam must be in [0, 1], got {self.p['lam']}")

    def check_subset(self) -> None:
        if self.p["subset"] not in targets.SUBSETS:
            raise unknown("subset", self.p["subset"], targets.SUBSETS)

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
    default_teacher = "weak"
    DEFAULTS = {"tau": 1.0, "lam": 1.0}

    def losses(self, z_s, f_s, t, y):
        z_t = t[self.p["teacher"]].logits.float()
        return self._soft(z_s, y, F.softmax(z_t / float(self.p["tau"]), dim=1)), None

    def batch_key(self):
        # a sweep of tau and lam from one teacher; the same loss terms (lam 0 / 1 omit one)
        lam = float(self.p["lam"])
        return (self.p["teacher"], lam < 1.0, lam > 0.0)

    @classmethod
    def losses_many(cls, ds, z_s, f_s, t, y):
        """R KD students of one teacher at once, each with its own tau and lam ((R, 1, 1) and (R,)
        factors computed in double precision as the one-student path does, then float32)."""
        z_t = t[ds[0].p["teacher"]].logits.float()
        taus = [float(d.p["tau"]) for d in ds]
        lams = [float(d.p["lam"]) for d in ds]
        f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=z_s.device)  # noqa: E731
        tau = f32(taus).view(-1, 1, 1)
        out = {}
        if lams[0] < 1.0:
            ce = F.cross_entropy(z_s.transpose(1, 2), y.expand(z_s.shape[0], -1), reduction="none")
            out["ce"] = f32([1.0 - lam for lam in lams]) * ce.mean(1)
        if lams[0] > 0.0:
            q = F.softmax(z_t / tau, dim=-1)
            kd = -(q * F.log_softmax(z_s / tau, dim=-1)).sum(-1).mean(-1) * f32([x ** 2 for x in taus])
            out["kd"] = f32(lams) * kd
        return out, None


class WSL(Distiller):
    """EffDstl's stage-1 variant of WSL: ``w_ce * CE_LS(ls) + w_wsl * L_WSL(T)``, the weights'
    cross entropies at T (docs/METHOD.md 'WSL'). Table 1's "WSL" baseline is :class:`WSLReleased`."""

    name = "wsl"
    default_teacher = "weak"
    DEFAULTS = {"T": 2.0, "ls": 0.1, "w_ce": 1.0, "w_wsl": 0.5}

    def losses(self, z_s, f_s, t, y):
        z_t = t[self.p["teacher"]].logits.float()
        return {"ce_ls": float(self.p["w_ce"]) * losses.ls_ce(z_s, y, float(self.p["ls"])),
                "wsl": float(self.p["w_wsl"]) * losses.wsl_loss(z_s, z_t, y, float(self.p["T"]))}, None


class WSLReleased(Distiller):
    """WSL as its authors released it, Table 1's "WSL" baseline (docs/METHOD.md 'WSL as released'):
    ``CE(ls) + alpha * L_soft(T)`` with alpha 2.5, T 2, no label smoothing (the released
    configuration's ``label_smooth = False``), the weights' cross entropies at T = 1."""

    name = "wsl_released"
    default_teacher = "weak"
    DEFAULTS = {"T": 2.0, "alpha": 2.5, "ls": 0.0}

    def losses(self, z_s, f_s, t, y):
        z_t = t[self.p["teacher"]].logits.float()
        return {"ce": losses.ls_ce(z_s, y, float(self.p["ls"])),
                "wsl": float(self.p["alpha"]) * losses.wsl_released_loss(z_s, z_t, y, float(self.p["T"]))}, None


class CKM(Distiller):
    """EffDstl stage 2: consistent knowledge mining only (Sec. 5.1). ``subset: null`` = CKM off."""

    name = "ckm"
    default_teacher = "strong"
    alters_subset = True
    DEFAULTS = {"tau_t": 0.7, "tau_s": 1.0, "smooth": 0.99, "subset": "reg_cor"}

    def validate(self):
        super().validate()
        if self.p["subset"] is not None:
            self.check_subset()
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
    default_teacher = "weak"
    DEFAULTS = {"w_ce": 1.0, "w_dist": 25.0, "w_angle": 50.0}
    needs_features = True

    def losses(self, z_s, f_s, t, y):
        f_t = t[self.p["teacher"]].features
        return {"ce": float(self.p["w_ce"]) * F.cross_entropy(z_s, y),
                "rkd": losses.rkd_loss(f_s, f_t, float(self.p["w_dist"]), float(self.p["w_angle"]))}, None


class Replace(Distiller):
    """Fig. 5: the weak teacher's target, replaced by the strong one's on a subset (Eq. 1, 2)."""

    name = "replace"
    default_teacher = "weak"
    alters_subset = True
    DEFAULTS = {"strong": "strong", "scheme": "full", "subset": "all",
                "tau": 1.0, "lam": 1.0}

    def validate(self):
        super().validate()
        if self.p["scheme"] not in targets.SCHEMES:
            raise unknown("replacement scheme", self.p["scheme"], targets.SCHEMES)
        self.check_subset()

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
    """Fig. 6: a registered manipulation (``kind``: label smoothing, teacher or student
    amplification, ...) of the teacher's target on a subset (Eq. 3-5). Its parameter is a key
    named by the manipulation (``t``, ``delta``; targets.MANIPULATIONS)."""

    name = "manipulate"
    default_teacher = "weak"
    alters_subset = True
    DEFAULTS = {"kind": "teacher_amp", "subset": "all", "tau": 1.0, "lam": 1.0}

    @classmethod
    def defaults(cls):
        return {**super().defaults(), **{k: None for k in targets.param_names()}}

    def validate(self):
        super().validate()
        for key in targets.param_names():
            v = self.p.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise EffdstlError(f"distiller '{self.name}': {key} must be a number, got {v!r}")
        self.m = targets.manipulation(self.p["kind"])
        targets.check_param(self.m.name, self.p[self.m.param])
        self.check_subset()

    @property
    def value(self) -> float:
        """The manipulation's parameter value."""
        return float(self.p[self.m.param])

    def losses(self, z_s, f_s, t, y):
        tau = float(self.p["tau"])
        p_t = F.softmax(t[self.p["teacher"]].logits.float() / tau, dim=1)
        p_s = F.softmax(z_s.detach().float() / tau, dim=1)
        mask = targets.subset_mask(self.p["subset"], p_t, p_s, y)
        alt = targets.manipulate(self.m.name, p_t, y, p_student=p_s, **{self.m.param: self.value})
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
            prm = {d.m.param: d.value}
            if d.m.reads_student:
                rows.append(targets.manipulate(d.m.name, p_t, y, p_student=p_s[i], **prm))
                continue
            key = (d.m.name, d.value)
            if key not in alt:
                alt[key] = targets.manipulate(d.m.name, p_t, y, **prm)
            rows.append(alt[key])
        q = torch.where(mask.unsqueeze(-1), torch.stack(rows), p_t)
        return cls._soft_many(float(p0["lam"]), tau, z_s, y, q), mask


REGISTRY: dict[str, type[Distiller]] = {
    cls.name: cls for cls in (NoDistill, KD, WSL, WSLReleased, CKM, RKD, Replace, Manipulate)
}


def with_teacher(spec: dict[str, Any], available) -> dict[str, Any]:
    """``spec`` with its teacher filled in where it names none: the distiller's
    ``default_teacher`` if that one is ``available``, else ``weak`` (a single teacher serves
    every distiller, CKM included)."""
    cls = REGISTRY.get(spec.get("name"))
    if cls is None or cls.default_teacher is None or "teacher" in spec:
        return spec
    return {**spec, "teacher": cls.default_teacher if cls.default_teacher in available else "weak"}


def build_distiller(spec: dict[str, Any]) -> Distiller:
    """``{'name': 'replace', 'scheme': 'full', ...}`` -> a validated distiller."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise EffdstlError(f"a distiller needs a 'name' (one of {', '.join(REGISTRY)}), got {spec!r}")
    name = spec["name"]
    if name not in REGISTRY:
        raise unknown("distiller", name, REGISTRY)
    return REGISTRY[name](**spec)
