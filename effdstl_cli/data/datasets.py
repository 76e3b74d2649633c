"""Datasets by name -> ``Data``: train and test splits of (image in [0, 1], label, sample index),
class names, channels, image size and the normalization the models apply (models.Net): pixel
space here, so the FGSM probe can step and clip in it and hub weights see their own statistics.
Also the stratified per-class subsets of a study (train_per_class / test_per_class).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DATA_KEYS, data_keys
from ..errors import EffdstlError, unknown
from ..network import online
from . import folder as fs
from .folder import BadImage, FolderSplit
from .memory import TensorSplit
from .spec import DATASETS, check_dataset_spec  # noqa: F401 - torch-free (planning); re-exported

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Per-channel statistics the models normalize with. digits/synthetic keep raw pixels (identity):
# the measured digits triplets in docs/METHOD.md feed the MLPs pixel/16 unnormalized.
_STATS = {
    "identity": ((0.0,), (1.0,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Data:
    name: str
    family: str             # digits | synthetic | mnist | cifar | imagenet
    num_classes: int
    classes: list[str]
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: TensorSplit | FolderSplit
    test: TensorSplit | FolderSplit


# -- builders --------------------------------------------------------------------------------

def data_args(cfg: dict) -> dict:
    """``build_data``'s arguments for a run config (its ``config.data_keys``)."""
    d = data_keys(cfg)
    return {"spec": d["dataset"], "data_root": d["data_root"], "image_size": d["image_size"],
            **{k: d[k] for k in DATA_KEYS[3:] if k in d}}


def data_for(cfg: dict) -> "Data":
    """The data of a run config."""
    return build_data(**data_args(cfg))


def per_class_subset(labels: torch.Tensor, n: int, num_classes: int, what: str, seed: int = 0) -> torch.Tensor:
    """Indices of a stratified, seeded subset: ``n`` samples of every class (sorted, so the
    subset keeps the split's order). One fixed draw per dataset (seed 0): every run of every study
    sees the same images. A class with fewer than ``n`` is one clear error."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) < n:
        c = int(counts.argmin())
        raise EffdstlError(f"{what}_per_class={n} but class {c} has only {int(counts[c])} {what} images")
    g = torch.Generator().manual_seed(seed)
    keep = [torch.nonzero(labels == c).flatten()[torch.randperm(int(counts[c]), generator=g)[:n]]
            for c in range(num_classes)]
    return torch.cat(keep).sort().values


def _subset(split, idx: torch.Tensor):
    if isinstance(split, FolderSplit):
        return FolderSplit([split.samples[int(i)] for i in idx], split.train, split.image_size)
    return TensorSplit(split.images[idx], split.labels[idx], split.train, split.augment)


def build_data(spec: str, data_root: str | None = None, image_size: int | None = None,
               augment: bool = True, train_per_class: int | None = None,
               test_per_class: int | None = None) -> Data:
    """A dataset by spec (see DATASETS). ``augment=False`` turns training augmentation off;
    ``*_per_class``: a stratified, seeded subset of that split (``per_class_subset``)."""
    spec = str(spec).strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    check_dataset_spec(spec)
    if kind == "folder" or kind == "imagenet":
        data = _folder(spec, Path(arg).expanduser(), int(image_size or 224))
    else:
        data = {"digits": _digits, "synthetic": _synthetic, "npz": lambda: _npz(spec, Path(arg).expanduser()),
                "mnist": lambda: _mnist(kind, data_root), "fashion-mnist": lambda: _mnist(kind, data_root),
                "cifar10": lambda: _cifar(kind, data_root), "cifar100": lambda: _cifar(kind, data_root)}[kind]()
        if image_size is not None and int(image_size) != data.image_size:
            raise EffdstlError(f"image_size={image_size} applies to folder/imagenet datasets only; "
                               f"{spec} images are {data.image_size}x{data.image_size} (set image_size: null)")
    for what, n in (("train", train_per_class), ("test", test_per_class)):
        if n is not None:
            split = getattr(data, what)
            setattr(data, what, _subset(split, per_class_subset(split.labels, int(n), data.num_classes, what)))
    if not augment:
        data.train.augment = "none"
        if isinstance(data.train, FolderSplit):
            data.train.train = False
    return data


def _in_memory(name, family, classes, stats, xtr, ytr, xte, yte, augment="none") -> Data:
    """Data from (N, C, H, W) tensors; labels checked against the class list."""
    for split, y in (("train", ytr), ("test", yte)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise EffdstlError(f"{name}: {split} labels span {int(y.min())}..{int(y.max())} "
                               f"but there are {len(classes)} classes")
    return Data(name=name, family=family, num_classes=len(classes), classes=list(classes),
                in_chans=xtr.shape[1], image_size=xtr.shape[2], mean=stats[0], std=stats[1],
                train=TensorSplit(xtr, ytr, True, augment), test=TensorSplit(xte, yte, False))


def _digits() -> Data:
    """scikit-learn digits (embedded, offline): 8x8 grey, pixel/16; fixed stratified 1078/719 split.

    Read from the csv scikit-learn ships and split as its ``train_test_split(..., test_size=0.4,
    stratify=y, random_state=0)`` does, without importing scikit-learn (2.5 s on 2 cores, paid by
    every digits command); tests/test_engine.py holds the arrays equal to scikit-learn's."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise EffdstlError("the digits dataset comes with scikit-learn, which is not installed")
    with gzip.open(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz", "rt") as f:
        raw = np.loadtxt(f, delimiter=",")
    target = raw[:, -1].astype(int)
    x = torch.tensor(raw[:, :-1].reshape(-1, 8, 8) / 16.0, dtype=torch.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(target, dtype=torch.long)
    tr, te = stratified_split(target, test_size=0.4, seed=0)
    return _in_memory("digits", "digits", [str(c) for c in range(10)], _STATS["identity"],
                      x[tr], y[tr], x[te], y[te])


def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's ``utils.extmath._approximate_mode`` (the per-class counts of a stratified draw)."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def stratified_split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices exactly as scikit-learn's ``train_test_split(arange(n), test_size=...,
    stratify=y, random_state=seed)`` (its StratifiedShuffleSplit, one split)."""
    import math

    n = len(y)
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    _, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(y_idx, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train, test = [], []
    for i in range(len(counts)):
        perm = by_class[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(perm[:n_i[i]])
        test.extend(perm[n_i[i]:n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _synthetic(seed: int = 0, n_train: int = 2000, n_test: int = 500, sigma: float = 0.6) -> Data:
    """10 noisy class prototypes, 1x8x8: fast, deterministic (numpy PCG64), learnable, not trivial.

    With sigma 0.6 a 64-16-10 MLP reaches ~85% test in a few epochs and a 256-256 MLP ~92%.
    """
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 1, (10, 64))

    def draw(n):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = np.clip(protos[y] + rng.normal(0, sigma, (n, 64)), 0, 1)
        return torch.tensor(x, dtype=torch.float32).view(n, 1, 8, 8), torch.tensor(y, dtype=torch.long)

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    return _in_memory("synthetic", "synthetic", [f"class{c}" for c in range(10)], _STATS["identity"],
                      xtr, ytr, xte, yte)


def _default_root(data_root: str | None) -> Path:
    return Path(data_root or os.environ.get("EFFDSTL_DATA") or "data").expanduser()


def _torchvision(cls, kind: str, root: Path, host: str, cure: str):
    """(train, test) torchvision datasets from ``root``, downloading them only when online."""
    try:
        return cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError:
        pass  # not there (or corrupt): try a download
    if not online(host):
        raise EffdstlError(f"{kind} is not under {root} and cannot be downloaded (offline?): {cure}")
    try:
        return cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise EffdstlError(f"{kind} could not be downloaded into {root} ({type(exc).__name__}: {exc}); {cure}")


def _cifar(kind: str, data_root: str | None) -> Data:
    import torchvision.datasets as tvd

    root = _default_root(data_root)
    cure = (f"run once online so torchvision downloads it into {root} (or copy torchvision's "
            f"cifar-10-batches-py there), or use your own copy as npz:PATH (uint8 x_train/y_train/"
            f"x_test/y_test) or folder:PATH (an ImageFolder with train/ and val/)")
    cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    tr, te = _torchvision(cls, kind, root, "www.cs.toronto.edu", cure)
    as_t = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return _in_memory(kind, "cifar", tr.classes, _STATS[kind], as_t(tr.data), torch.tensor(tr.targets),
                      as_t(te.data), torch.tensor(te.targets), augment="crop_flip")


def _mnist(kind: str, data_root: str | None) -> Data:
    import torchvision.datasets as tvd

    root = _default_root(data_root)
    if kind == "fashion-mnist":
        cls, host = tvd.FashionMNIST, "fashion-mnist.s3-website.eu-central-1.amazonaws.com"
        tv_dir = root / "FashionMNIST" / "raw"
        has_tv = tv_dir.is_dir() and any(tv_dir.iterdir())
        if not has_tv and (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists():
            # the Debian package: offline, no torchvision layout needed
            xtr, ytr, xte, yte = (torch.from_numpy(_read_idx(DEBIAN_FASHION / f)) for f in (
                "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
            return _in_memory(kind, "mnist", FASHION_CLASSES, _STATS[kind], xtr[:, None].contiguous(),
                              ytr.long(), xte[:, None].contiguous(), yte.long())
        cure = f"apt-get install dataset-fashion-mnist, or put the torchvision files under {root}"
    else:
        cls, host = tvd.MNIST, "ossci-datasets.s3.amazonaws.com"
        cure = f"put the torchvision files under {root} (MNIST/raw/*-ubyte)"
    tr, te = _torchvision(cls, kind, root, host, cure)
    return _in_memory(kind, "mnist", list(tr.classes), _STATS[kind], tr.data[:, None].contiguous(),
                      tr.targets.long(), te.data[:, None].contiguous(), te.targets.long())


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not, of unsigned bytes."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    ndim, code = raw[3] if len(raw) > 3 else 0, raw[2] if len(raw) > 2 else 0
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    if code != 0x08 or ndim == 0 or len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
        raise EffdstlError(f"{path} is not a complete IDX file of unsigned bytes (truncated or corrupt?)")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _npz(spec: str, path: Path) -> Data:
    """uint8 x_train/x_test (N,H,W,C) or (N,H,W), integer y_train/y_test, optional classes."""
    if not path.is_file():
        raise EffdstlError(f"npz file {path} does not exist (an npz holds uint8 x_train, y_train, x_test, "
                           f"y_test; for CIFAR-10 without one, use dataset cifar10: torchvision downloads it)")
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
    except Exception as exc:
        raise EffdstlError(f"npz file {path} cannot be read ({type(exc).__name__}: {exc}); is it truncated?")
    need = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in need if k not in keys]
    if missing:
        raise EffdstlError(f"npz file {path} lacks {', '.join(missing)} (has: {', '.join(sorted(keys)) or 'nothing'}); "
                           f"expected uint8 x_train (N,H,W,C), y_train (N,), x_test, y_test")
    arr = {}
    try:
        for k in need + (("classes",) if "classes" in keys else ()):
            arr[k] = z[k]
    except Exception as exc:
        if "allow_pickle" in str(exc):  # numpy's advice (allow_pickle=True) would run the file's code
            raise EffdstlError(f"npz file {path}: key '{k}' holds Python objects (an object array), which are not "
                               f"loaded for safety; store it as plain numbers (or strings for classes)") from None
        raise EffdstlError(f"npz file {path}: key '{k}' cannot be read ({type(exc).__name__}: {exc})") from None
    for k in ("x_train", "x_test"):
        a = arr[k]
        if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (1, 3)):
            raise EffdstlError(f"npz file {path}: {k} has shape {a.shape} and dtype {a.dtype}; "
                               f"expected uint8 (N,H,W,C) with C 1 or 3, or (N,H,W)")
        if a.ndim == 3:
            arr[k] = a[..., None]
    if arr["x_train"].shape[1:] != arr["x_test"].shape[1:]:
        raise EffdstlError(f"npz file {path}: x_train images are {arr['x_train'].shape[1:]} but x_test's "
                           f"are {arr['x_test'].shape[1:]}")
    for s in ("train", "test"):
        y, n = arr[f"y_{s}"], len(arr[f"x_{s}"])
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise EffdstlError(f"npz file {path}: y_{s} has shape {y.shape} and dtype {y.dtype}; expected integer (N,)")
        if len(y) != n:
            raise EffdstlError(f"npz file {path}: y_{s} has {len(y)} labels but x_{s} has {n} images")
        if n == 0:
            raise EffdstlError(f"npz file {path}: x_{s} is empty")
    classes = _npz_classes(path, arr)
    xtr = torch.from_numpy(arr["x_train"]).permute(0, 3, 1, 2).contiguous()
    xte = torch.from_numpy(arr["x_test"]).permute(0, 3, 1, 2).contiguous()
    c = xtr.shape[1]
    return _in_memory(spec, "cifar" if c == 3 else "mnist", classes, _channel_stats(xtr),
                      xtr, torch.from_numpy(arr["y_train"]).long(), xte, torch.from_numpy(arr["y_test"]).long(),
                      augment="crop_flip" if c == 3 else "none")


def _npz_classes(path: Path, arr: dict) -> list[str]:
    """The class names: the file's ``classes`` (then N = its length and labels must lie in 0..N-1),
    else 0..N-1 from the labels, which must then be exactly 0..N-1 with every class in the train
    split (a stray label 255 would build a 256-class model; a class only in the test split cannot be
    learned)."""
    ytr, yte = arr["y_train"], arr["y_test"]
    lo = int(min(ytr.min(), yte.min()))
    if "classes" in arr:
        classes = [str(c) for c in np.asarray(arr["classes"]).reshape(-1)]
        hi = int(max(ytr.max(), yte.max()))
        if lo < 0 or hi >= len(classes):
            raise EffdstlError(f"npz file {path}: labels run from {lo} to {hi} but 'classes' names {len(classes)} "
                               f"classes (labels must be 0..{len(classes) - 1})")
        return classes
    present = np.unique(ytr)
    n = int(present.max()) + 1
    if lo < 0 or len(present) != n:
        gaps = sorted(set(range(max(n, 0))) - set(int(v) for v in present))
        raise EffdstlError(f"npz file {path}: train labels are not 0..N-1 with every class present (labels "
                           f"{int(present.min())}..{int(present.max())}, {len(present)} distinct"
                           + (f", missing {', '.join(map(str, gaps[:5]))}{' ...' if len(gaps) > 5 else ''}" if gaps else "")
                           + "); relabel them, or add a 'classes' array naming all N classes")
    extra = sorted(set(int(v) for v in np.unique(yte)) - set(range(n)))
    if extra:
        raise EffdstlError(f"npz file {path}: test labels {', '.join(map(str, extra[:5]))} never occur in the "
                           f"train split ({n} classes: 0..{n - 1}); a class only in the test split cannot be "
                           "learned (add a 'classes' array to say N if that is meant)")
    return [str(c) for c in range(n)]


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 (N, C, H, W) in [0, 1] units, in chunks (no full float copy)."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for chunk in x.split(4096):
        f = chunk.double().div_(255)
        s += f.sum((0, 2, 3))
        s2 += f.square().sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(max(v, 1e-3), 4) for v in std.tolist())


def _folder(spec: str, root: Path, image_size: int) -> Data:
    """An ImageFolder tree: ROOT/train/<class>/* and ROOT/val/<class>/* (or ROOT/test/...)."""
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (or test/)"
    if not root.is_dir():
        raise EffdstlError(f"dataset folder {root} does not exist ({layout})")
    if not (root / "train").is_dir():
        raise EffdstlError(f"dataset folder {root} has no train/ subfolder; {layout}")
    held = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if held is None:
        raise EffdstlError(f"dataset folder {root} has no val/ or test/ subfolder; {layout}")
    classes, train = _scan(root / "train", None)
    _, test = _scan(held, classes)
    tr, te = FolderSplit(train, True, image_size), FolderSplit(test, False, image_size)
    # The test split is small and read after every epoch: decode it all now, so a bad file is named
    # before any training (not after a whole epoch, on every retry). With --skip-bad-images the
    # train split is checked too and bad files of both are left out (counted in final.json).
    bad_te = te.check()
    if bad_te and not fs.SKIP_BAD_IMAGES:
        raise BadImage(bad_te[0][1] + (f" ({len(bad_te)} bad files in {held.name}/)" if len(bad_te) > 1 else ""))
    if fs.SKIP_BAD_IMAGES:
        bad_tr = tr.check()
        fs._SKIPPED[str(spec)] = [tr.samples[k][0] for k, _ in bad_tr] + [te.samples[k][0] for k, _ in bad_te]
        tr, te = tr.without({k for k, _ in bad_tr}), te.without({k for k, _ in bad_te})
        if not len(tr) or not len(te):
            raise EffdstlError(f"dataset folder {root}: no decodable image left in {'train' if not len(tr) else held.name}/")
    return Data(name=spec, family="imagenet", num_classes=len(classes), classes=classes, in_chans=3,
                image_size=image_size, mean=_STATS["imagenet"][0], std=_STATS["imagenet"][1], train=tr, test=te)


def _scan(d: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(file, label)]) of one split folder; ``classes`` fixes the labels (test split)."""
    subdirs = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise EffdstlError(f"{d} has no class subfolders (expected {d}/<class>/<image>; "
                           f"ImageNet's flat val/ must first be sorted into class folders)")
    if classes is None:
        classes = subdirs
    extra = sorted(set(subdirs) - set(classes))
    if extra:
        raise EffdstlError(f"{d} has class folder(s) {', '.join(extra[:5])} that the train/ split lacks")
    label = {c: k for k, c in enumerate(classes)}
    samples = []
    for c in subdirs:
        files = sorted(os.path.join(top, f) for top, _, fs in os.walk(d / c, followlinks=True)
                       for f in fs if f.lower().endswith(IMG_EXTENSIONS))
        samples += [(f, label[c]) for f in files]
    if not samples:
        raise EffdstlError(f"{d} holds no images ({' '.join(IMG_EXTENSIONS)}) in its class folders")
    return classes, samples
