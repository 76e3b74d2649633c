"""The group-training engine: one data stream, one forward of each teacher per batch, K students.

A *group* is K >= 1 runs that share dataset, global batch size, seed (hence batch order and
augmentation) and total epochs. Every student has its own target rule (distiller), optimizer,
schedule stages, metrics and run directory. Sharing the stream makes a sweep cheap (teachers run
once per batch, not K times) and its comparisons paired (every config sees the same batches).

Grouping changes nothing but the cost: a student's init depends only on its seed, batches only on
(seed, epoch), and each student's own RNG stream is swapped in around its step, so its numbers
equal a solo run's (bit-identical on CPU, with ``--fuse off``). Students that share architecture
and schedule may instead be stepped as one horizontally fused model (fused.py, ``FusedMembers``,
``Env.fuse``): the same math summed in another order, so equal to the loop up to float rounding
(tests/test_fused.py says how close), with per-student checkpoints as before.

Files per run follow docs/RUNDIR.md. Only rank 0 writes; all ranks read checkpoints to resume.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from . import files as fio
from . import tblog
from .cache import TeacherCache, cache_key, weights_sha
from .config import DATA_KEYS, config_hash, data_keys
from .data import build_data, data_args
from .data.stream import StreamOptions, eval_batches, train_batches
from .devices import resolve_device
from .distillers import Distiller, TeacherOut, build_distiller
from .errors import EffdstlError
from .fused import FusedStudents, NotFusable, fuse, part
from .fusion import fusion_key, fusion_plan, policy  # noqa: F401 - fusion_plan: re-exported
from .models import load_checkpoint, model_for, save_weights
from .sgd import SGD

Progress = Callable[[str, dict], None]


@dataclass
class Env:
    """How to run (never part of a run's identity)."""

    device: str = "auto"          # auto | cpu | cuda | cuda:N
    rank: int = 0
    world: int = 1
    amp: bool | None = None       # bf16 autocast; default: on for CUDA
    channels_last: bool | None = None
    compile: bool = False
    threads: int | None = None    # CPU threads; default 1 (see train_group)
    workers: int = 4              # DataLoader workers for on-disk (folder) datasets
    gpu_decode: bool | None = None  # folder data: workers read bytes, the device decodes + augments
                                    # (default: on for CUDA; True on the CPU runs the same code there)
    cpu_share: float = 0.0        # with gpu_decode: this fraction of each batch is decoded by PIL in
                                  # the workers instead (CPU cores and the GPU's decoder add up)
    teacher_cache: bool | None = None  # reuse teacher logits per (sample, aug variant); default: on
                                       # where exact (no aug / CIFAR crop+flip), never for RRC
    teacher_cache_dir: str | None = None  # keep caches across processes (default: $EFFDSTL_TEACHER_CACHE)
    teacher_cache_mb: int = 1024  # per teacher: rows beyond this are not stored
    nan_check_every: int = 50     # steps between non-finite checks on CUDA (each one syncs)
    fuse: str = "auto"            # auto | on | off: students of one architecture as one fused model
    stop_after_epochs: int | None = None  # testing/preemption aid: return after N epochs
    ckpt_share: float | None = 0.05  # group checkpoints cost at most this share of training (Checkpointer); 0: every epoch
    progress: Progress | None = None
    log: Callable[[str], None] = print
    job: dict | None = None       # the launcher's record of the job this process is (job.json's
                                  # fields); written into each run it takes the lock of

    def stream(self) -> StreamOptions:
        """How batches are read and decoded (data.stream): the data side of these options."""
        return StreamOptions(workers=self.workers, gpu_decode=self.gpu_decode, cpu_share=self.cpu_share)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


# Teacher-cache counters of the last group trained in this process (read by `effdstl bench`).
last_cache_stats: dict[str, dict] = {}


# -- helpers -------------------------------------------------------------------------------

def _gen(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (seed, epoch, purpose) — reproducible streams."""
    g = torch.Generator()
    g.manual_seed(hash(tuple(keys)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def lr_at(stage: dict, progress: float) -> float:
    """Cosine from ``lr`` to ``min_lr`` over the stage (the default), or step decay
    (``sched.kind: step``: ``lr * gamma^k`` after the k-th of ``milestones``, epochs since the stage
    began; the paper's "100 epochs, step decay", docs/METHOD.md), after an optional linear warm-up.

    ``progress`` is in epochs since the stage began (fractional within an epoch).
    """
    o, s = stage["optim"], stage.get("sched", {})
    lr, min_lr, warm = float(o["lr"]), float(s.get("min_lr", 0.0)), float(s.get("warmup_epochs", 0))
    if warm > 0 and progress < warm:
        return lr * (progress + 1e-9) / warm
    if s.get("kind", "cosine") == "step":
        passed = sum(1 for m in s.get("milestones") or [] if progress >= float(m))
        return lr * float(s.get("gamma", 0.1)) ** passed
    span = max(float(stage["epochs"]) - warm, 1e-9)
    t = min(max((progress - warm) / span, 0.0), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def _stage_of(stages: list[dict], epoch0: int) -> tuple[int, int]:
    """(stage index, epochs since its start) for a 0-based epoch."""
    start = 0
    for i, st in enumerate(stages):
        if epoch0 < start + int(st["epochs"]):
            return i, epoch0 - start
        start += int(st["epochs"])
    return len(stages) - 1, epoch0 - (start - int(stages[-1]["epochs"]))


def make_optimizer(model: torch.nn.Module, stage: dict) -> "torch.optim.Optimizer | SGD":
    """The stage's SGD: on the CPU effdstl's own (sgd.py: torch's numbers without importing
    torch._dynamo), elsewhere torch's."""
    o = stage["optim"]
    params = list(model.parameters())
    kind = SGD if all(p.device.type == "cpu" for p in params) else torch.optim.SGD
    return kind(params, lr=float(o["lr"]), momentum=float(o.get("momentum", 0.9)),
                weight_decay=float(o.get("weight_decay", 0.0)), nesterov=bool(o.get("nesterov", False)))


def load_teacher(name: str, tcfg: dict, data) -> torch.nn.Module:
    """A frozen teacher in eval mode from {model, ckpt | pretrained}."""
    ckpt = tcfg.get("ckpt")
    if ckpt is None and not tcfg.get("pretrained"):
        raise EffdstlError(f"teacher '{name}' has neither a checkpoint nor pretrained: true")
    if ckpt is not None:
        fio.check_teacher_file(name, tcfg)  # its run failed or is damaged, or the file changed: one line
    if ckpt is not None and not Path(ckpt).exists():
        raise EffdstlError(f"teacher '{name}': checkpoint {ckpt} does not exist (train the teacher first)")
    net = model_for(tcfg["model"], data, pretrained=bool(tcfg.get("pretrained")))
    if ckpt is not None:
        load_checkpoint(net, ckpt)
    net.eval().requires_grad_(False)
    return net


@contextmanager
def _rng_of(member: "Member"):
    """Swap the member's own CPU RNG stream in (dropout/drop-path) and out again."""
    outer = torch.get_rng_state()
    torch.set_rng_state(member.rng)
    try:
        yield
    finally:
        member.rng = torch.get_rng_state()
        torch.set_rng_state(outer)


# -- one student of the group --------------------------------------------------------------

@dataclass(eq=False)  # identity: members are kept in lists and sets
class Member:
    cfg: dict
    run_dir: Path
    hash: str
    model: torch.nn.Module = None
    ddp: torch.nn.Module = None
    opt: torch.optim.Optimizer | None = None
    stage: int = -1
    distiller: Distiller | None = None
    epoch: int = 0                               # epochs finished
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"top1": -1.0, "top5": -1.0, "epoch": 0})
    wall_s: float = 0.0
    rng: torch.Tensor | None = None
    hits: torch.Tensor | None = None             # per training sample: epochs it was in the altered subset
    mask_epochs: int = 0                         # epochs whose distiller had a subset
    failed: str | None = None
    n_train: int = 0
    lock: fio.RunLock | None = None
    acc: dict = field(default_factory=dict)      # on-device sums for the epoch in flight
    snap: dict | None = None                     # its newest state (a copy), for the next group checkpoint
    unwritten: list = field(default_factory=list)  # metrics rows not yet in metrics.jsonl / TensorBoard

    @property
    def stages(self) -> list[dict]:
        return self.cfg["stages"]

    @classmethod
    def standalone(cls, model: torch.nn.Module, stage: dict, n_train: int, device, spec: str = "") -> "Member":
        """A member ready for :func:`train_step` outside a run (no run directory, one stage): what
        ``effdstl bench`` steps."""
        m = cls(cfg={"stages": [stage], "epochs": int(stage["epochs"]), "model": spec}, run_dir=Path("."), hash="standalone")
        m.model = m.ddp = model.train()
        m.stage, m.opt, m.distiller = 0, make_optimizer(model, stage), build_distiller(stage["distiller"])
        m.rng, m.n_train, m.acc = torch.get_rng_state(), n_train, new_accumulator(device)
        return m

    @property
    def total_epochs(self) -> int:
        return int(self.cfg["epochs"])


def new_accumulator(device) -> dict:
    """On-device sums of one student's epoch in flight (read once, at the epoch's end)."""
    z = lambda: torch.zeros((), device=device)  # noqa: E731
    return {"loss": z(), "correct": z(), "n": z(), "subset": z(), "bad": z(), "hits": None, "parts": {}}


@dataclass(eq=False)
class FusedMembers:
    """K members trained as one horizontally fused model (fused.py): one forward, each member's
    own loss from its own distiller, one backward over the sum, one optimizer. The members'
    own modules and optimizers receive the fused state at every epoch's end (``store``), so
    evaluation, checkpoints and run directories are per student, as in the loop."""

    members: list[Member]
    net: FusedStudents
    ddp: torch.nn.Module = None
    opt: torch.optim.Optimizer | None = None
    stage: int = -1
    acc: dict = field(default_factory=dict)      # the members' epoch sums, one row each (see _fused_step)
    _idx: dict = field(default_factory=dict)     # index tensors by content: built once, no host copy per step

    def index(self, values, device) -> torch.Tensor:
        """A cached int64 tensor of ``values`` on ``device`` (a fresh torch.tensor(list) on a GPU is a
        blocking copy: one sync per step each)."""
        key = (tuple(values), str(device))
        t = self._idx.get(key)
        if t is None:
            t = self._idx[key] = torch.tensor(key[0], dtype=torch.long, device=device)
        return t
    slots: dict = field(default_factory=dict)    # (member, loss name) -> its index in acc["parts"]

    def new_epoch(self, device, n_train: int) -> None:
        k = len(self.members)
        self.slots = {}  # a new stage may log other loss names: only this epoch's go to metrics
        self.acc = {key: torch.zeros(k, device=device) for key in ("loss", "correct", "n", "subset", "bad")}
        self.acc.update(parts=torch.zeros(max(len(self.slots), 1), device=device), hits=None, masked=set(),
                        n_train=n_train)

    def to_members(self) -> None:
        """The epoch's sums, kept as one tensor per quantity for all K, -> each member's accumulator."""
        a = self.acc
        for i, m in enumerate(self.members):
            m.acc = {key: a[key][i] for key in ("loss", "correct", "n", "subset", "bad")}
            m.acc["parts"] = {name: a["parts"][j] for (mi, name), j in self.slots.items() if mi == i}
            m.acc["hits"] = a["hits"][i] if i in a["masked"] else None

    def load_optim_state(self) -> None:
        """Momentum buffers of the members' optimizers -> the fused optimizer."""
        per = [list(m.model.parameters()) for m in self.members]
        for j, p in enumerate(self.net.parameters()):
            bufs = [m.opt.state.get(per[i][j], {}).get("momentum_buffer") for i, m in enumerate(self.members)]
            if all(b is not None for b in bufs):
                self.opt.state[p]["momentum_buffer"] = torch.cat(bufs, 0).to(p.dtype)

    @torch.no_grad()
    def store(self) -> None:
        """Fused weights, BN statistics, momentum and lr -> each member's model and optimizer."""
        k = len(self.members)
        self.net.store_students([m.model for m in self.members])
        lr = self.opt.param_groups[0]["lr"]
        fused_params = list(self.net.parameters())
        for i, m in enumerate(self.members):
            for g in m.opt.param_groups:
                g["lr"] = lr
            for p, fp in zip(m.model.parameters(), fused_params):
                buf = self.opt.state.get(fp, {}).get("momentum_buffer")
                if buf is not None:
                    m.opt.state[p]["momentum_buffer"] = part(buf, k, i).clone()


def _validate_group(cfgs: list[dict]) -> None:
    shared = (*DATA_KEYS, "seed", "batch_size", "epochs")
    for key in shared:
        vals = {repr(c.get(key)) for c in cfgs}
        if len(vals) > 1:
            raise EffdstlError(f"runs of one group must share '{key}', got {sorted(vals)}")
    for c in cfgs:
        if sum(int(s["epochs"]) for s in c["stages"]) != int(c["epochs"]):
            raise EffdstlError(f"run {config_hash(c)}: stage epochs do not add up to epochs={c['epochs']}")
    seen: dict[str, str] = {}
    for c in cfgs:
        for name, t in (c.get("teachers") or {}).items():
            r = repr(sorted(t.items()))
            if seen.setdefault(name, r) != r:
                raise EffdstlError(f"runs of one group name teacher '{name}' differently")


def _reduce(t: torch.Tensor, env: Env) -> torch.Tensor:
    if env.world > 1:
        tdist.all_reduce(t)
    return t


# -- the group loop ------------------------------------------------------------------------

def train_group(members_in: list[tuple[dict, Path]], env: Env | None = None) -> list[dict]:
    """Train every run of a group to the end (or resume it); returns each run's final/failed record.

    Runs already finished (final.json) or failed (failed.json) are skipped, so calling this again
    is always safe. Each epoch writes a checkpoint, then metrics.jsonl, atomically.
    """
    env = env or Env()
    cfgs = [c for c, _ in members_in]
    _validate_group(cfgs)
    device = env.torch_device()
    cuda = device.type == "cuda"
    amp = env.amp if env.amp is not None else cuda
    chl = env.channels_last if env.channels_last is not None else cuda
    if not cuda:
        # One intra-op thread by default: on small CPU batches OpenMP's hand-offs cost more than
        # they save (measured on 2 cores: softmax 64x10 took 4.2 ms with 2 threads, 36 us with 1).
        torch.set_num_threads(int(env.threads or os.environ.get("EFFDSTL_THREADS", 1)))
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    c0 = cfgs[0]
    seed, gbatch, total = int(c0["seed"]), int(c0["batch_size"]), int(c0["epochs"])
    if gbatch % env.world:
        raise EffdstlError(f"batch_size {gbatch} is not divisible by the {env.world} processes")
    data = build_data(**data_args(c0))

    # -- members: skip finished, take locks, resume --------------------------------------
    out: list[dict] = []
    members: list[Member] = []
    for cfg, run_dir in members_in:
        run_dir = Path(run_dir)
        h = config_hash(cfg)
        if (run_dir / "final.json").exists():
            fio.RunLock(run_dir).alive()  # a lock its trainer left when killed right after finishing goes
            out.append(fio.read_record(run_dir / "final.json"))
            continue
        if (run_dir / "failed.json").exists():
            out.append(fio.read_record(run_dir / "failed.json"))
            continue
        m = Member(cfg=cfg, run_dir=run_dir, hash=h)
        if env.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / "config.yaml").exists():
                fio.write_yaml(run_dir / "config.yaml", cfg)
            try:
                m.lock = fio.RunLock(run_dir).acquire()
            except BaseException:  # another process holds it: give back the locks taken so far
                fio.release_all(other.lock for other in members)
                raise
            _claim(run_dir, env.job)
            done = next((run_dir / f for f in ("final.json", "failed.json") if (run_dir / f).exists()), None)
            if done is not None and env.world == 1:  # finished by another process meanwhile
                m.lock.release()
                out.append(fio.read_record(done))
                continue
            _remove_temp_files(run_dir)
        members.append(m)
    if not members:
        return out

    try:
        return out + _train(members, data, env, device, amp, chl, seed, gbatch, total)
    finally:  # every lock goes, even when a second Ctrl-C arrives meanwhile (fio.release_all)
        fio.release_all(m.lock for m in members)


# The files only a run's lock holder writes (atomically: ``.NAME.*.tmp``, then a rename or link).
# Others write there without the lock (config.yaml, job.json: launchers; lock: a contender's temp
# file, linked in as ``lock`` when free), so their temp files may be in flight and are never touched.
_HOLDER_FILES = ("ckpt", "ckpt-last.pt", "ckpt-prev.pt", "metrics.jsonl", "model.pt", "subset.pt",
                 "final.json", "failed.json")


def _remove_temp_files(run_dir: Path) -> None:
    """A killed writer's temp files of the holder's files (above) and of its TensorBoard events:
    the new holder deletes them."""
    for name in _HOLDER_FILES:
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    for tmp in run_dir.glob("tb/*/.*.tmp"):
        tmp.unlink(missing_ok=True)


def _claim(run_dir: Path, job: dict | None) -> None:
    """job.json names the job that trains the run, the lock holder: a second command whose job
    was recorded while the first one trained (and then waited for it) is not the one `status`
    shows once the first one has the run."""
    if not job:
        return
    p = run_dir / "job.json"
    try:
        had = fio.read_json(p) if p.exists() else {}
    except (OSError, ValueError):
        had = {}
    if not isinstance(had, dict) or str(had.get("job_id")) != str(job.get("job_id")):
        fio.write_json(p, {**(had if isinstance(had, dict) else {}), **job, "started_at": time.time()})


def _train(members, data, env: Env, device, amp, chl, seed, gbatch, total) -> list[dict]:
    cuda = device.type == "cuda"
    saved = fio.load_group_checkpoints([m.run_dir for m in members])
    for m in members:
        # Same seed -> same init for every student of an architecture: paired comparisons.
        torch.manual_seed(seed)
        m.model = model_for(m.cfg["model"], data, pretrained=bool(m.cfg.get("pretrained", False)))
        m.rng = torch.get_rng_state()
        m.n_train = len(data.train)
        state, note, failed = saved[m.run_dir.name]
        if note:
            env.log(note)
        if state is not None:
            m.snap = state
            m.failed = failed  # it failed after this state; the group goes on without it, as before the kill
            m.model.load_state_dict(state["model"])
            m.epoch, m.history, m.best = int(state["epoch"]), list(state["history"]), dict(state["best"])
            m.wall_s, m.rng = float(state["wall_s"]), state["rng"]
            m.hits, m.mask_epochs = state.get("hits"), int(state.get("mask_epochs", 0))
            if env.rank == 0:
                env.log(f"run {m.hash}: resumed from epoch {m.epoch} of {m.total_epochs}")
        m.model.to(device)
        if chl:
            m.model.to(memory_format=torch.channels_last)
        m.ddp = m.model
        if env.world > 1:
            m.ddp = torch.nn.parallel.DistributedDataParallel(
                m.model, device_ids=[device.index] if cuda else None)
        if env.compile:
            m.ddp = torch.compile(m.ddp)
        if m.epoch < m.total_epochs:
            m.stage, _ = _stage_of(m.stages, m.epoch)
            m.opt = make_optimizer(m.model, m.stages[m.stage])
            m.distiller = build_distiller(m.stages[m.stage]["distiller"])
            if state is not None and int(state.get("stage", -1)) == m.stage and state.get("optim"):
                m.opt.load_state_dict(state["optim"])
        if env.rank == 0 and (state is not None or (m.run_dir / "metrics.jsonl").exists()):
            # metrics.jsonl always mirrors the checkpoint's history: never a repeated/skipped epoch
            # (and no stale rows when no intact checkpoint is left and the run starts over)
            fio.write_jsonl(m.run_dir / "metrics.jsonl", m.history)
        if env.rank == 0:
            tblog.rewrite(m.run_dir, m.cfg, m.history)   # TensorBoard mirrors metrics.jsonl too

    fused = _fuse_members(members, data, env, device, chl)

    # -- teachers: loaded once for the whole group -----------------------------------------
    tcfgs: dict[str, dict] = {}
    for m in members:
        tcfgs.update(m.cfg.get("teachers") or {})
    teachers = {n: load_teacher(n, t, data).to(device) for n, t in tcfgs.items()}
    split = data.train
    caches = _teacher_caches(teachers, tcfgs, split, members[0].cfg, env, device, amp)
    for n, t in teachers.items():
        if chl:
            t.to(memory_format=torch.channels_last)
        if env.compile:
            teachers[n] = torch.compile(t)

    n_train = len(split)
    steps = max(n_train // gbatch, 1)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext
    start_epoch = min(m.epoch for m in members)
    ckpt = Checkpointer(env.ckpt_share)
    if env.progress:
        for m in members:
            env.progress("start", {"run": m.hash, "epoch": m.epoch, "epochs": m.total_epochs,
                                   "label": m.cfg.get("meta", {}).get("label", m.hash)})

    for epoch in range(start_epoch, total):
        active = [m for m in members if m.failed is None and m.epoch == epoch]
        if not active:
            continue
        for m in active:
            st, _ = _stage_of(m.stages, epoch)
            if st != m.stage:  # teacher switch (EffDstl stage 2): a fresh optimizer, a new loss
                m.stage, m.opt = st, make_optimizer(m.model, m.stages[st])
                m.distiller = build_distiller(m.stages[st]["distiller"])
            m.acc = new_accumulator(device)
            m.model.train()
        units: list = [m for m in active if not any(m in g.members for g in fused)]
        for g in fused:
            if any(m in active for m in g.members):
                st, _ = _stage_of(g.members[0].stages, epoch)  # one schedule (fusion key), failed members too
                if st != g.stage:  # the members switched stage together: a fresh optimizer
                    g.stage, g.opt = st, make_optimizer(g.net, g.members[0].stages[st])
                g.net.train()
                g.new_epoch(device, n_train)
                units.append(g)
        need = {n for m in active for n in m.distiller.teachers}
        need_feat = {n for m in active if m.distiller.needs_features for n in m.distiller.teachers}
        missing = need - set(teachers)
        if missing:
            raise EffdstlError(f"a distiller reads teacher(s) {sorted(missing)} that the run config does not define")
        t0 = time.time()
        order = torch.randperm(n_train, generator=_gen(seed, epoch, 1))
        aug = _gen(seed, epoch, 2)
        for step, idx_local, x, y, var in train_batches(split, order, gbatch, steps, aug, device, env.stream(),
                                                        env.rank, env.world, chl, with_variant=bool(caches)):
            with torch.no_grad(), autocast():
                touts = {}
                for n in need:
                    if n in need_feat:
                        z, f = teachers[n](x, features=True)
                        touts[n] = TeacherOut(z.float(), f.float())
                    elif n in caches:
                        run = (lambda rows, t=teachers[n]: t(x if rows is None else x.index_select(0, rows)))
                        z = caches[n].fetch(idx_local, var, run, full_above=0.0 if env.compile else 0.5)
                        touts[n] = TeacherOut(z.float())
                    else:
                        touts[n] = TeacherOut(teachers[n](x).float())
            for u in units:
                train_step(u, x, y, idx_local, touts, epoch, step, steps, autocast, env, cuda)
        for g in fused:
            if any(m in active for m in g.members):
                g.store()
                g.to_members()
        # The shared stream's time is split between the runs that used it, so the GPU-hours of a
        # group's runs add up to what the group cost (Table 3), not K times that.
        share = (time.time() - t0) / len(active)
        evs = {}  # a fused group is evaluated in one pass; its time is shared like the stream's
        for g in fused:
            if any(m in active and m.failed is None for m in g.members):
                t1 = time.time()
                for m, ev in zip(g.members, evaluate(g.net, data.test, device, env, chl, autocast)):
                    evs[id(m)] = ev
                share += (time.time() - t1) / len(active)
        ended = [m for m in active if m.failed is None]
        rows = [_end_epoch(m, data, epoch, share, device, env, chl, autocast, evs.get(id(m))) for m in ended]
        stop = env.stop_after_epochs is not None and epoch + 1 - start_epoch >= env.stop_after_epochs
        _write_epoch(members, [(m, r) for m, r in zip(ended, rows) if r is not None], env, ckpt,
                     final=stop or epoch + 1 == total)
        if env.rank == 0:
            for c in caches.values():
                c.save()
        if env.stop_after_epochs is not None and epoch + 1 - start_epoch >= env.stop_after_epochs:
            break
    last_cache_stats.clear()
    last_cache_stats.update({n: c.stats() for n, c in caches.items()})
    return [_finish(m, env, device) for m in members]


def _teacher_caches(teachers: dict, tcfgs: dict, split, cfg: dict, env: Env, device, amp) -> dict:
    """A TeacherCache per teacher where caching is exact: in-memory data whose augmentation is
    off or drawn from a finite set (CIFAR crop + flip); never for RandomResizedCrop (folders)."""
    if env.teacher_cache is False or not teachers:
        return {}
    if not getattr(split, "in_memory", False) or getattr(split, "augment", None) not in ("none", "crop_flip"):
        return {}
    folder = env.teacher_cache_dir or os.environ.get("EFFDSTL_TEACHER_CACHE") or None
    dtype = "bf16" if (amp and device.type == "cuda") else "fp32"
    out = {}
    for n, t in teachers.items():
        d = data_keys(cfg)
        dataset = "|".join([str(d["dataset"])] + [f"{k}={d[k]}" for k in DATA_KEYS[3:] if k in d])
        key = cache_key(weights_sha(t), tcfgs[n]["model"], dataset, d["image_size"],
                        split.num_variants, dtype)
        path = Path(folder).expanduser() / f"teacher-{key}.pt" if folder else None
        out[n] = TeacherCache(key, len(split), split.num_variants, device,
                              max_bytes=int(env.teacher_cache_mb) << 20, path=path)
    return out


def _fuse_members(members: list[Member], data, env: Env, device, chl: bool) -> list[FusedMembers]:
    """Fuse every set of >= 2 members that share a fusion key and that ``--fuse`` (env.fuse) fuses
    on this device; members that cannot be fused (fused.fuse says why) stay in the loop."""
    sets: dict[tuple, list[Member]] = {}
    # A member that failed before a resume keeps its slot (the fused shape decides the rounding of
    # the others' numbers, as in the uninterrupted run): it joins at the epoch of the live ones.
    now = min((m.epoch for m in members if m.failed is None), default=0)
    for m in members:
        if m.epoch < m.total_epochs:
            sets.setdefault(fusion_key(m.cfg, now if m.failed else m.epoch), []).append(m)
    out = []
    for key, ms in sets.items():
        if len(ms) < 2:
            continue
        on, why = policy(env.fuse, key[0], device.type, data.image_size)
        if not on:
            continue
        probe = torch.rand(2, data.in_chans, data.image_size, data.image_size, device=device)
        feats = any(build_distiller(s["distiller"]).needs_features for m in ms for s in m.stages)
        live = next((m for m in ms if m.failed is None), ms[0])
        for m in ms:  # a failed member's slot is never read: its shared scalars (BN's step count) follow the live ones
            if m.failed:
                for name, t in m.model.state_dict().items():
                    if t.dim() == 0:
                        t.copy_(live.model.state_dict()[name])
        try:
            net = fuse([m.model for m in ms], probe, features=feats)
        except NotFusable as exc:
            if env.rank == 0:
                env.log(f"{len(ms)} students of {key[0]} stepped in a loop: cannot fuse ({exc})")
            continue
        if chl:
            net.to(memory_format=torch.channels_last)
        g = FusedMembers(ms, net, stage=ms[0].stage)
        g.ddp = net
        if env.world > 1:
            g.ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if env.compile:
            g.ddp = torch.compile(g.ddp)
        g.opt = make_optimizer(net, ms[0].stages[ms[0].stage])
        g.load_optim_state()
        if env.rank == 0:
            env.log(f"{len(ms)} students of {key[0]} fused into one model ({why})")
        out.append(g)
    return out


def train_step(unit: "Member | FusedMembers", x, y, idx, touts, epoch: int, step: int, steps: int,
               autocast, env: Env, cuda: bool) -> None:
    """One SGD step of one student (a Member) or of K fused students (FusedMembers) on a batch
    whose teacher outputs are ``touts``; losses and accuracy go to each member's accumulator."""
    if isinstance(unit, FusedMembers):
        _fused_step(unit, x, y, idx, touts, epoch, step, steps, autocast, env, cuda)
    elif unit.failed is None:
        _student_step(unit, x, y, idx, touts, epoch, step, steps, autocast, env, cuda)


def _set_lr(opt, m: Member, epoch: int, step: int, steps: int) -> None:
    _, e_in = _stage_of(m.stages, epoch)
    lr = lr_at(m.stages[m.stage], e_in + step / steps)
    for g in opt.param_groups:
        g["lr"] = lr


def _student_step(m: Member, x, y, idx, touts, epoch, step, steps, autocast, env: Env, cuda: bool) -> None:
    _set_lr(m.opt, m, epoch, step, steps)
    with _rng_of(m):
        with autocast():
            if m.distiller.needs_features:
                z, f = m.ddp(x, features=True)
                f = f.float()
            else:
                z, f = m.ddp(x), None
        z = z.float()
        parts, mask = m.distiller.losses(z, f, touts, y)
        loss = sum(parts.values())
        m.opt.zero_grad(set_to_none=True)
        loss.backward()
        m.opt.step()
    _account(m, loss, z, y, idx, parts, mask, epoch, step, env, cuda)


def _fused_step(g: FusedMembers, x, y, idx, touts, epoch, step, steps, autocast, env: Env, cuda: bool) -> None:
    live = [(i, m) for i, m in enumerate(g.members) if m.failed is None]
    if not live:
        return
    _set_lr(g.opt, live[0][1], epoch, step, steps)  # one schedule: the fusion key says so
    feats = any(m.distiller.needs_features for _, m in live)
    with autocast():
        out = g.ddp(x, features=feats)
    z, f = (out[0].float(), out[1].float()) if feats else (out.float(), None)
    # Each student's own loss from its own distiller; students whose distillers share a batch key
    # (a sweep's replacement or manipulation configs) are computed together: (rows, parts, masks).
    sets: dict[tuple, list[tuple[int, Member]]] = {}
    for i, m in live:
        key = m.distiller.batch_key()
        sets.setdefault((type(m.distiller), key) if key is not None else (i,), []).append((i, m))
    blocks = []
    for ms in sets.values():
        if len(ms) == 1:
            i, m = ms[0]
            p, mask = m.distiller.losses(z[i], f[i] if f is not None else None, touts, y)
            blocks.append(([i], {k: v.reshape(1) for k, v in p.items()}, None if mask is None else mask[None]))
        else:
            rows = [i for i, _ in ms]
            sel = g.index(rows, z.device)
            p, mask = type(ms[0][1].distiller).losses_many(
                [m.distiller for _, m in ms], z.index_select(0, sel),
                f.index_select(0, sel) if f is not None else None, touts, y)
            blocks.append((rows, p, mask))
    totals = [sum(p.values()) for _, p, _ in blocks]
    g.opt.zero_grad(set_to_none=True)
    sum(t.sum() for t in totals).backward()  # d(sum)/d(student i's weights) = d(loss i)/d(student i's weights)
    g.opt.step()
    _account_fused(g, live, blocks, torch.cat(totals).detach(), z.detach(), y, idx, epoch, step, env, cuda)


def _account_fused(g: FusedMembers, live, blocks, loss, z, y, idx, epoch, step, env: Env, cuda) -> None:
    """``_account`` for all live members at once: a handful of ops on (K,) tensors instead of a
    dozen per member (on a GPU each is a kernel launch, on a CPU ~10 us of dispatch). ``loss`` is
    in the blocks' row order."""
    a, b, dev = g.acc, y.shape[0], loss.device
    order = [i for rows, _, _ in blocks for i in rows]
    rows = g.index(order, dev)
    a["bad"].index_add_(0, rows, (~torch.isfinite(loss)).float())
    a["loss"].index_add_(0, rows, torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * b)
    a["correct"].index_add_(0, rows, (z.index_select(0, rows).argmax(2) == y).sum(1).float())
    a["n"][rows] += float(b)
    slot_ids, vals, mrows, mks = [], [], [], []
    for rs, parts, mask in blocks:
        for name, v in parts.items():
            for i in rs:
                if (i, name) not in g.slots:  # a new loss name (first step, or a new stage): widen the sums
                    g.slots[(i, name)] = len(g.slots)
                slot_ids.append(g.slots[(i, name)])
            vals.append(v.detach())
        if mask is not None:
            mrows += rs
            mks.append(mask)
    if len(g.slots) > a["parts"].numel():
        a["parts"] = torch.cat([a["parts"], a["parts"].new_zeros(len(g.slots) - a["parts"].numel())])
    a["parts"].index_add_(0, g.index(slot_ids, dev), torch.cat(vals) * b)
    if mrows:
        # Which samples each run altered, per epoch: the FGSM probe's kept/manipulated split.
        mk = torch.cat(mks).float()
        mr = g.index(mrows, mk.device)
        a["subset"].index_add_(0, mr.to(a["subset"].device), mk.sum(1).to(a["subset"].device))
        if a["hits"] is None:
            a["hits"] = torch.zeros(len(g.members), a["n_train"], device=mk.device)
        a["hits"].view(-1).index_add_(0, (mr[:, None] * a["n_train"] + idx.to(mk.device)[None, :]).flatten(),
                                      mk.flatten())
        a["masked"].update(mrows)
    if env.world == 1 and (not cuda or (step + 1) % env.nan_check_every == 0):
        bad = a["bad"].tolist()
        for i, m in live:
            if bad[i] > 0:
                m.failed = f"non-finite loss at epoch {epoch + 1}, step {step + 1}"


def _account(m: Member, loss, z, y, idx, parts: dict, mask, epoch: int, step: int, env: Env, cuda: bool) -> None:
    a = m.acc
    b = y.shape[0]
    lo = loss.detach()
    a["bad"] += (~torch.isfinite(lo)).float()
    a["loss"] += torch.nan_to_num(lo, nan=0.0, posinf=0.0, neginf=0.0) * b
    a["correct"] += (z.detach().argmax(1) == y).sum()
    a["n"] += b
    if mask is not None:
        a["subset"] += mask.sum()
        # Which samples this run altered, per epoch: the FGSM probe's kept/manipulated split.
        if a["hits"] is None:
            a["hits"] = torch.zeros(m.n_train, device=mask.device)
        a["hits"].index_add_(0, idx.to(mask.device), mask.float())
    for k, v in parts.items():
        a["parts"][k] = a["parts"].get(k, 0.0) + v.detach() * b
    # Non-finite check: every step on CPU (free); every N steps on CUDA (each check syncs).
    # Under DDP all ranks must agree, so the check happens collectively at the epoch's end.
    if env.world == 1 and (not cuda or (step + 1) % env.nan_check_every == 0):
        if a["bad"].item() > 0:
            m.failed = f"non-finite loss at epoch {epoch + 1}, step {step + 1}"


@torch.no_grad()
def evaluate(model: torch.nn.Module, split, device, env: Env, chl: bool, autocast, batch: int = 512):
    """Top-1/top-5 (%) and mean CE on a split; the split is sharded across ranks, sums reduced.
    A FusedStudents model gives one such dict per student, from one pass over the split."""
    model.eval()
    idx_all = torch.arange(len(split))[env.rank::env.world]
    k = model.k if isinstance(model, FusedStudents) else 1
    sums = torch.zeros(k, 4, device=device)  # per student: loss, top1, top5, n
    for x, y in eval_batches(split, idx_all, batch, device, env.stream()):
        if chl and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            z = model(x).float()
        z = z.view(k, -1, z.shape[-1])  # (K, B, N)
        top = z.topk(min(5, z.shape[-1]), -1).indices
        ce = F.cross_entropy(z.transpose(1, 2), y.expand(k, -1), reduction="none").sum(1)
        sums += torch.stack([ce, (top[..., 0] == y).sum(1).float(), (top == y[:, None]).any(-1).sum(1).float(),
                             torch.full((k,), float(len(y)), device=device)], 1)
    out = []
    for s in _reduce(sums, env).tolist():
        n = max(s[3], 1.0)
        out.append({"test_loss": s[0] / n, "test_top1": 100 * s[1] / n, "test_top5": 100 * s[2] / n})
    return out if isinstance(model, FusedStudents) else out[0]


def _end_epoch(m: Member, data, epoch, share_s, device, env: Env, chl, autocast, ev: dict | None = None) -> dict | None:
    """The epoch's metrics row of one member (None when it failed); a copy of its state -> ``m.snap``."""
    t0 = time.time()
    a = m.acc
    keys = sorted(a["parts"])
    vec = torch.stack([a["loss"], a["correct"], a["n"], a["subset"], a["bad"]]
                      + [torch.as_tensor(a["parts"][k], device=device) for k in keys])
    vec = _reduce(vec.float(), env).tolist()  # the epoch's one host sync per student
    if vec[4] > 0 or not all(math.isfinite(v) for v in vec):
        m.failed = m.failed or f"non-finite loss in epoch {epoch + 1}"
    if m.failed is not None:
        return None
    n = max(vec[2], 1.0)
    if a["hits"] is not None:
        hits = _reduce(a["hits"], env).cpu()
        m.hits = hits if m.hits is None else m.hits + hits
        m.mask_epochs += 1
    ev = ev or evaluate(m.model, data.test, device, env, chl, autocast)
    epoch_s = share_s + time.time() - t0
    m.epoch = epoch + 1
    m.wall_s += epoch_s
    row = {"epoch": m.epoch, "stage": m.stage, "lr": m.opt.param_groups[0]["lr"],
           "train_loss": vec[0] / n, "train_top1": 100 * vec[1] / n, **ev, "epoch_s": round(epoch_s, 4),
           "losses": {k: v / n for k, v in zip(keys, vec[5:])}, "subset_frac": vec[3] / n}
    m.history.append(row)
    if ev["test_top1"] > m.best["top1"]:
        m.best = {"top1": ev["test_top1"], "top5": ev["test_top5"], "epoch": m.epoch}
    if env.rank == 0:  # written by _write_epoch, with the group's other members, in one file
        m.snap = _snapshot(m)
    return row


def _clone(obj):
    """A copy of a state's tensors (nested in dicts/lists); training goes on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def _snapshot(m: Member) -> dict:
    """What a checkpoint holds of a member after an epoch (copied: a member that fails later is
    checkpointed with its last good state)."""
    return {"model": _clone(m.model.state_dict()), "optim": _clone(m.opt.state_dict()), "stage": m.stage,
            "epoch": m.epoch, "history": list(m.history), "best": dict(m.best), "wall_s": m.wall_s,
            "hits": None if m.hits is None else m.hits.clone(), "mask_epochs": m.mask_epochs,
            "rng": m.rng, "config_hash": m.hash}


@dataclass
class Checkpointer:
    """When the group checkpoint is written: after an epoch when the training since the last one
    took at least ``(1 - share) / share`` times what that write took (so writing costs at most
    ``share`` of the time: every epoch when epochs are long, every second or so for the digits
    demo's 0.1 s epochs), always after the first and the last epoch of the call; ``share`` 0 or
    None: every epoch. Lost work is bounded by time: at most an epoch, or that many write times."""

    share: float | None
    last_end: float = 0.0      # when the last write ended (0: none yet)
    last_cost: float = 0.0     # how long it took

    def due(self, now: float, final: bool) -> bool:
        if final or not self.share or not self.last_end:
            return True
        return now - self.last_end >= self.last_cost * (1.0 - self.share) / self.share

    def wrote(self, t0: float) -> None:
        self.last_end = time.time()
        self.last_cost = self.last_end - t0


def _write_epoch(members: list[Member], ended: list[tuple[Member, dict]], env: Env, ckpt: Checkpointer,
                 final: bool) -> None:
    """After an epoch, when ``ckpt`` says so (every epoch when epochs are long; see Checkpointer):
    one group checkpoint holding every member's newest state (failed members' last good one,
    marked), linked into each member's run directory, then the metrics.jsonl lines and TensorBoard
    rows of the epochs since the last one (appended: no fsync; a resume rewrites both from the
    checkpoint, so they never hold an epoch the checkpoint lacks). One write for the whole group,
    fused or looped (docs/RELIABILITY.md, "Group checkpoints")."""
    if env.rank == 0:
        for m, row in ended:
            m.unwritten.append(row)
        held = [m for m in members if m.snap is not None]
        t0 = time.time()
        if held and (ended or final) and ckpt.due(t0, final):
            fio.save_group_checkpoint([m.run_dir for m in held], [
                (m.hash, m.snap, m.snap["epoch"], m.failed) for m in held])
            for m in members:
                if m.unwritten:
                    fio.append_jsonl(m.run_dir / "metrics.jsonl", m.unwritten)
                    tblog.append(m.run_dir, m.cfg, m.unwritten)
                    m.unwritten = []
            ckpt.wrote(t0)
            for m in held:
                if m.lock:
                    m.lock.refresh()
    if env.world > 1:
        tdist.barrier()
    if env.progress:
        for m, row in ended:
            env.progress("epoch", {"run": m.hash, **row})


def _finish(m: Member, env: Env, device) -> dict:
    if m.failed is not None:
        rec = {"status": "failed", "reason": m.failed, "epoch": m.epoch, "config_hash": m.hash,
               "last_good_checkpoint": str(m.run_dir / "ckpt-last.pt") if m.epoch else None}
        if env.rank == 0:
            fio.write_json(m.run_dir / "failed.json", rec)
        env.log(f"run {m.hash} failed: {m.failed}")
        return rec
    if m.epoch < m.total_epochs:  # stopped early on purpose (stop_after_epochs / preemption)
        return {"status": "partial", "epoch": m.epoch, "config_hash": m.hash}
    cuda = device.type == "cuda"
    last = m.history[-1]
    rec = {"status": "done", "best_top1": m.best["top1"], "best_top5": m.best["top5"],
           "best_epoch": m.best["epoch"], "last_top1": last["test_top1"], "last_top5": last["test_top5"],
           "epochs": m.epoch, "wall_s": round(m.wall_s, 3), "device": device.type,
           "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
           "world_size": env.world, "gpu_hours": round(m.wall_s / 3600 * env.world, 6) if cuda else 0.0,
           "config_hash": m.hash, "finished_at": round(time.time(), 3)}  # survives copying the results tree
    if env.rank == 0:
        fio.fsync_file(m.run_dir / "metrics.jsonl")  # appended without fsync each epoch; durable before the seal
        save_weights(m.model, m.run_dir / "model.pt")
        if m.hits is not None:
            fio.atomic_write_bytes(m.run_dir / "subset.pt", fio.tensor_bytes(
                {"hits": m.hits, "epochs": torch.tensor(m.mask_epochs)}))
        fio.write_final(m.run_dir / "final.json", rec)  # written last, sealed: the run is done
        if m.lock:  # at once, not after the whole group: a kill now leaves no lock in a finished run
            m.lock.release()
    return rec
