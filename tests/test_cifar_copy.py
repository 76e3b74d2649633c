"""The new-user flow on a real CIFAR-10 copy (JPEG q75, cifar10-jpeg.npz and its unpack-cifar10
script in $EFFDSTL_TEST_DATA, default the repository's data/ folder): a teacher, then a
group {none, kd, ckm} from it, through the CLI. Not run by default (minutes of CPU): set
EFFDSTL_CIFAR_TESTS=1. The README's CIFAR-10 section is the same flow at a larger size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import real_data_dir

SHARED = real_data_dir()
pytestmark = [
    pytest.mark.cifar,
    pytest.mark.skipif(os.environ.get("EFFDSTL_CIFAR_TESTS") != "1", reason="set EFFDSTL_CIFAR_TESTS=1 (minutes of CPU)"),
    pytest.mark.skipif(not (SHARED / "cifar10-jpeg.npz").exists(), reason="no cifar10-jpeg.npz in $EFFDSTL_TEST_DATA (default: data/, or the CIFAR-10 copy a workspace keeps beside the repo)"),
]


def cli(*args, cwd):
    r = subprocess.run([sys.executable, "-m", "effdstl_cli.cli", *args], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_teacher_then_students_on_real_cifar10(tmp_path):
    npz = tmp_path / "c10.npz"
    subprocess.run([sys.executable, str(SHARED / "unpack-cifar10"), str(npz), "--per-class-train", "200",
                    "--per-class-test", "50"], check=True, capture_output=True)
    common = ["--dataset", f"npz:{npz}", "--results", str(tmp_path / "r"), "-x", "debug", "--lr", "0.05"]
    cli("train", "teacher", "--model", "cnn:medium", "--epochs", "4", "--name", "t", *common, cwd=tmp_path)
    cli("train", "student", "--model", "cnn:small", "--teacher", str(tmp_path / "r" / "t"), "-D", "none",
        "-D", "kd:tau=4,lam=0.9", "-D", "ckm", "--epochs", "3", "--name", "s", *common, cwd=tmp_path)
    finals = [json.loads(p.read_text()) for p in (tmp_path / "r" / "s" / "runs").glob("*/final.json")]
    assert len(finals) == 3
    for f in finals:
        assert f["best_top1"] > 20.0  # 10 classes: chance is 10%
