"""``effdstl bench``: what effdstl's engine buys, measured on this machine in one process.

(a) a naive reference loop, written plainly here: fp32, NCHW, one student, the teacher recomputed
    for every student, a ``loss.item()`` per step — what one writes first;
(b) effdstl's engine (``engine.train_group`` on real run configs in a temp folder) on the same
    work: one student distilled (KD + CE) from one teacher; optionally with ``--compile``;
(c) one group of K = 14 students (a Fig. 5 triplet: 12 replacement configs + the 2 single-teacher
    baselines, two teachers) against the same 14 runs trained one by one;
(d) the data pipeline on a folder of JPEGs: DataLoader workers decoding with PIL vs workers only
    reading bytes and the device decoding (nvJPEG) and augmenting, each alone and feeding the
    engine's training step, against the same step on batches already on the device.

Every rate is images per second (for groups: student-images, i.e. batch x students per step).
Engine rates are steady state: each run trains 1 + R epochs (``--repeats`` R) and the median of
epochs 2.. ``epoch_s`` (the engine's own accounting: its share of the data stream + teachers +
steps, plus its evaluation on a small test split) is used, so start-up, cudnn autotuning and
compilation stay out; the naive loop likewise reports the median of R timed chunks. Models are
randomly initialised (no downloads); data is random uint8 images in an npz (in-memory, batched
crop + flip augmentation on the device) and, for (d), JPEGs made from CIFAR-10 pictures (upscaled
with noise to ImageNet-like sizes and file sizes) or from smooth random images.

Results go to a table on stdout and a JSON file (written after every section).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .runconfig import run_config, stage
from .targets import SCHEMES, SUBSETS, grid_defaults

DEFAULTS = {
    "cpu": dict(student="cnn:small", weak="resnet8", strong="resnet14", image_size=32, batch=64,
                classes=10, steps=4, naive_steps=6, repeats=3, jpegs=384, jpeg_px=64, workers=2, k=14),
    "cuda": dict(student="tv:resnet18", weak="tv:resnet34", strong="timm:resnet34d", image_size=224,
                 batch=256, classes=1000, steps=4, naive_steps=8, repeats=2, jpegs=3072, jpeg_px=0,
                 workers=min(16, os.cpu_count() or 4), k=14),
}
SECTIONS = ("a", "b", "c", "d", "f")
# (f): fused student groups vs the loop; MODEL@SIZE[xCHANNELS], K students, batch 64 (issue: a Fig. 5
# triplet is 17 students of one small architecture)
FUSED_MODELS = "mlp:32@8x1,cnn:small@32,resnet20@32"


def parse(device: str, argv: list[str]) -> argparse.Namespace:
    dev = "cuda" if device.startswith("cuda") else "cpu"
    d = DEFAULTS[dev]
    ap = argparse.ArgumentParser(prog="effdstl bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default=d["student"], help="student model spec (%(default)s)")
    ap.add_argument("--teacher", "--weak", dest="weak", default=d["weak"],
                    help="the teacher of (a), (b), (d) and the weak teacher of (c) (%(default)s)")
    ap.add_argument("--strong", default=d["strong"], help="the second teacher of (c) (%(default)s)")
    ap.add_argument("--image-size", type=int, default=d["image_size"])
    ap.add_argument("--batch", type=int, default=d["batch"])
    ap.add_argument("--classes", type=int, default=d["classes"])
    ap.add_argument("--steps", type=int, default=d["steps"], help="steps per epoch of engine runs")
    ap.add_argument("--naive-steps", type=int, default=d["naive_steps"], help="timed steps of (a) and (d)")
    ap.add_argument("--repeats", type=int, default=d["repeats"],
                    help="timed repeats (engine: epochs after the first; naive: chunks); the median counts")
    ap.add_argument("--k", type=int, default=d["k"], help="students of (c): 2 baselines + K-2 replacement configs")
    ap.add_argument("--jpegs", type=int, default=d["jpegs"], help="JPEGs to make for (d)")
    ap.add_argument("--jpeg-px", type=int, default=d["jpeg_px"],
                    help="side of the made JPEGs; 0 = ImageNet-like sizes (about 450x367, ~100 kB)")
    ap.add_argument("--jpeg-dir", help="use this ImageFolder tree (train/, val/) for (d) instead")
    ap.add_argument("--source", help="npz with uint8 x_train (N,H,W,3) to make the JPEGs from "
                                     "(unpack-cifar10 format; default $EFFDSTL_BENCH_SOURCE, else random)")
    ap.add_argument("--workers", type=int, default=d["workers"], help="DataLoader workers for (d)")
    ap.add_argument("--threads", type=int, help="CPU intra-op threads (default: the engine's, 1 on CPU)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the engine with torch.compile (b; run last, compilation takes minutes)")
    ap.add_argument("--budget", type=float, help="seconds this bench may take: --compile is skipped "
                                                 "when less than 150 s are left for it")
    ap.add_argument("--profile", metavar="DIR",
                    help="(d): also profile the decode (batched and per-image) and JPEG -> step with "
                         "torch.profiler; op tables go to DIR, op and launch counts to the JSON")
    ap.add_argument("--fuse-models", default=FUSED_MODELS,
                    help="(f): students to fuse, MODEL@SIZE[xCHANNELS] comma-separated (%(default)s)")
    ap.add_argument("--fuse-k", type=int, default=17, help="(f): students per group (%(default)s)")
    ap.add_argument("--fuse-batch", type=int, default=64, help="(f): batch size (%(default)s)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections to run, e.g. a,b (%(default)s)")
    ap.add_argument("--json", help="write results here (default bench-<device>.json)")
    ap.add_argument("--workdir", help="scratch folder (default: a temp folder, removed at the end)")
    a = ap.parse_args(argv)
    a.device = device
    a.only = {s.strip() for s in a.only.split(",") if s.strip()}
    bad = a.only - set(SECTIONS)
    if bad:
        ap.error(f"--only: unknown section(s) {sorted(bad)}; choose from {','.join(SECTIONS)}")
    try:
        a.fuse_models = [_fuse_model(m) for m in a.fuse_models.split(",") if m.strip()]
    except ValueError as exc:
        ap.error(f"--fuse-models: {exc}")
    if a.fuse_k < 2:
        ap.error("--fuse-k must be >= 2")
    if a.k < 3:
        ap.error("--k must be >= 3 (2 baselines + at least one replacement config)")
    if a.profile:  # fail now, not after minutes of timing
        try:
            Path(a.profile).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            ap.error(f"--profile {a.profile}: cannot make that folder ({exc.strerror or exc})")
    return a


# -- helpers ----------------------------------------------------------------------------------

def _fuse_model(text: str) -> tuple[str, int, int]:
    """'resnet20@32' -> ('resnet20', 32, 3); 'mlp:32@8x1' -> ('mlp:32', 8, 1)."""
    spec, _, size = text.strip().partition("@")
    px, _, ch = (size or "32").partition("x")
    if not spec or not px.isdigit() or (ch and not ch.isdigit()) or int(px) < 1:
        raise ValueError(f"'{text}' is not MODEL@SIZE or MODEL@SIZExCHANNELS (e.g. resnet20@32, mlp:32@8x1)")
    return spec, int(px), int(ch or 3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _write_npz(path: Path, n_train: int, n_test: int, size: int, classes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n_train + n_test, size, size, 3), dtype=np.uint8)
    y = np.arange(n_train + n_test) % classes
    rng.shuffle(y)
    np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:],
             classes=np.array([f"class{c}" for c in range(classes)]))  # N even where a class is not drawn


class _DataMemo:
    """Build each dataset once per bench process (the npz load and channel statistics are set-up,
    not what is measured); engine runs then share it like a warm page cache."""

    def __init__(self, build):
        self.build, self.memo = build, {}

    def __call__(self, spec, data_root=None, image_size=None, augment=True, **subset):
        key = (spec, data_root, image_size, augment, tuple(sorted(subset.items())))
        if key not in self.memo:
            self.memo[key] = self.build(spec, data_root, image_size, augment, **subset)
        return self.memo[key]


def _stage(epochs: int, distiller: dict) -> dict:
    return stage({"epochs": epochs, "lr": 0.05}, distiller)


def _run_cfg(a, dataset: str, distiller: dict, teachers: dict, label: str) -> dict:
    epochs = 1 + max(int(a.repeats), 1)
    return run_config("student", {"dataset": dataset}, a.student, 0, a.batch, [_stage(epochs, distiller)], teachers,
                      {"study": "bench", "label": label})


def _group_cfgs(a, dataset: str, teachers: dict) -> list[dict]:
    kd = {"tau": 1.0, "lam": 0.9}
    cfgs = [_run_cfg(a, dataset, {"name": "kd", "teacher": w, **kd}, teachers, f"{w} teacher only")
            for w in ("weak", "strong")]
    combos = [(s, u) for u in grid_defaults(SUBSETS) for s in SCHEMES]  # the Fig. 5 grid, subset by subset
    seen = set()
    for scheme, subset in combos:
        if len(cfgs) >= a.k:
            break
        if (scheme, subset) in seen:
            continue
        seen.add((scheme, subset))
        cfgs.append(_run_cfg(a, dataset, {"name": "replace", "teacher": "weak", "strong": "strong",
                                          "scheme": scheme, "subset": subset, **kd}, teachers,
                             f"{scheme} / {subset}"))
    return cfgs


def _train(cfgs: list[dict], root: Path, env) -> tuple[float, float, list[dict]]:
    """(wall s of the call, sum over members of their median epoch_s after the first, records)."""
    from .config import config_hash
    from .engine import train_group
    from .files import read_jsonl

    pairs = [(c, root / config_hash(c)) for c in cfgs]
    t0 = time.perf_counter()
    recs = train_group(pairs, env)
    wall = time.perf_counter() - t0
    bad = [r for r in recs if r.get("status") != "done"]
    if bad:
        raise RuntimeError(f"bench run did not finish: {bad[0]}")
    steady = sum(float(np.median([r["epoch_s"] for r in read_jsonl(d / "metrics.jsonl")[1:]])) for _, d in pairs)
    return wall, steady, recs


# -- (a) the naive loop -------------------------------------------------------------------------

def naive_loop(a, data, teacher_ckpt: str, device: torch.device, steps: int, warm: int = 2,
               repeats: int = 1) -> dict:
    """fp32, NCHW, default backend flags, teacher forward per student, ``loss.item()`` every step."""
    from .models import model_for

    torch.manual_seed(0)
    student = model_for(a.student, data).to(device).train()
    teacher = model_for(a.weak, data, ckpt=teacher_ckpt).to(device).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    split, b = data.train, a.batch
    gen = torch.Generator().manual_seed(0)
    labels = split.labels.to(device)
    lam, tau = 0.9, 1.0
    losses, chunks, t0 = [], [], 0.0
    for i in range(warm + steps * repeats):
        if i >= warm and (i - warm) % steps == 0:
            _sync(device)
            if i > warm:
                chunks.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        idx = torch.randint(0, len(split), (b,), generator=gen)
        x = split.get_batch(idx, gen, device)
        y = labels[idx.to(device)]
        with torch.no_grad():
            zt = teacher(x)
        zs = student(x)
        kd = -(F.softmax(zt / tau, 1) * F.log_softmax(zs / tau, 1)).sum(1).mean() * tau * tau
        loss = (1 - lam) * F.cross_entropy(zs, y) + lam * kd
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    _sync(device)
    chunks.append(time.perf_counter() - t0)
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError("naive loop: non-finite loss")
    dt = float(np.median(chunks))
    return {"img_s": steps * b / dt, "step_ms": 1e3 * dt / steps, "steps": steps, "repeats": repeats}


# -- (d) the engine's step fed by a pipeline ----------------------------------------------------

class EngineStep:
    """The engine's own per-batch work (teacher forward under its autocast, then
    ``engine.train_step``) on batches from any source, without the epoch machinery."""

    def __init__(self, a, data, teacher_ckpt: str, device: torch.device, env):
        from . import engine
        from .models import model_for

        self.engine, self.env, self.device = engine, env, device
        self.cuda = device.type == "cuda"
        self.amp = env.amp if env.amp is not None else self.cuda
        self.chl = env.channels_last if env.channels_last is not None else self.cuda
        torch.manual_seed(0)
        model = model_for(a.student, data).to(device)
        teacher = model_for(a.weak, data, ckpt=teacher_ckpt).to(device).eval()
        teacher.requires_grad_(False)
        if self.chl:
            model.to(memory_format=torch.channels_last)
            teacher.to(memory_format=torch.channels_last)
        st = _stage(1, {"name": "kd", "teacher": "weak", "tau": 1.0, "lam": 0.9})
        m = engine.Member.standalone(model, st, len(data.train), device)
        if env.compile:
            m.ddp = torch.compile(model)
        self.teacher = torch.compile(teacher) if env.compile else teacher
        self.m, self.step_no = m, 0
        self._b, self._size, self._classes = a.batch, a.image_size, data.num_classes
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.amp else nullcontext

    def parts(self, steps: int) -> dict:
        """img/s of the teacher forward alone and of the student step alone (fixed teacher output)."""
        from .distillers import TeacherOut

        x = torch.rand(self._b, 3, self._size, self._size, device=self.device)
        if self.chl:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, self._classes, (self._b,), device=self.device)
        out = {}

        def teach():
            with torch.no_grad(), self.autocast():
                return self.teacher(x).float()

        zt = teach()
        touts = {"weak": TeacherOut(zt)}

        def student():
            self.engine.train_step(self.m, x, y, torch.zeros(len(y), dtype=torch.long), touts, 0, self.step_no,
                                   10 ** 6, self.autocast, self.env, self.cuda)
            self.step_no += 1

        for name, fn in (("teacher", teach), ("student", student)):
            for _ in range(3):
                fn()
            _sync(self.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(self.device)
            out[f"{name}_img_s"] = steps * self._b / (time.perf_counter() - t0)
        return out

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from .distillers import TeacherOut

        if self.chl and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self.autocast():
            touts = {"weak": TeacherOut(self.teacher(x).float())}
        self.engine.train_step(self.m, x, y, torch.zeros(len(y), dtype=torch.long), touts, 0, self.step_no,
                               10 ** 6, self.autocast, self.env, self.cuda)
        self.step_no += 1


def _timed(batches, device: torch.device, consume, n: int, b: int, skip: int = 1) -> dict:
    """Rate over batches skip+1..n of an iterator: the clock starts once ``skip`` batches have
    arrived. With W DataLoader workers, skip = W: the first W batches are made in parallel from the
    start and arrive in a burst, so only later ones show the steady rate."""
    it = iter(batches)
    got, t0 = 0, None
    for x, y in it:
        consume(x, y)
        got += 1
        if got == skip:
            _sync(device)
            t0 = time.perf_counter()
        if got >= n:
            break
    _sync(device)
    dt = time.perf_counter() - t0 if t0 is not None else float("nan")
    if hasattr(it, "close"):
        it.close()
    if got <= skip:
        raise RuntimeError(f"bench: the pipeline yielded {got} batches, fewer than {skip + 1} (make more JPEGs)")
    return {"img_s": (got - skip) * b / dt, "batches": got - skip}


def per_image_decode(split, datas: list[torch.Tensor], gen, dev) -> torch.Tensor:
    """``FolderSplit.decode_batch`` as one writes it first: the same decode and crop/flip draws,
    then a crop + antialiased resize (+ flip) per image (``data.resize_each``)."""
    from .data import augment_params, decode_images, resize_each

    imgs = decode_images(datas, dev)
    crops, flips = augment_params([(im.shape[2], im.shape[1]) for im in imgs], gen)
    return resize_each(imgs, crops, split.image_size, flips).round_().clamp_(0, 255).div_(255)


# views, allocation and scalar reads: ops that launch no kernel on a GPU
_METADATA_OPS = frozenset(
    "as_strided slice select view reshape _reshape_alias _unsafe_view unsqueeze squeeze permute narrow "
    "expand t transpose unbind split chunk flatten unflatten alias detach lift_fresh contiguous to "
    "resolve_conj resolve_neg item _local_scalar_dense is_nonzero empty empty_strided empty_like new_empty "
    "result_type".split())


def _profile(fn, device: torch.device, path: Path, per: int) -> dict:
    """Run ``fn`` under torch.profiler; write its op table (by self CPU and, on CUDA, self CUDA
    time) to ``path``; return, per batch (``per`` batches), the aten ops that compute (views,
    allocations and scalar reads left out: on a GPU each of the rest is a kernel launch, nested
    ones included) and, on CUDA, the kernel launches counted by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    kw = {}
    try:  # the decode side thread's ops too (by default only the thread that starts the profiler)
        from torch._C._profiler import _ExperimentalConfig
        kw["experimental_config"] = _ExperimentalConfig(profile_all_threads=True)
    except (ImportError, TypeError):  # an older torch: the calling thread only
        pass
    _sync(device)
    with profile(activities=acts, **kw) as prof:
        fn()
        _sync(device)
    ev = prof.key_averages()
    ops = sum(e.count for e in ev if e.key.startswith("aten::") and e.key[6:] not in _METADATA_OPS)
    launches = sum(e.count for e in ev if "LaunchKernel" in e.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tables = [ev.table(sort_by="self_cpu_time_total", row_limit=30)]
    if device.type == "cuda":
        tables.append(ev.table(sort_by="self_cuda_time_total", row_limit=30))
    path.write_text("\n\n".join(tables))
    return {"compute_ops_per_batch": ops / per, "kernels_per_batch": launches / per, "table": str(path)}


def make_jpegs(root: Path, n_train: int, n_val: int, px: int, classes: int, source: str | None,
               workers: int, seed: int = 0) -> dict:
    """An ImageFolder tree root/{train,val}/cNN/*.jpg (quality 90). Pictures come from ``source``
    (uint8 x_train (N,H,W,3)) or are smooth random images; px 0 = ImageNet-like sizes + noise."""
    from concurrent.futures import ProcessPoolExecutor

    rng = np.random.default_rng(seed)
    total = n_train + n_val
    if source:
        z = np.load(source)
        pics = z["x_train"]
        pics = pics[rng.integers(0, len(pics), total)]
    else:
        base = rng.integers(0, 256, (total, 8, 8, 3), dtype=np.uint8)  # upscaled: smooth pictures
        pics = base
    if px > 0:
        sizes = [(px, px)] * total
    else:
        sizes = [(int(rng.integers(400, 501)), int(rng.integers(333, 401))) for _ in range(total)]
    jobs = []
    classes = max(min(classes, n_train), 1)  # every val class must also be a train class
    for k in range(total):
        split = "train" if k < n_train else "val"
        d = root / split / f"c{(k if k < n_train else k - n_train) % classes:03d}"
        jobs.append((str(d / f"{k:06d}.jpg"), pics[k], sizes[k], px == 0, seed + k))
    for j in jobs:
        Path(j[0]).parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=max(workers, 1)) as ex:
        nbytes = sum(ex.map(_write_jpeg, jobs, chunksize=32))
    return {"files": total, "mean_kb": nbytes / total / 1024, "px": px or "~450x367"}


def _write_jpeg(job) -> int:
    from PIL import Image

    path, pic, (w, h), noisy, seed = job
    im = Image.fromarray(np.ascontiguousarray(pic)).resize((w, h), Image.BICUBIC)
    if noisy:  # camera-like grain: real photos at ~110 kB/image, not the few kB of a smooth upscale
        arr = np.asarray(im, dtype=np.int16)
        arr = arr + np.random.default_rng(seed).normal(0, 28, arr.shape).astype(np.int16)
        im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    im.save(path, quality=90)
    return os.path.getsize(path)


# -- the bench ----------------------------------------------------------------------------------

def main(device: str = "cpu", argv: list[str] | None = None) -> dict:
    from . import engine
    from .engine import Env
    from .models import build_model, save_weights

    a = parse(device, list(argv or []))
    env0 = Env(device=device)
    dev = env0.torch_device()
    cuda = dev.type == "cuda"
    threads = int(a.threads or os.environ.get("EFFDSTL_THREADS", 1))
    if not cuda:
        torch.set_num_threads(threads)
    out_json = Path(a.json or f"bench-{dev.type}.json")
    res: dict = {
        "device": _device_name(dev), "device_type": dev.type, "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads() if not cuda else None,
        "config": {k: getattr(a, k) for k in ("student", "weak", "strong", "image_size", "batch", "classes", "steps",
                                                "naive_steps", "repeats", "k", "jpegs", "jpeg_px", "workers", "compile")},
        "rows": [],
    }
    res["config"]["only"] = sorted(a.only)

    def save():
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(res, indent=2, default=str))

    def row(section, what, img_s, ratio=None, vs="", goal=None, **extra):
        r = {"section": section, "what": what, "img_s": round(img_s, 1)}
        if ratio is not None:
            r.update(ratio=round(ratio, 3), vs=vs)
        if goal is not None:
            r["goal"] = goal
        r.update(extra)
        res["rows"].append(r)
        shown = f"{r['ratio']:6.2f}x {vs}" if ratio is not None else ""
        print(f"  ({section}) {what:<60} {img_s:>10,.0f} img/s  {shown}"
              + (f"   [goal {goal}]" if goal else ""), flush=True)
        save()

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="effdstl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"effdstl bench on {res['device']} ({dev}), torch {torch.__version__}"
          + (f", {torch.get_num_threads()} CPU thread(s)" if not cuda else ""), flush=True)
    print(f"  student {a.student}; teachers {a.weak} (weak) and {a.strong} (strong); "
          f"{a.image_size}x{a.image_size}, batch {a.batch}, {a.classes} classes", flush=True)
    real_build = engine.build_data
    engine.build_data = _DataMemo(real_build)
    t_all = time.perf_counter()
    try:
        # -- shared set-up: in-memory data, teacher checkpoints (random init) --------------------
        npz = work / "data.npz"
        n_train = a.batch * a.steps
        _write_npz(npz, n_train, 32, a.image_size, a.classes)
        dataset = f"npz:{npz}"
        data = engine.build_data(dataset)
        ckpts = {}
        for role, spec in (("weak", a.weak), ("strong", a.strong)):
            torch.manual_seed({"weak": 1, "strong": 2}[role])
            net = build_model(spec, data.num_classes, in_chans=3, image_size=a.image_size,
                              mean=data.mean, std=data.std)
            ckpts[role] = str(work / f"teacher-{role}.pt")
            save_weights(net, ckpts[role])
        teachers = {r: {"model": s, "ckpt": ckpts[r]} for r, s in (("weak", a.weak), ("strong", a.strong))}
        quiet = lambda msg: None  # noqa: E731
        # teacher_cache off: (b)/(c) measure the engine and grouping, not caching (2 epochs of
        # crop+flip would hit it rarely anyway)
        env = Env(device=device, log=quiet, threads=threads, workers=a.workers, teacher_cache=False)

        # -- (a) naive ---------------------------------------------------------------------------
        naive = None
        if "a" in a.only or "b" in a.only:
            if cuda:  # PyTorch's defaults, whatever ran before
                torch.backends.cudnn.benchmark = False
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = True
            naive = naive_loop(a, data, ckpts["weak"], dev, a.naive_steps, repeats=max(a.repeats, 1))
            row("a", "naive loop (fp32, NCHW, .item() per step)", naive["img_s"], 1.0, "naive")

        # -- (b) the engine on the same work -----------------------------------------------------
        engine_rate = None
        if "b" in a.only or "d" in a.only:
            cfg = _run_cfg(a, dataset, {"name": "kd", "teacher": "weak", "tau": 1.0, "lam": 0.9},
                           {"weak": teachers["weak"]}, "kd")
            wall, steady, _ = _train([cfg], work / "b", env)
            engine_rate = n_train / steady
            mode = "bf16 autocast + channels_last" if cuda else "fp32 (CPU: no autocast/channels_last)"
            row("b", f"engine, 1 student ({mode})", engine_rate,
                engine_rate / naive["img_s"] if naive else None, "naive" if naive else "",
                goal=">= 3.5x naive" if cuda else None, wall_s=round(wall, 2))
            if cuda:  # where the time of one engine step goes, at the engine's settings
                parts = EngineStep(a, data, ckpts["weak"], dev, env).parts(a.naive_steps)
                row("b", "  of which: teacher forward alone", parts["teacher_img_s"])
                row("b", "  of which: student step alone (fwd + bwd + SGD)", parts["student_img_s"])

        # -- (c) a group of K against K separate runs --------------------------------------------
        if "c" in a.only:
            cfgs = _group_cfgs(a, dataset, teachers)
            k = len(cfgs)
            sep_wall = sep_steady = 0.0
            for i, c in enumerate(cfgs):
                w, s, _ = _train([c], work / "c-separate" / str(i), env)
                sep_wall, sep_steady = sep_wall + w, sep_steady + s
            # fusion is off here: (c) is what sharing the stream and the teachers buys; (f) adds fusion
            g_wall, g_steady, _ = _train(cfgs, work / "c-group", Env(**{**env.__dict__, "fuse": "off"}))
            sep_rate, g_rate = k * n_train / sep_steady, k * n_train / g_steady
            row("c", f"{k} separate engine runs (student-img/s)", sep_rate, 1.0, "separate",
                wall_s=round(sep_wall, 2), epoch_s=round(sep_steady, 3))
            row("c", f"one group of {k} (student-img/s)", g_rate, g_steady / sep_steady,
                "cost of separate (epoch)", goal="<= 0.6", wall_s=round(g_wall, 2), epoch_s=round(g_steady, 3))
            res["rows"][-1]["wall_ratio"] = round(g_wall / sep_wall, 3)
            print(f"      whole calls incl. set-up, {1 + a.repeats} epochs, evaluation and checkpoints: group {g_wall:.1f} s, "
                  f"separate {sep_wall:.1f} s ({g_wall / sep_wall:.2f}x)", flush=True)
            save()

        # -- (f) fused student groups vs the loop ------------------------------------------------
        if "f" in a.only:
            _bench_fused(a, row, dev, env)
            save()

        # -- (d) the JPEG pipeline ---------------------------------------------------------------
        if "d" in a.only:
            _bench_data(a, res, row, work, dev, env, ckpts["weak"], engine_rate)

        # -- (b) with torch.compile, last: compilation takes minutes ------------------------------
        left = a.budget - (time.perf_counter() - t_all) if a.budget else None
        if a.compile and "b" in a.only and left is not None and left < 150:
            print(f"  (b) engine + torch.compile: skipped, {left:.0f} s of --budget left", flush=True)
            res["compile_skipped"] = f"{left:.0f} s left"
        elif a.compile and "b" in a.only:
            cfg = _run_cfg(a, dataset, {"name": "kd", "teacher": "weak", "tau": 1.0, "lam": 0.9},
                           {"weak": teachers["weak"]}, "kd")
            envc = Env(**{**env.__dict__, "compile": True})
            wall, steady, _ = _train([cfg], work / "b-compile", envc)
            r = n_train / steady
            row("b", "engine + torch.compile (students and teachers)", r, r / naive["img_s"] if naive else None,
                "naive" if naive else "", goal=">= 3.5x naive" if cuda else None,
                wall_s_with_compile=round(wall, 2))
    finally:
        engine.build_data = real_build
        res["bench_s"] = round(time.perf_counter() - t_all, 1)
        save()
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out_json} ({res['bench_s']:.0f} s)", flush=True)
    return res


def fused_group_rates(spec: str, size: int, chans: int, k: int, batch: int, dev: torch.device, env,
                      steps: int, classes: int = 10) -> dict:
    """student-img/s of K students of ``spec`` stepped by the engine one after another (the loop)
    and as one fused model, on the same batches and teacher outputs: Fig. 5's mix of distillers
    (KD from each teacher + replacement schemes x subsets), the engine's autocast and layout.
    Also the peak memory of each (CUDA) or the bytes of weights + grads + momentum (CPU)."""
    from . import engine
    from .distillers import TeacherOut
    from .fused import fuse
    from .models import build_model

    cuda = dev.type == "cuda"
    amp = env.amp if env.amp is not None else cuda
    chl = (env.channels_last if env.channels_last is not None else cuda) and not spec.startswith("mlp:")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext
    dists = [{"name": "kd", "teacher": t, "tau": 1.0, "lam": 0.9} for t in ("weak", "strong")]
    dists += [{"name": "replace", "teacher": "weak", "strong": "strong", "scheme": sc, "subset": su, "tau": 1.0,
               "lam": 0.9} for su in grid_defaults(SUBSETS) + ["not_reg"] for sc in SCHEMES][:max(k - 2, 0)]
    dists = (dists * k)[:k]
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(batch, chans, size, size, generator=gen).to(dev) for _ in range(4)]
    if chl:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    ys = [torch.randint(0, classes, (batch,), generator=gen).to(dev) for _ in range(4)]
    touts = [{t: TeacherOut(torch.randn(batch, classes, generator=gen).to(dev) * 3) for t in ("weak", "strong")}
             for _ in range(4)]
    idx = torch.arange(batch)

    def members():
        ms = []
        for d in dists:
            torch.manual_seed(0)
            st = _stage(1, d)
            model = build_model(spec, classes, in_chans=chans, image_size=size).to(dev)
            if chl:
                model.to(memory_format=torch.channels_last)
            ms.append(engine.Member.standalone(model, st, batch, dev, spec))
        return ms

    def timed(units, n):
        for i in range(n):
            for u in units:
                engine.train_step(u, xs[i % 4], ys[i % 4], idx, touts[i % 4], 0, i, 10 ** 6, autocast, env, cuda)
        _sync(dev)

    out = {}
    for mode in ("loop", "fused"):
        ms = members()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        units = ms
        if mode == "fused":
            net = fuse([m.model for m in ms], xs[0][:2])
            if chl:
                net.to(memory_format=torch.channels_last)
            g = engine.FusedMembers(ms, net, ddp=net, opt=engine.make_optimizer(net, ms[0].stages[0]), stage=0)
            g.new_epoch(dev, batch)
            units = [g]
            for m in ms:  # the members' own copies are only written at an epoch's end
                m.model.to("cpu") if cuda else None
        timed(units, 3 if cuda else 1)  # warm-up: cudnn autotuning, allocator
        reps = []
        for _ in range(3 if cuda else 2):
            t0 = time.perf_counter()
            timed(units, steps)
            reps.append(time.perf_counter() - t0)
        dt = float(np.median(reps))
        params = units[0].net if mode == "fused" else None
        mem = (torch.cuda.max_memory_allocated(dev) if cuda else
               3 * sum(p.numel() * p.element_size() for p in (params.parameters() if params is not None else
                                                             (q for m in ms for q in m.model.parameters()))))
        out[mode] = {"student_img_s": k * batch * steps / dt, "step_ms": 1e3 * dt / steps, "memory_bytes": int(mem)}
        del ms, units
    return out


def _bench_fused(a, row, dev: torch.device, env) -> None:
    """(f): a group of K students fused vs looped, per model; on CUDA also the projected GPU-hours
    of a paper-scale CIFAR-10 Fig. 5 triplet, teachers included (``_project_figure5``)."""
    cuda = dev.type == "cuda"
    steps = 20 if cuda else 3
    for spec, size, chans in a.fuse_models:
        r = fused_group_rates(spec, size, chans, a.fuse_k, a.fuse_batch, dev, env, steps)
        lo, fu = r["loop"], r["fused"]
        tag = f"{a.fuse_k} x {spec} @ {size}px, batch {a.fuse_batch}"
        row("f", f"{tag}: loop (student-img/s)", lo["student_img_s"], 1.0, "loop", memory_mb=round(lo["memory_bytes"] / 2**20, 3))
        row("f", f"{tag}: fused", fu["student_img_s"], fu["student_img_s"] / lo["student_img_s"], "loop",
            goal=">= 5x" if cuda and spec == "resnet20" else None, memory_mb=round(fu["memory_bytes"] / 2**20, 3))
        if spec.startswith("resnet"):
            _project_figure5(a, row, dev, env, fu["student_img_s"], lo["student_img_s"], steps)


# The paper's CIFAR-10 Fig. 5 triplet (studies/figure5-cifar10.yaml): resnet32 (weak) and resnet110
# (strong) teachers, 240 epochs of 50,000 images for the teachers and for each of the 17 students.
PAPER_TRIPLET = {"weak": "resnet32", "strong": "resnet110", "epochs": 240, "images": 50_000, "students": 17}
CIFAR_VARIANTS = 162   # pad-4 crop (9 x 9 offsets) x flip: the distinct inputs one image can become


def cache_hit_rate(epochs: int, variants: int = CIFAR_VARIANTS) -> float:
    """Expected share of teacher lookups the exact teacher-output cache answers when each epoch draws
    one of ``variants`` equally likely augmentations per image: 1 - E[distinct draws] / epochs, with
    E[distinct] = V (1 - (1 - 1/V)^E). 240 epochs over 162 variants: 0.48."""
    distinct = variants * (1.0 - (1.0 - 1.0 / variants) ** epochs)
    return 1.0 - distinct / epochs


def _teacher_rates(spec: str, batch: int, dev: torch.device, env, steps: int) -> tuple[float, float]:
    """(forward img/s, train-step img/s) of one CIFAR ResNet at ``batch``, the engine's autocast and
    layout: what a frozen teacher costs per batch, and what training it costs."""
    from .models import build_model

    cuda = dev.type == "cuda"
    net = build_model(spec, 10, image_size=32).to(dev)
    chl = env.channels_last if env.channels_last is not None else cuda
    x = torch.rand(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    if chl:
        net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def fwd():
        with torch.no_grad(), ac():
            net(x)

    def step():
        with ac():
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rates = []
    for fn, mode in ((fwd, net.eval), (step, net.train)):
        mode()
        for _ in range(3):
            fn()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(dev)
        rates.append(steps * batch / (time.perf_counter() - t0))
    return rates[0], rates[1]


def _project_figure5(a, row, dev: torch.device, env, fused_rate: float, loop_rate: float, steps: int) -> None:
    """Projected device-hours of the paper's CIFAR-10 Fig. 5 triplet, teachers included: training
    both teachers, then the 17 students (fused or looped) with the two teachers' forwards per batch,
    of which the exact teacher-output cache answers ``cache_hit_rate(240)``. Evaluation is not counted."""
    cuda = dev.type == "cuda"
    t = PAPER_TRIPLET
    imgs = t["epochs"] * t["images"]
    rates = {role: _teacher_rates(t[role], a.fuse_batch, dev, env, steps) for role in ("weak", "strong")}
    hit = cache_hit_rate(t["epochs"])
    teach_train = sum(imgs / r[1] for r in rates.values())
    teach_fwd = sum(imgs / r[0] for r in rates.values())
    h = {"teachers_train": teach_train / 3600, "teacher_forwards_uncached": teach_fwd / 3600,
         "teacher_forwards_cached": (1 - hit) * teach_fwd / 3600,
         "students_fused": imgs * t["students"] / fused_rate / 3600,
         "students_loop": imgs * t["students"] / loop_rate / 3600}
    fused_total = h["teachers_train"] + h["students_fused"] + h["teacher_forwards_cached"]
    loop_total = h["teachers_train"] + h["students_loop"] + h["teacher_forwards_uncached"]
    row("f", f"projection: paper's CIFAR-10 Fig. 5 triplet ({t['weak']} -> {t['strong']}, 17 x resnet20, "
        f"{t['epochs']} ep), teachers included, fused + cache", fused_rate, loop_total / fused_total,
        "loop, no cache (projected hours)", goal="<= 1 GPU-hour" if cuda else None,
        projected_hours=round(fused_total, 3), projected_hours_loop=round(loop_total, 3),
        parts_hours={k: round(v, 3) for k, v in h.items()}, cache_hit_rate=round(hit, 3),
        teacher_fwd_img_s={t[r]: round(v[0]) for r, v in rates.items()},
        teacher_train_img_s={t[r]: round(v[1]) for r, v in rates.items()})
    print(f"      projected on this device: {fused_total:.2f} h fused with the teacher cache vs {loop_total:.2f} h "
          f"looped without (teachers' training {h['teachers_train']:.2f} h; students {h['students_fused']:.2f} h "
          f"fused / {h['students_loop']:.2f} h looped; teacher forwards {h['teacher_forwards_cached']:.2f} h at a "
          f"{hit:.0%} cache hit rate / {h['teacher_forwards_uncached']:.2f} h uncached; evaluation not counted)",
          flush=True)


def _bench_data(a, res, row, work: Path, dev: torch.device, env, teacher_ckpt: str, engine_rate) -> None:
    from .data import KeyedView, build_data, decode_images
    from .data.stream import decoded
    from .engine import Env

    b = a.batch
    skip = max(a.workers, 1)  # loaders: the first W batches come in a burst (see _timed)
    n = max(a.naive_steps + 1, 3 * skip + 1)
    if a.jpeg_dir:
        root = Path(a.jpeg_dir)
        made = {"folder": str(root)}
    else:
        root = work / "jpegs"
        src = a.source or os.environ.get("EFFDSTL_BENCH_SOURCE") or None
        made = make_jpegs(root, max(a.jpegs, b * n), b, a.jpeg_px, min(a.classes, 100), src, a.workers)
    res["jpegs"] = made
    data = build_data(f"folder:{root}", image_size=a.image_size)
    split = data.train
    n = min(n, len(split) // b)
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    batches = [order[i * b:(i + 1) * b].tolist() for i in range(n)]
    cuda = dev.type == "cuda"
    print(f"      {made.get('files', len(split))} JPEGs ({made.get('px', '?')}, "
          f"{made.get('mean_kb', 0):.0f} kB mean), {a.workers} workers", flush=True)

    from .models import build_model, save_weights

    torch.manual_seed(1)  # a teacher for this dataset's classes
    save_weights(build_model(a.weak, data.num_classes, in_chans=3, image_size=a.image_size,
                             mean=data.mean, std=data.std), work / "teacher-jpeg.pt")
    step = EngineStep(a, data, str(work / "teacher-jpeg.pt"), dev, env)
    # compute only: the same step on batches already on the device
    xs = [torch.rand(b, 3, a.image_size, a.image_size, device=dev) for _ in range(2)]
    ys = [torch.randint(0, data.num_classes, (b,), device=dev) for _ in range(2)]
    for i in range(3):  # warm-up: autotuning, allocator
        step(xs[i % 2], ys[i % 2])
    comp = _timed(((xs[i % 2], ys[i % 2]) for i in range(n)), dev, step, n, b)["img_s"]
    row("d", "compute only: engine step, batches on the device", comp, 1.0, "compute")

    key = 1234  # the epoch's augmentation key, as the engine draws one per epoch

    def cpu_loader():  # the engine's PIL path
        dl = torch.utils.data.DataLoader(KeyedView(split, key), batch_sampler=batches, num_workers=a.workers,
                                         pin_memory=cuda, persistent_workers=False)
        for x, y, _ in dl:
            yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    def dev_loader(share: float = 0.0):  # the engine's device path (share > 0: mixed)
        for x, y, _ in decoded(split, batches, key, dev, Env(**{**env.__dict__, "cpu_share": share}).stream(), None):
            yield x, y

    where = "GPU (nvJPEG)" if cuda else "CPU, same code"
    noop = lambda x, y: None  # noqa: E731
    # the device's decode + augment alone, files already in memory: the decoder's own ceiling
    mem = [[split.read_bytes(i) for i in bt] for bt in batches]
    gen = torch.Generator().manual_seed(0)
    r0 = _timed(((decode_images(d, dev), None) for d in mem), dev, noop, n, b)["img_s"]
    row("d", f"decode only on {where}, bytes in memory", r0, r0 / comp, "compute")
    r = _timed(((split.decode_batch(d, gen, dev), None) for d in mem), dev, noop, n, b)["img_s"]
    row("d", f"decode + RRC + flip on {where}, bytes in memory", r, r / comp, "compute")
    gen = torch.Generator().manual_seed(0)
    r_ref = _timed(((per_image_decode(split, d, gen, dev), None) for d in mem), dev, noop, n, b)["img_s"]
    row("d", "  the same, resized image by image (reference loop)", r_ref, r_ref / comp, "compute",
        batched_vs_loop=round(r / r_ref, 3))
    if a.profile:
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        res["profile"] = {
            "decode_batch": _profile(lambda: [split.decode_batch(d, g1, dev) for d in mem[:2]], dev,
                                     Path(a.profile) / "decode-batched.txt", per=2),
            "per_image_loop": _profile(lambda: [per_image_decode(split, d, g2, dev) for d in mem[:2]], dev,
                                       Path(a.profile) / "decode-per-image.txt", per=2),
        }

        def end_to_end():
            for i, (x, y) in enumerate(dev_loader()):
                step(x, y)
                if i + 1 >= min(n, 6):
                    break
        res["profile"]["jpeg_to_step"] = _profile(end_to_end, dev, Path(a.profile) / "jpeg-to-step.txt",
                                                  per=min(n, 6))
        for k, v in res["profile"].items():
            print(f"      profile {k}: {v['compute_ops_per_batch']:.0f} computing aten ops"
                  + (f", {v['kernels_per_batch']:.0f} kernel launches" if cuda else "")
                  + f" per batch -> {v['table']}", flush=True)
    r_pil = _timed(cpu_loader(), dev, noop, n, b, skip)["img_s"]
    row("d", f"JPEG, {a.workers} workers decoding with PIL, alone", r_pil, r_pil / comp, "compute")
    r_dev = _timed(dev_loader(), dev, noop, n, b, skip)["img_s"]
    row("d", f"JPEG, workers read bytes, decode on {where}, alone", r_dev, r_dev / comp, "compute")
    r = _timed(cpu_loader(), dev, step, n, b, skip)["img_s"]
    row("d", "JPEG -> step, PIL workers  [--decode workers]", r, r / comp, "compute")
    r = _timed(dev_loader(), dev, step, n, b, skip)["img_s"]
    row("d", f"JPEG -> step, decode on {where}  [--decode device]", r, r / comp, "compute",
        goal=">= 0.95" if cuda else None)
    # both decoders at once: PIL takes the share of each batch that balances the two rates
    share = min(max(round(20 * r_pil / (r_pil + r_dev)) / 20, 0.05), 0.95)
    r = _timed(dev_loader(share), dev, noop, n, b, skip)["img_s"]
    row("d", f"JPEG, {share:.0%} PIL workers + rest on {where}, alone", r, r / comp, "compute")
    r = _timed(dev_loader(share), dev, step, n, b, skip)["img_s"]
    row("d", f"JPEG -> step, mixed  [--decode mixed:{share:g}]", r, r / comp, "compute",
        goal=">= 0.95" if cuda else None)
    res["suggested_decode"] = f"mixed:{share:g}"
