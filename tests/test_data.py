"""Datasets: real data (sklearn digits, a CIFAR-10 copy when one is given, Debian fashion-mnist), no mocks."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import real_data_dir
import torch

from effdstl_cli.data import DEBIAN_FASHION, FolderSplit, TensorSplit, build_data
from effdstl_cli.errors import EffdstlError

# A real CIFAR-10 copy (cifar10-jpeg.npz + its unpack-cifar10 script): $EFFDSTL_TEST_DATA, default
# the repository's (git-ignored) data/ folder; the tests that need it are skipped without it.
TEST_DATA = real_data_dir()
UNPACK = TEST_DATA / "unpack-cifar10"
needs_cifar = pytest.mark.skipif(not (TEST_DATA / "cifar10-jpeg.npz").exists(),
                                 reason="no CIFAR-10 copy (cifar10-jpeg.npz) in $EFFDSTL_TEST_DATA (default: data/, or the CIFAR-10 copy a workspace keeps beside the repo)")


def _unpack(dest: Path, *args: str) -> Path:
    subprocess.run([sys.executable, str(UNPACK), str(dest), *args], check=True, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def c10_npz(tmp_path_factory):
    return _unpack(tmp_path_factory.mktemp("npz") / "c10.npz", "--per-class-train", "30", "--per-class-test", "6")


@pytest.fixture(scope="module")
def c10_folder(tmp_path_factory):
    return _unpack(tmp_path_factory.mktemp("folder") / "c10", "--format", "folder",
                   "--per-class-train", "4", "--per-class-test", "2")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- digits / synthetic --------------------------------------------------------------------

def test_digits_fixed_stratified_split_and_item_contract():
    d = build_data("digits")
    assert (d.name, d.family, d.num_classes, d.in_chans, d.image_size) == ("digits", "digits", 10, 1, 8)
    assert (len(d.train), len(d.test)) == (1078, 719)
    assert d.classes == [str(k) for k in range(10)] and d.mean == (0.0,) and d.std == (1.0,)
    x, y, i = d.train[5]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int) and i == 5
    assert y == int(d.train.labels[5])
    allx = d.train.get_batch(torch.arange(len(d.train)))
    assert allx.min() == 0 and allx.max() == 1                   # pixel/16: 16 -> 1.0
    assert torch.equal(allx * 16, (allx * 16).round())           # multiples of 1/16
    # stratified: every class is 40% +- 1 sample in the test split
    counts_all = Counter(d.train.labels.tolist()) + Counter(d.test.labels.tolist())
    for c, n in Counter(d.test.labels.tolist()).items():
        assert abs(n - 0.4 * counts_all[c]) <= 1
    assert torch.equal(build_data("digits").test.labels, d.test.labels)  # fixed seed: same split
    assert d.train.in_memory and d.train.train and not d.test.train


def test_synthetic_is_deterministic_learnable_and_not_trivial():
    a, b = build_data("synthetic"), build_data("synthetic")
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert (len(a.train), len(a.test), a.num_classes, a.in_chans, a.image_size) == (2000, 500, 10, 1, 8)
    xtr, xte = a.train.get_batch(torch.arange(2000)).flatten(1), a.test.get_batch(torch.arange(500)).flatten(1)
    assert xtr.min() >= 0 and xtr.max() <= 1
    means = torch.stack([xtr[a.train.labels == c].mean(0) for c in range(10)])
    assert torch.cdist(means, means).add(torch.eye(10) * 9).min() > 0.5  # class means are distinct
    acc = (torch.cdist(xte, means).argmin(1) == a.test.labels).float().mean().item()
    assert 0.5 < acc < 0.995, acc  # nearest-class-mean is far above chance (0.1) but not perfect


# -- batched augmentation --------------------------------------------------------------------

def _candidates(img: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """All 9x9 crops of the zero-padded image, unflipped and flipped."""
    _, h, w = img.shape
    p = torch.nn.functional.pad(img, (pad,) * 4)
    crops = [p[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return torch.stack(crops + [c.flip(-1) for c in crops])


def test_crop_flip_is_a_padded_crop_with_flip_and_uses_only_the_generator():
    imgs = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8, generator=_gen(1))
    split = TensorSplit(imgs, torch.zeros(64, dtype=torch.long), train=True, augment="crop_flip")
    idx = torch.arange(64)
    torch.manual_seed(0)
    x1 = split.get_batch(idx, _gen(7))
    torch.manual_seed(123)  # the global RNG must not matter
    x2 = split.get_batch(idx, _gen(7))
    assert torch.equal(x1, x2) and x1.shape == (64, 3, 12, 12) and x1.dtype == torch.float32
    assert not torch.equal(x1, split.get_batch(idx, _gen(8)))
    clean = split.get_batch(idx, _gen(7), augment=False)
    assert torch.equal(clean, imgs.float() / 255)
    identical = flipped = 0
    for k in range(64):
        match = (_candidates(clean[k]) == x1[k]).flatten(1).all(1)
        assert match.any(), f"sample {k} is not a padded crop/flip of its image"
        identical += int(torch.equal(x1[k], clean[k]))
        flipped += int(match[81:].any() and not match[:81].any())
    assert identical < 8 and 16 < flipped < 48  # not the identity; about half the images flipped
    assert torch.equal(TensorSplit(imgs, torch.zeros(64), train=False, augment="crop_flip")
                       .get_batch(idx, _gen(7)), clean)  # test splits never augment


def test_device_copy_is_cached():
    split = build_data("synthetic").train
    assert split.images_on("cpu") is split.images
    assert split.images_on("meta") is split.images_on("meta") and split.images_on("meta").device.type == "meta"


# -- CIFAR-10 copy as npz and as an image folder ----------------------------------------------

@needs_cifar
def test_npz_from_unpack_cifar10(c10_npz):
    d = build_data(f"npz:{c10_npz}")
    raw = np.load(c10_npz)
    assert (d.family, d.num_classes, d.in_chans, d.image_size) == ("cifar", 10, 3, 32)
    assert d.classes[:2] == ["airplane", "automobile"] and (len(d.train), len(d.test)) == (300, 60)
    assert torch.equal(d.train.labels, torch.from_numpy(raw["y_train"]))
    x = d.test.get_batch(torch.arange(60), None)
    assert torch.equal(x, torch.from_numpy(raw["x_test"]).permute(0, 3, 1, 2).float() / 255)
    assert all(0.3 < m < 0.6 for m in d.mean) and all(0.15 < s < 0.35 for s in d.std)
    xa, xb = d.train.get_batch(torch.arange(32), _gen(0)), d.train.get_batch(torch.arange(32), _gen(0))
    assert torch.equal(xa, xb) and xa.shape == (32, 3, 32, 32)
    assert not torch.equal(xa, d.train.get_batch(torch.arange(32), _gen(1)))
    assert not torch.equal(xa, d.train.get_batch(torch.arange(32), _gen(0), augment=False))
    assert not build_data(f"npz:{c10_npz}", augment=False).train.get_batch(torch.arange(4), _gen(0)).equal(xa[:4])


@needs_cifar
def test_image_folder_from_unpack_cifar10(c10_folder):
    d = build_data(f"folder:{c10_folder}", image_size=32)
    assert (d.family, d.num_classes, d.in_chans, d.image_size) == ("imagenet", 10, 3, 32)
    assert (len(d.train), len(d.test)) == (40, 20) and not d.train.in_memory
    assert isinstance(d.train, FolderSplit) and d.mean == (0.485, 0.456, 0.406)
    x, y, i = d.test[3]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and i == 3 and y == int(d.test.labels[3])
    assert torch.equal(d.test.get_batch(torch.arange(6)), d.test.get_batch(torch.arange(6)))
    torch.manual_seed(0)
    a = d.train.get_batch(torch.arange(8), _gen(0))
    torch.manual_seed(1)  # RandomResizedCrop/flip draw only from the generator given
    b = d.train.get_batch(torch.arange(8), _gen(0))
    assert torch.equal(a, b) and a.shape == (8, 3, 32, 32)
    assert not torch.equal(a, d.train.get_batch(torch.arange(8), _gen(1)))
    assert d.train.read_bytes(0)[:2].tolist() == [0xFF, 0xD8]  # raw JPEG bytes
    assert build_data(f"imagenet:{c10_folder}").test[0][0].shape == (3, 224, 224)  # default size
    batch = next(iter(torch.utils.data.DataLoader(d.test, batch_size=5)))
    assert batch[0].shape == (5, 3, 32, 32) and batch[2].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_idx_files(tmp_path):
    d = build_data("fashion-mnist", data_root=str(tmp_path))  # nothing under the root: Debian files
    assert (d.family, d.num_classes, d.in_chans, d.image_size) == ("mnist", 10, 1, 28)
    assert (len(d.train), len(d.test)) == (60000, 10000) and d.classes[0] == "T-shirt/top"
    x = d.train.get_batch(torch.arange(256), _gen(0))
    assert x.min() == 0 and x.max() == 1 and torch.equal(x, d.train.get_batch(torch.arange(256), _gen(5)))
    assert torch.bincount(d.test.labels).tolist() == [1000] * 10


# -- errors: one clear line each ---------------------------------------------------------------

def _err(match: str, *args, **kw):
    with pytest.raises(EffdstlError, match=match) as e:
        build_data(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def _npz_file(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_bad_names_and_paths(tmp_path):
    _err(r"unknown dataset 'digts' \(did you mean 'digits'\?\)", "digts")
    _err(r"did you mean 'cifar100'", "cifar1000")
    _err(r"needs a path: npz:PATH", "npz:")
    _err(rf"npz file {tmp_path}/nope.npz does not exist .*torchvision downloads it", f"npz:{tmp_path}/nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip at all")
    _err(r"cannot be read", f"npz:{tmp_path}/bad.npz")
    _err(r"image_size=32 applies to folder/imagenet datasets only; digits images are 8x8", "digits", image_size=32)


def test_bad_npz_contents(tmp_path):
    x = np.zeros((4, 8, 8, 3), np.uint8)
    y = np.arange(4)
    _err(r"lacks x_test, y_test \(has: x_train, y_train\)", _npz_file(tmp_path / "a.npz", x_train=x, y_train=y))
    _err(r"x_train has shape \(4, 8, 8, 3\) and dtype float32; expected uint8",
         _npz_file(tmp_path / "b.npz", x_train=x.astype(np.float32), y_train=y, x_test=x, y_test=y))
    _err(r"x_test has shape \(4, 192\)",
         _npz_file(tmp_path / "c.npz", x_train=x, y_train=y, x_test=x.reshape(4, -1), y_test=y))
    _err(r"y_train has 3 labels but x_train has 4 images",
         _npz_file(tmp_path / "d.npz", x_train=x, y_train=y[:3], x_test=x, y_test=y))
    _err(r"y_test has shape \(4, 1\)", _npz_file(tmp_path / "e.npz", x_train=x, y_train=y, x_test=x, y_test=y[:, None]))
    _err(r"x_train images are \(8, 8, 3\) but x_test's are \(9, 9, 3\)",
         _npz_file(tmp_path / "f.npz", x_train=x, y_train=y, x_test=np.zeros((4, 9, 9, 3), np.uint8), y_test=y))
    _err(r"labels run from 0 to 3 but 'classes' names 2 classes",
         _npz_file(tmp_path / "g.npz", x_train=x, y_train=y, x_test=x, y_test=y, classes=np.array(["a", "b"])))
    ok = build_data(_npz_file(tmp_path / "h.npz", x_train=x[..., 0], y_train=y, x_test=x[..., 0], y_test=y))
    assert (ok.in_chans, ok.family, ok.num_classes) == (1, "mnist", 4)  # (N,H,W) grey is accepted


def test_bad_folders(tmp_path):
    _err(r"dataset folder .*/none does not exist", f"folder:{tmp_path}/none")
    (tmp_path / "a" / "train").mkdir(parents=True)
    _err(r"has no val/ or test/ subfolder", f"folder:{tmp_path}/a")
    (tmp_path / "a" / "val").mkdir()
    _err(r"a/train has no class subfolders", f"folder:{tmp_path}/a")
    (tmp_path / "a" / "train" / "cat").mkdir()
    (tmp_path / "a" / "train" / "cat" / "notes.txt").write_text("x")
    _err(r"a/train holds no images", f"folder:{tmp_path}/a")
    (tmp_path / "b").mkdir()
    _err(r"has no train/ subfolder", f"imagenet:{tmp_path}/b")


@needs_cifar
def test_folder_test_class_missing_from_train(c10_folder, tmp_path):
    import shutil
    shutil.copytree(c10_folder, tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "train" / "truck")
    _err(r"c/test has class folder\(s\) truck that the train/ split lacks", f"folder:{tmp_path}/c")


def test_cifar10_offline_and_absent_fails_fast_with_the_cure(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFDSTL_OFFLINE", "1")
    import torchvision.datasets  # noqa: F401 - before the clock: it times the refusal (no download wait), not an import
    t = time.time()
    msg = _err(rf"cifar10 is not under {tmp_path} and cannot be downloaded \(offline\?\)", "cifar10",
               data_root=str(tmp_path))
    assert "npz:PATH" in msg and "torchvision downloads" in msg and time.time() - t < 5
    assert "/work" not in msg and "shared" not in msg  # the cure names nothing outside the repository
    _err(r"mnist is not under", "mnist", data_root=str(tmp_path))


def test_per_class_subset_is_stratified_seeded_and_a_subset():
    full = build_data("digits")
    d = build_data("digits", train_per_class=50, test_per_class=20)
    assert d.train.labels.bincount().tolist() == [50] * 10 and d.test.labels.bincount().tolist() == [20] * 10
    again = build_data("digits", train_per_class=50)
    assert torch.equal(again.train.images, d.train.images)              # one fixed draw
    # every subset image is an image of the full split, with its label
    rows = {tuple(x.flatten().tolist()): int(y) for x, y in zip(full.train.images, full.train.labels)}
    assert all(rows[tuple(x.flatten().tolist())] == int(y) for x, y in zip(d.train.images, d.train.labels))
    assert len(again.test) == len(full.test)                             # the other split untouched
    with pytest.raises(EffdstlError, match="train_per_class=500 but class .* has only"):
        build_data("digits", train_per_class=500)


def test_data_keys_leave_old_configs_hashes_alone():
    from effdstl_cli.config import config_hash, data_keys

    old = {"dataset": "digits", "data_root": None, "image_size": None}
    assert data_keys({**old, "seeds": [0]}) == old                       # unset subset keys: not in the config
    assert config_hash(data_keys(old)) == config_hash(old)
    assert data_keys({**old, "train_per_class": 10})["train_per_class"] == 10


@needs_cifar
def test_too_many_workers_said_once_in_one_line(c10_folder, capfd):
    """More DataLoader workers than cores: torch warns twice per loader (built, then iterated), as
    two lines with its own path each time; the stream says it once per process, in one line."""
    import warnings

    from effdstl_cli.data import stream

    d = build_data(f"folder:{c10_folder}", image_size=32)
    n = stream.cpu_cores() + 1
    stream._WORKERS_TOLD.discard(n)
    opts = stream.StreamOptions(workers=n, gpu_decode=False)
    order = torch.arange(len(d.train))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # every warning recorded, none filtered out by others
        for _ in range(2):  # two epochs: two train loaders, two evaluation loaders
            got = list(stream.train_batches(d.train, order, 8, 5, _gen(0), torch.device("cpu"), opts))
            assert [len(b[1]) for b in got] == [8] * 5
            assert sum(len(y) for _, y in stream.eval_batches(d.test, torch.arange(len(d.test)), 8,
                                                               torch.device("cpu"), opts)) == len(d.test)
    err = capfd.readouterr().err
    assert err.count(f"--workers {n} starts more DataLoader workers than the {n - 1} CPU cores") == 1, err
    assert "This DataLoader will create" not in err and not [w for w in seen if "DataLoader" in str(w.message)]
