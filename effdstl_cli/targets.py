"""The paper's soft-target algebra as pure tensor functions (docs/METHOD.md, Sec. 4), and the
registries that name them: the one home of every replacement scheme, sample subset and
manipulation, with what the rest of the tool needs to know about each (plot label and order,
a manipulation's parameter, its symbol and default). Planner, distillers, results and plots read
these; a new scheme, subset or manipulation is one ``register_*`` call here.

Probabilities in, probabilities out; batched over rows; no autograd side effects (inputs are
detached). Every output row is finite, >= 0 and sums to 1, also when a teacher is certain
(p_k = 1) or gives the true class nothing (p_k = 0): every division is guarded, and the
degenerate ``0/0`` case falls back to spreading the mass evenly, which is the limit that keeps a
row a distribution.

torch is imported where a function first needs it, so that the planner, results and plots can
read the registries without loading torch.

Notation (docs/METHOD.md): ``k = y`` is the true class; ``p_-`` the weak teacher, ``p_+`` the strong one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .errors import EffdstlError, unknown

if TYPE_CHECKING:
    from torch import Tensor

EPS = 1e-12


# -- registries ------------------------------------------------------------------------------
# Each is an ordered dict name -> entry; the order is the plot order (legend, x groups) and the
# order of a study's default grid. Error messages list the names sorted, so order is cosmetic.

@dataclass(frozen=True)
class Scheme:
    """A replacement scheme (Fig. 5): ``fn(p_weak, p_strong, labels) -> q`` for every row."""

    name: str
    fn: Callable[["Tensor", "Tensor", "Tensor"], "Tensor"]
    label: str        # x group of Fig. 5
    in_grid: bool     # planned when a replacement study's grid lists no schemes


@dataclass(frozen=True)
class Subset:
    """A sample subset: ``rule(correct, reg) -> mask``, all (R, B) bool. ``correct``: the altered
    teacher's argmax is the label; ``reg``: ``p_t[y] < p_s[y]`` (a regularization sample)."""

    name: str
    rule: Callable[["Tensor", "Tensor"], "Tensor"]
    label: str        # legend of Fig. 5 / 6
    in_grid: bool     # planned when a Fig. 5 / 6 study's grid lists no subsets


@dataclass(frozen=True)
class Manipulation:
    """A one-teacher manipulation (Fig. 6): ``fn(p, labels, value, p_student) -> q`` with ``value``
    the study's ``param`` (a key of the distiller spec and of ``grid.params.<name>``)."""

    name: str
    fn: Callable[["Tensor", "Tensor", float, "Tensor | None"], "Tensor"]
    param: str        # the parameter's name in study files and distiller specs (t, delta, ...)
    symbol: str       # its symbol on plots (t, δ, ...)
    default: float    # the value planned when grid.params does not give one
    label: str        # x group of Fig. 6
    valid: Callable[[float], bool]  # the parameter's domain ...
    domain: str       # ... in words, for the error ("in (0, 1]", ">= 0")
    reads_student: bool = False     # the target depends on the student (one per student in a group)
    in_grid: bool = True            # planned when a manipulation study's grid lists no kinds


SCHEMES: dict[str, Scheme] = {}
SUBSETS: dict[str, Subset] = {}
MANIPULATIONS: dict[str, Manipulation] = {}


def register_scheme(name: str, fn: Callable, *, label: str | None = None, in_grid: bool = True) -> Scheme:
    """Add a replacement scheme (see :class:`Scheme`); returns its entry."""
    SCHEMES[name] = entry = Scheme(name, fn, label or name, in_grid)
    return entry


def register_subset(name: str, rule: Callable, *, label: str | None = None, in_grid: bool = True) -> Subset:
    """Add a sample subset (see :class:`Subset`); returns its entry."""
    SUBSETS[name] = entry = Subset(name, rule, label or name, in_grid)
    return entry


def register_manipulation(name: str, fn: Callable, *, param: str, default: float, valid: Callable[[float], bool],
                          domain: str, symbol: str | None = None, label: str | None = None,
                          reads_student: bool = False, in_grid: bool = True) -> Manipulation:
    """Add a manipulation (see :class:`Manipulation`); returns its entry."""
    MANIPULATIONS[name] = entry = Manipulation(name, fn, param, symbol or param, default, label or name, valid,
                                               domain, reads_student, in_grid)
    return entry


def scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise unknown("replacement scheme", name, SCHEMES)
    return SCHEMES[name]


def subset(name: str) -> Subset:
    if name not in SUBSETS:
        raise unknown("subset", name, SUBSETS)
    return SUBSETS[name]


def manipulation(name: str) -> Manipulation:
    if name not in MANIPULATIONS:
        raise unknown("manipulation", name, MANIPULATIONS)
    return MANIPULATIONS[name]


def grid_defaults(registry: dict) -> list[str]:
    """The names a Fig. 5 / 6 study plans when its grid does not list them."""
    return [n for n, e in registry.items() if e.in_grid]


def param_names() -> tuple[str, ...]:
    """Every manipulation parameter name (the keys allowed under ``grid.params.<kind>``)."""
    return tuple(dict.fromkeys(m.param for m in MANIPULATIONS.values()))


def spec_param(spec: dict) -> Any:
    """The manipulation parameter's value in a distiller spec (None if it has none): the
    ``param`` column of the results."""
    return next((spec[p] for p in param_names() if p in spec), None)


def check_param(kind: str, value: Any) -> float:
    """``value`` as a float if it is in the manipulation's domain; else one line saying which."""
    m = manipulation(kind)
    if value is None or not m.valid(float(value)):
        raise EffdstlError(f"{kind} needs {m.param} {m.domain}, got {value}")
    return float(value)


# -- the algebra -----------------------------------------------------------------------------

def true_prob(p: Tensor, labels: Tensor) -> Tensor:
    """``p[i, y_i]`` as a (B,) tensor."""
    return p.gather(1, labels.view(-1, 1)).squeeze(1)


def _onehot(labels: Tensor, p: Tensor) -> Tensor:
    import torch

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
    student -> (R, B). The two predicates are computed once, each distinct subset's rule once."""
    import torch

    rules = {n: subset(n).rule for n in names}
    p_teacher, p_student = p_teacher.detach(), p_student.detach()
    r = p_student.shape[0]
    correct = (p_teacher.argmax(1) == labels).expand(r, -1)
    reg = true_prob(p_teacher, labels) < p_student.gather(2, labels.view(1, -1, 1).expand(r, -1, 1)).squeeze(2)
    table = {n: rule(correct, reg) for n, rule in rules.items()}
    if len(table) == 1:  # no index tensor: one subset for all (and the single-student path)
        return table[names[0]]
    return torch.stack([table[n][i] for i, n in enumerate(names)])  # views: no host copy


def _rescale_others(p_src: Tensor, labels: Tensor, q_k: Tensor, src_k: Tensor) -> Tensor:
    """Row with ``q_k`` on the true class and ``p_src``'s non-true classes rescaled to fill
    ``1 - q_k``: ``q_i = p_src,i * (1 - q_k) / (1 - src_k)``. The shared core of Eq. 1, 2, 4, 5.

    When ``p_src`` has no mass off the true class (``src_k = 1``) the ratio is 0/0; the limit that
    keeps a distribution is to spread ``1 - q_k`` evenly over the other classes. Only an exact 0
    takes that path: a tiny but positive mass (a teacher with a logit margin > ~28, e.g. 1e-13)
    still has a well-defined shape, and ``others / mass`` is exact there (each ``others_i <= mass``),
    whereas clamping the denominator at ``EPS`` would make such a row sum to ``mass / EPS < 1``.
    """
    import torch

    n = p_src.shape[1]
    onehot = _onehot(labels, p_src)
    others = p_src * (1.0 - onehot)
    mass = others.sum(1, keepdim=True)  # = 1 - src_k, computed without cancellation
    even = (1.0 - onehot) / max(n - 1, 1)
    has_mass = mass > 0
    shape = torch.where(has_mass, others / torch.where(has_mass, mass, torch.ones_like(mass)), even)
    q = shape * (1.0 - q_k).clamp_min(0.0).unsqueeze(1)
    return q + onehot * q_k.unsqueeze(1)


def replace(scheme_name: str, p_weak: Tensor, p_strong: Tensor, labels: Tensor) -> Tensor:
    """Replace the weak teacher's target with the strong one's (Sec. 4.1, Fig. 3), every row, by the
    registered scheme ``scheme_name`` (full, partial, confidence: see below). The caller masks rows
    with :func:`apply_on`."""
    return scheme(scheme_name).fn(p_weak.detach(), p_strong.detach(), labels)


def _full(p_weak: Tensor, p_strong: Tensor, labels: Tensor) -> Tensor:
    """``q = p_+``."""
    return p_strong.clone()


def _partial(p_weak: Tensor, p_strong: Tensor, labels: Tensor) -> Tensor:
    """Eq. 1: keep t-'s confidence ``q_k = p_-,k``; others from ``p_+`` rescaled to ``1 - p_-,k``."""
    return _rescale_others(p_strong, labels, true_prob(p_weak, labels), true_prob(p_strong, labels))


def _confidence(p_weak: Tensor, p_strong: Tensor, labels: Tensor) -> Tensor:
    """Eq. 2: take t+'s confidence ``q_k = p_+,k``; others from ``p_-`` rescaled to ``1 - p_+,k``."""
    return _rescale_others(p_weak, labels, true_prob(p_strong, labels), true_prob(p_weak, labels))


def manipulate(kind: str, p: Tensor, labels: Tensor, *, p_student: Tensor | None = None, **params: Any) -> Tensor:
    """Alter one teacher's target without a second teacher (Sec. 4.2, Fig. 6), every row, by the
    registered manipulation ``kind``; its parameter is the keyword of its name (``t=0.9``,
    ``delta=0.2``); other keywords are ignored, so one call can carry every kind's parameter.
    The printed Eq. 4/5 say ``max{., 1}`` and invert the ratio; both are typos (docs/METHOD.md).
    """
    m = manipulation(kind)
    value = check_param(kind, params.get(m.param))
    if m.reads_student and p_student is None:
        raise EffdstlError(f"{kind} needs the student's probabilities (p_student)")
    return m.fn(p.detach(), labels, value, None if p_student is None else p_student.detach())


def _label_smoothing(p: Tensor, labels: Tensor, t: float, p_student: Tensor | None) -> Tensor:
    """Eq. 3: ``q_k = t``; ``q_i = (1 - t) / (N - 1)``."""
    import torch

    n = p.shape[1]
    q = torch.full_like(p, (1.0 - t) / max(n - 1, 1))
    return q.scatter_(1, labels.view(-1, 1), t)


def _amplify(p: Tensor, labels: Tensor, delta: float) -> Tensor:
    p_k = true_prob(p, labels)
    return _rescale_others(p, labels, (p_k + delta).clamp(max=1.0), p_k)


def _teacher_amp(p: Tensor, labels: Tensor, delta: float, p_student: Tensor | None) -> Tensor:
    """Eq. 4: ``q_k = min(p_k + delta, 1)``; ``q_i = p_i (1 - q_k) / (1 - p_k)``."""
    return _amplify(p, labels, delta)


def _student_amp(p: Tensor, labels: Tensor, delta: float, p_student: Tensor | None) -> Tensor:
    """Eq. 5: Eq. 4 with the (detached) student's ``p_s`` in place of ``p_t``."""
    return _amplify(p_student, labels, delta)


def apply_on(mask: Tensor, altered: Tensor, original: Tensor) -> Tensor:
    """Rows of ``altered`` where ``mask``, rows of ``original`` elsewhere (detached, like every
    target in this module: a soft target carries no autograd graph)."""
    import torch

    return torch.where(mask.view(-1, 1), altered.detach(), original.detach())


# -- the paper's entries (docs/METHOD.md) ------------------------------------------------------

register_scheme("full", _full)
register_scheme("partial", _partial)
register_scheme("confidence", _confidence)

register_subset("reg_cor", lambda c, r: r & c, label="reg ∩ correct")
register_subset("reg", lambda c, r: r.clone())
register_subset("correct", lambda c, r: c.clone())
register_subset("not_correct", lambda c, r: ~c, label="not correct")
register_subset("all", lambda c, r: r.new_ones(r.shape))
register_subset("reg_not_cor", lambda c, r: r & ~c, label="reg ∩ not correct", in_grid=False)
register_subset("not_reg_cor", lambda c, r: ~r & c, label="not reg ∩ correct", in_grid=False)
register_subset("not_reg", lambda c, r: ~r, label="not reg", in_grid=False)

register_manipulation("label_smoothing", _label_smoothing, param="t", default=0.9,
                      valid=lambda t: 0.0 < t <= 1.0, domain="in (0, 1]", label="label smoothing")
register_manipulation("teacher_amp", _teacher_amp, param="delta", symbol="δ", default=0.2,
                      valid=lambda d: d >= 0.0, domain=">= 0", label="teacher amplification")
register_manipulation("student_amp", _student_amp, param="delta", symbol="δ", default=0.2,
                      valid=lambda d: d >= 0.0, domain=">= 0", label="student amplification", reads_student=True)
