"""A catalogue of bad inputs, each driven through the real CLI.

Every case must: exit non-zero; print exactly ONE line ``error: ...`` that names the problem (and
the nearest valid name for a misspelt one); never print a traceback; and change nothing already
written (a finished study lives in the same results root: its files keep their bytes). Cases of
phase ``pre`` fail while the study is validated, so they may not create a single file; cases of
phase ``job`` fail inside a training job (data, checkpoints), under ``--executor debug`` (in the
CLI's process) and, for a few, ``--executor local`` (a submitit subprocess).

Cases that fail before any job run in this process (``conftest.run_cli_inproc``: the console
script's own ``main``, its output and exit code, without starting Python and importing torch for
each); a few of them (``E2E``), and every case that trains, run the console script in a
subprocess: the true end-to-end path (exit code, no traceback).

``EFFDSTL_CATALOGUE_OUT=FILE pytest tests/test_bad_inputs.py`` writes every case's command and the
exact line it printed to FILE (JSON): docs/RELIABILITY.md lists them from there.

Also here: a static check that the package loads nothing unsafely (YAML, checkpoints, shells).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from conftest import cli_env, run_cli_inproc

PKG = Path(__file__).resolve().parents[1] / "effdstl_cli"


# -- helpers -------------------------------------------------------------------------------------

env_for = cli_env  # offline, one thread, wide columns (tests/conftest.py)


def cli(args: list, cwd: Path, env: dict | None = None, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effdstl_cli.cli", *map(str, args)], cwd=cwd,
                          env=env or env_for(), capture_output=True, text=True, timeout=timeout)


def tiny(name: str = "tiny", **over) -> dict:
    """A two-teacher replacement study on synthetic data: 2 x 1-epoch teachers, one 2-epoch group.
    ``over`` sets dotted keys (``{"schedule.lr": -1}`` -> schedule: {lr: -1})."""
    s = {"name": name, "kind": "replacement", "dataset": "synthetic", "seeds": [0], "batch_size": 64,
         "teachers": {"weak": {"model": "mlp:8", "epochs": 1}, "strong": {"model": "mlp:16", "epochs": 1}},
         "teacher_schedule": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "seed": 0},
         "triplets": [{"weak": "weak", "strong": "strong", "student": "mlp:8"}],
         "schedule": {"epochs": 2, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
         "distill": {"tau": 1.0, "lam": 1.0},
         "grid": {"scheme": ["full"], "subset": ["reg_cor"]}}
    for key, val in over.items():
        node, *path = key.split(".")
        if not path:
            s[node] = val
            continue
        d = s.setdefault(node, {})
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = val
    return s


def manip(name: str, kind: str = "label_smoothing", subset: str = "reg_cor", **params) -> dict:
    s = tiny(name, kind="manipulation")
    s["grid"] = {"kind": [kind], "subset": [subset], "params": {kind: params}}
    return s


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``."""
    out = {}
    if root.exists():
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name not in skip:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Ctx:
    tmp: Path           # this case's folder
    results: Path       # the shared results root (holds the finished study 'tiny')
    teacher: Path       # a finished teacher's model.pt (mlp:8 on synthetic: 10 classes, 1x8x8)

    def study(self, s: dict) -> Path:
        p = self.tmp / (re.sub(r"[^A-Za-z0-9_-]", "_", str(s["name"])) + ".yaml")
        p.write_text(yaml.safe_dump(s, sort_keys=False))
        return p

    def raw(self, name: str, text: str) -> Path:
        p = self.tmp / name
        p.write_text(text)
        return p

    def run(self, s: dict, *extra, executor: str = "debug") -> list:
        return ["run", "-s", self.study(s), "--results", self.results, "-x", executor, *extra]

    def teacher_cmd(self, dataset: str, *extra, name: str = "bad-teacher", model: str = "mlp:8",
                    epochs: int = 1, results: Path | None = None) -> list:
        return ["train", "teacher", "-d", dataset, "-m", model, "--epochs", epochs, "--name", name,
                "--results", results or self.results, *extra]

    def student_cmd(self, teacher, *extra, dataset: str = "synthetic", name: str = "bad-student") -> list:
        return ["train", "student", "-d", dataset, "-m", "mlp:8", "--teacher", teacher, "--epochs", "1",
                "--name", name, "--results", self.results, *extra]

    def npz(self, name: str, **arrays) -> Path:
        p = self.tmp / name
        np.savez(p, **arrays)
        return p


def _good_npz_arrays(classes: int = 3, n: int = 60) -> dict:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    y = (np.arange(n) % classes).astype(np.int64)
    return {"x_train": x, "y_train": y, "x_test": x[:30], "y_test": y[:30]}


def _flat_folder(ctx: Ctx) -> Path:
    root = ctx.tmp / "images"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / split / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # images, but no class folders
    return root


def _truncated(ctx: Ctx) -> Path:
    p = ctx.tmp / "truncated.pt"
    p.write_bytes(ctx.teacher.read_bytes()[:200])
    return p


def _relabelled(ctx: Ctx) -> Path:
    """The teacher's weights under a model spec they do not fit (mlp:64)."""
    import torch

    blob = torch.load(ctx.teacher, map_location="cpu", weights_only=True)
    blob["model_spec"] = "mlp:64"
    p = ctx.tmp / "relabelled.pt"
    torch.save(blob, p)
    return p


def _no_slurm_env(ctx: Ctx) -> dict:
    empty = ctx.tmp / "bin"  # a PATH that holds no sbatch/sinfo (the interpreter is called by path)
    empty.mkdir()
    return env_for(PATH=str(empty))


@dataclass
class Case:
    id: str
    what: str                              # the bad input, in words (for docs/RELIABILITY.md)
    make: Callable[[Ctx], list]            # -> CLI arguments
    expect: tuple[str, ...]                # substrings of the one error line
    phase: str = "pre"                     # pre (validation: no file written) | job (in a training job)
    near: str | None = None                # the suggestion a misspelt name must get
    env: Callable[[Ctx], dict] | None = None
    skip: Callable[[], str | None] | None = None

    @property
    def inproc(self) -> bool:
        """Fails before any job: run in this process (the few ``E2E`` ones: as a subprocess too)."""
        return self.phase == "pre" and self.id not in E2E


# Cases that fail before work yet run as a real subprocess: the console script end to end (its exit
# code, one line, no traceback) for a study file, a single run, a usage error and a checkpoint.
E2E = {"unknown-model", "unknown-distiller", "yaml-syntax", "usage-missing-option", "ckpt-truncated"}


def _root_skip() -> str | None:
    return "root ignores permission bits (the path-under-a-file case covers ENOTDIR)" if os.geteuid() == 0 else None


def _readonly(ctx: Ctx) -> list:
    d = ctx.tmp / "ro"
    d.mkdir()
    d.chmod(0o555)
    return ctx.teacher_cmd("synthetic", "-x", "debug", results=d)


CASES: list[Case] = [
    # -- names: unknown / misspelt (the nearest valid name is suggested) --------------------------
    Case("unknown-model", "student model `resnet81` in a study", lambda c: c.run(tiny("m1", **{"triplets": [
        {"weak": "weak", "strong": "strong", "student": "resnet81"}]})), ("unknown model 'resnet81'",), near="resnet8"),
    Case("unknown-dataset", "dataset `synthetc` in a study", lambda c: c.run(tiny("d1", dataset="synthetc")),
         ("unknown dataset 'synthetc'",), near="synthetic"),
    Case("unknown-distiller", "`--distiller kdd`", lambda c: c.student_cmd(c.teacher, "-D", "kdd", "-x", "debug"),
         ("unknown distiller 'kdd'",), near="kd"),
    Case("unknown-distiller-param", "`--distiller kd:tua=4`", lambda c: c.student_cmd(c.teacher, "-D", "kd:tua=4", "-x", "debug"),
         ("unknown parameter of distiller 'kd' 'tua'",), near="tau"),
    Case("unknown-baseline", "recipe baseline `kdd`", lambda c: c.run({
        **tiny("r1", kind="recipe"), "triplets": [], "grid": {}, "baselines": ["none", "kdd"],
        "recipe": {"student": "mlp:8", "stage1": {"epochs": 1}, "stage2": {"epochs": 1}}}),
        ("unknown baseline 'kdd'",), near="kd"),
    Case("unknown-scheme", "replacement scheme `fulll`", lambda c: c.run(tiny("s1", **{"grid.scheme": ["fulll"]})),
         ("unknown replacement scheme 'fulll'",), near="full"),
    Case("unknown-subset", "subset `reg_corr`", lambda c: c.run(tiny("s2", **{"grid.subset": ["reg_corr"]})),
         ("unknown subset 'reg_corr'",), near="reg_cor"),
    Case("unknown-manipulation", "manipulation `label_smothing`",
         lambda c: c.run(manip("m2", "label_smothing", t=0.9)), ("unknown manipulation 'label_smothing'",),
         near="label_smoothing"),
    Case("unknown-study-key", "study key `schedul:`", lambda c: c.run({**tiny("k1"), "schedul": {"epochs": 1}}),
         ("unknown key in study", "'schedul'"), near="schedule"),
    Case("unknown-schedule-key", "schedule key `epoch:`", lambda c: c.run(tiny("k2", **{"schedule.epoch": 1})),
         ("unknown schedule key", "'epoch'"), near="epochs"),
    Case("unknown-set-key", "`--set schedul.epochs=1`", lambda c: c.run(tiny(), "--set", "schedul.epochs=1"),
         ("unknown study key 'schedul'",), near="schedule"),
    Case("unknown-triplet-teacher", "triplet teacher `weeak`", lambda c: c.run(tiny("k3", triplets=[
        {"weak": "weeak", "strong": "strong", "student": "mlp:8"}])), ("unknown teacher in triplet 0 'weeak'",), near="weak"),
    Case("unknown-executor", "`--executor slurmm`", lambda c: c.run(tiny(), executor="slurmm"),
         ("unknown executor 'slurmm'",), near="slurm"),
    Case("unknown-study-folder", "`effdstl status tiyn`", lambda c: ["status", "tiyn", "--results", c.results],
         ("unknown study", "'tiyn'"), near="tiny"),
    Case("unknown-figure", "`effdstl plot figure55 tiny`", lambda c: ["plot", "figure55", "tiny", "--results", c.results],
         ("unknown figure 'figure55'",), near="figure5"),
    # -- study files --------------------------------------------------------------------------------
    Case("yaml-syntax", "a study file with an unclosed `[`", lambda c: ["run", "-s", c.raw(
        "broken.yaml", "name: broken\nkind: replacement\nseeds: [0, 1\ndataset: digits\n"), "--results", c.results],
         ("is not valid YAML at line",)),
    Case("yaml-not-mapping", "a study file that is a list", lambda c: ["run", "-s", c.raw("list.yaml", "- a\n- b\n"),
                                                                      "--results", c.results], ("must be a mapping",)),
    Case("study-file-missing", "`--study nope.yaml`", lambda c: ["run", "-s", c.tmp / "nope.yaml", "--results", c.results],
         ("does not exist",)),
    Case("wrong-type", "`seeds: 0` (not a list)", lambda c: c.run(tiny("w1", seeds=0)), ("'seeds' has the wrong type",)),
    Case("triplet-not-mapping", "`triplets: [3]`", lambda c: c.run(tiny("w2", triplets=[3])),
         ("triplet 0 must be a mapping",)),
    Case("grid-not-a-list", "`grid: {scheme: full}` (a name, not a list)", lambda c: c.run(tiny("w3", grid={"scheme": "full"})),
         ("grid.scheme must be a list of names",)),
    Case("params-not-mapping", "`grid.params: {label_smoothing: 0.9}`",
         lambda c: c.run({**manip("w4", t=0.9), "grid": {"kind": ["label_smoothing"], "params": {"label_smoothing": 0.9}}}),
         ("grid.params must map a manipulation",)),
    Case("name-escapes-root", "`name: ../evil`", lambda c: c.run(tiny("../evil")), ("study name '../evil' must be",)),
    Case("name-with-slash", "`name: a/b`", lambda c: c.run(tiny("a/b")), ("study name 'a/b' must be",)),
    Case("cli-name-escapes-root", "`train teacher --name ../evil`",
         lambda c: c.teacher_cmd("synthetic", "-x", "debug", name="../evil"), ("would leave the results root",)),
    # -- numbers out of range -----------------------------------------------------------------------
    Case("lr-negative", "`schedule.lr: -0.1`", lambda c: c.run(tiny("n1", **{"schedule.lr": -0.1})),
         ("lr must be a positive number, got -0.1",)),
    Case("lr-zero-cli", "`train teacher --lr 0`", lambda c: c.teacher_cmd("synthetic", "--lr", "0", "-x", "debug"),
         ("lr must be a positive number, got 0",)),
    Case("epochs-zero", "`schedule.epochs: 0`", lambda c: c.run(tiny("n2", **{"schedule.epochs": 0})),
         ("epochs must be a positive integer, got 0",)),
    Case("epochs-negative-cli", "`train teacher --epochs -3`",
         lambda c: c.teacher_cmd("synthetic", "-x", "debug", epochs=-3),
         ("epochs must be a positive integer, got -3",)),
    Case("teacher-epochs-fraction", "`teachers.weak.epochs: 1.5`", lambda c: c.run(tiny("n3", **{"teachers.weak.epochs": 1.5})),
         ("epochs must be a positive integer, got 1.5",)),
    Case("batch-zero", "`batch_size: 0`", lambda c: c.run(tiny("n4", batch_size=0)), ("batch_size must be a positive integer, got 0",)),
    Case("batch-negative-cli", "`train teacher --batch-size -8`",
         lambda c: c.teacher_cmd("synthetic", "--batch-size", "-8", "-x", "debug"), ("batch_size must be a positive integer, got -8",)),
    Case("seed-negative", "`seeds: [-1]`", lambda c: c.run(tiny("n5", seeds=[-1])), ("seeds must be a non-empty list",)),
    Case("t-above-1", "label smoothing `t: 1.5`", lambda c: c.run(manip("p1", t=1.5)), ("t in (0, 1], got 1.5",)),
    Case("delta-negative", "teacher amplification `delta: -0.2`", lambda c: c.run(manip("p3", "teacher_amp", delta=-0.2)),
         ("teacher_amp needs delta >= 0, got -0.2",)),
    Case("tau-zero", "`distill.tau: 0`", lambda c: c.run(tiny("p4", **{"distill.tau": 0})), ("distill.tau must be > 0, got 0",)),
    Case("lam-not-a-number", "`distill.lam: abc`", lambda c: c.run(tiny("p5", **{"distill.lam": "abc"})),
         ("distill.lam must be a number in [0, 1], got 'abc'",)),
    Case("unknown-distill-key", "`distill: {tua: 2}`", lambda c: c.run(tiny("p6", distill={"tua": 2})),
         ("unknown key of distill 'tua'",), near="tau"),
    # -- checkpoints given as --teacher ---------------------------------------------------------------
    Case("ckpt-missing", "`--teacher` a checkpoint that does not exist",
         lambda c: c.student_cmd(c.tmp / "nope" / "model.pt", "-x", "debug"), ("no such checkpoint",)),
    Case("ckpt-truncated", "`--teacher` a checkpoint cut to 200 bytes",
         lambda c: c.student_cmd(_truncated(c), "-x", "debug"), ("is corrupt or truncated",)),
    Case("study-ckpt-missing", "a study teacher `ckpt:` that does not exist",
         lambda c: c.run(tiny("c1", **{"teachers.weak": {"model": "mlp:8", "ckpt": str(c.tmp / "gone.pt")}})),
         ("checkpoint", "does not exist")),
    # -- the machine --------------------------------------------------------------------------------
    Case("gpus-not-here", "`--gpus-per-job 2 --executor local` on a machine without GPUs",
         lambda c: c.run(tiny(), "--gpus-per-job", "2", executor="local"), ("--gpus-per-job 2 asked for", "GPU(s)"),
         skip=lambda: None if _gpu_count() < 2 else "this machine has 2+ GPUs"),
    Case("results-under-a-file", "`--results` below a regular file (not writable)",
         lambda c: c.teacher_cmd("synthetic", "-x", "debug", results=_a_file(c) / "results"),
         ("results directory", "is not writable")),
    Case("results-read-only", "`--results` a read-only (0555) directory", _readonly,
         ("is not writable", "Permission denied"), skip=_root_skip),
    Case("slurm-absent", "`--executor slurm` with no sbatch/sinfo on PATH",
         lambda c: c.run(tiny("sl1"), executor="slurm"), ("--executor slurm: no Slurm cluster answers here",),
         env=_no_slurm_env),
    # -- in a job: data -------------------------------------------------------------------------------
    Case("data-root-missing", "`dataset: folder:/nonexistent` (debug)",
         lambda c: c.teacher_cmd(f"folder:{c.tmp / 'nonexistent'}", "-x", "debug"),
         ("dataset folder", "does not exist"), phase="pre"),
    Case("data-root-missing-local", "`dataset: folder:/nonexistent` (local executor)",
         lambda c: c.teacher_cmd(f"folder:{c.tmp / 'nonexistent'}", "-x", "local"),
         ("dataset folder", "does not exist"), phase="pre"),
    Case("cifar-root-missing", "`dataset: cifar10` with an empty `--data-root`, offline",
         lambda c: c.teacher_cmd("cifar10", "--data-root", c.tmp / "no-cifar", "-x", "debug"),
         ("cifar10 is not under", "cannot be downloaded"), phase="pre"),
    Case("npz-wrong-keys", "an npz without x_train/y_train (debug)",
         lambda c: c.teacher_cmd(f"npz:{c.npz('keys.npz', images=np.zeros((4, 8, 8), np.uint8))}", "-x", "debug"),
         ("lacks x_train, y_train, x_test, y_test",), phase="pre"),
    Case("npz-wrong-shape", "an npz whose x_train is float (N, 64)",
         lambda c: c.teacher_cmd(f"npz:{c.npz('shape.npz', **{**_good_npz_arrays(), 'x_train': np.zeros((60, 64), np.float32)})}",
                                 "-x", "debug"), ("x_train has shape (60, 64) and dtype float32",), phase="pre"),
    Case("folder-no-classes", "an image folder whose train/ holds images but no class folders",
         lambda c: c.teacher_cmd(f"folder:{_flat_folder(c)}", "-x", "debug"), ("has no class subfolders",), phase="pre"),
    # -- in a job: checkpoints ------------------------------------------------------------------------
    Case("teacher-classes-mismatch", "a 10-class teacher for a 3-class dataset",
         lambda c: c.student_cmd(c.teacher, "-x", "debug", dataset=f"npz:{c.npz('three.npz', **_good_npz_arrays(3))}"),
         ("trained for 10 classes and the model has 3",), phase="pre"),
    Case("ckpt-wrong-arch", "a study teacher `ckpt:` of another architecture (debug executor)",
         lambda c: c.run(tiny("c2", teachers={"weak": {"model": "mlp:64", "ckpt": str(c.teacher)},
                                              "strong": {"model": "mlp:8", "ckpt": str(c.teacher)}})),
         ("does not fit mlp:64",), phase="pre"),
    Case("ckpt-wrong-arch-local", "`--teacher` whose weights do not fit its model spec (local executor)",
         lambda c: c.student_cmd(_relabelled(c), "-x", "local"), ("does not fit mlp:64",), phase="pre"),
    # -- issue 14: nested keys, every option's domain, binary study files, labels, bad images ---------
    Case("nested-set-key", "`--set grid.sceme=[full]`", lambda c: c.run(tiny(), "--set", "grid.sceme=[full]"),
         ("unknown key of grid", "'sceme'"), near="scheme"),
    Case("nested-stage-key", "`--set recipe.stage1.epoch=2` (a recipe study)",
         lambda c: c.run(_recipe_study("r2"), "--set", "recipe.stage1.epoch=2"),
         ("unknown key of recipe.stage1", "'epoch'"), near="epochs"),
    Case("nested-file-key", "`ablations: [{label: x, stage2: {tau: 0.8}}]` in a file",
         lambda c: c.run({**{k: v for k, v in _recipe_study("r3").items() if k != "baselines"}, "kind": "ablation",
                         "ablations": [{"label": "x", "stage2": {"tau": 0.8}}]}),
         ("unknown key of ablations[0].stage2", "'tau'"), near="tau_t"),
    Case("nested-params-key", "`grid.params: {label_smoothing: {tt: 0.9}}`", lambda c: c.run(manip("w5", tt=0.9)),
         ("unknown key of grid.params.label_smoothing", "'tt'")),
    Case("schedule-kind", "`schedule.kind: cosin`", lambda c: c.run(tiny("n6", **{"schedule.kind": "cosin"})),
         ("unknown schedule kind", "'cosin'"), near="cosine"),
    Case("max-parallel-negative", "`--max-parallel -2 --executor local`",
         lambda c: c.run(tiny(), "--max-parallel", "-2", executor="local"), ("--max-parallel must be >= 1", "got -2")),
    Case("image-size-negative", "`train teacher --image-size -5`",
         lambda c: c.teacher_cmd("synthetic", "--image-size", "-5", "-x", "debug"), ("--image-size must be a positive",)),
    Case("image-size-study", "`image_size: 0` in a study", lambda c: c.run(tiny("n7", image_size=0)),
         ("image_size must be a positive integer, got 0",)),
    Case("device-unknown", "`--device gpu`", lambda c: c.run(tiny(), "--device", "gpu"), ("unknown --device 'gpu'",),
         near="cpu"),
    Case("seed-negative-cli", "`train teacher --seed -1`", lambda c: c.teacher_cmd("synthetic", "--seed", "-1", "-x", "debug"),
         ("--seed must be an integer >= 0, got -1",)),
    Case("momentum-above-1", "`schedule.momentum: 1.5`", lambda c: c.run(tiny("n8", **{"schedule.momentum": 1.5})),
         ("momentum must be in [0, 1), got 1.5",)),
    Case("seeds-duplicated", "`seeds: [0, 0]`", lambda c: c.run(tiny("n9", seeds=[0, 0])), ("seeds lists a seed twice (0)",)),
    Case("grid-duplicated", "`grid.subset: [reg_cor, reg_cor]`", lambda c: c.run(tiny("n10", **{"grid.subset": ["reg_cor", "reg_cor"]})),
         ("grid.subset lists reg_cor twice",)),
    Case("teachers-identical", "two study teachers with one config (`strong` = `weak`)",
         lambda c: c.run(tiny("n11", **{"teachers.strong": {"model": "mlp:8", "epochs": 1}})),
         ("are the same run", "identical configs")),
    Case("study-file-binary", "a binary (non-UTF-8) study file", lambda c: ["run", "-s", _binary(c), "--results", c.results],
         ("is not a UTF-8 text file",)),
    Case("rerun-unknown", "`--rerun` a hash that is no run of the study", lambda c: c.run(tiny(), "--rerun", "0123456789ab"),
         ("unknown run of study 'tiny' for --rerun '0123456789ab'",)),
    Case("npz-stray-label", "an npz without `classes` whose labels are 0, 1, 2 and a stray 255",
         lambda c: c.teacher_cmd(_labels_npz(c, "stray.npz", [0, 1, 2] * 10 + [255], [0, 1, 2]), "-x", "debug"),
         ("train labels are not 0..N-1", "missing 3, 4, 5"), phase="pre"),
    Case("npz-test-only-class", "an npz without `classes` whose test split has a label the train split lacks",
         lambda c: c.teacher_cmd(_labels_npz(c, "testonly.npz", [0, 1] * 10, [0, 1, 2]), "-x", "debug"),
         ("test labels 2 never occur in the train split",), phase="pre"),
    Case("npz-label-beyond-classes", "an npz whose `classes` names 3 classes and a label is 5",
         lambda c: c.teacher_cmd(_labels_npz(c, "beyond.npz", [0, 1, 2, 5] * 5, [0, 1], classes=np.array(["a", "b", "c"])),
                                 "-x", "debug"), ("labels run from 0 to 5 but 'classes' names 3",), phase="pre"),
    Case("jpeg-corrupt-test", "a truncated JPEG in the test (val/) split: named before any training",
         lambda c: c.teacher_cmd(_jpeg_folder(c, "val"), "--image-size", "16", "--workers", "1", "-x", "debug"),
         ("val/a/1.jpg cannot be decoded", "--skip-bad-images"), phase="job"),
    Case("jpeg-corrupt-train", "a truncated JPEG in train/ (PIL in DataLoader workers)",
         lambda c: c.teacher_cmd(_jpeg_folder(c, "train"), "--image-size", "16", "--workers", "1", "--decode", "workers",
                                 "-x", "debug"), ("train/a/1.jpg cannot be decoded",), phase="job"),
    Case("jpeg-corrupt-device", "a truncated JPEG in train/ with `--decode device`",
         lambda c: c.teacher_cmd(_jpeg_folder(c, "train"), "--image-size", "16", "--workers", "1", "--decode", "device",
                                 "--device", "cpu", "-x", "debug"), ("train/a/1.jpg cannot be decoded",), phase="job"),
    Case("jpeg-corrupt-local", "a truncated JPEG in train/ (local executor)",
         lambda c: c.teacher_cmd(_jpeg_folder(c, "train"), "--image-size", "16", "--workers", "1", "-x", "local"),
         ("train/a/1.jpg cannot be decoded",), phase="job"),
    # -- issue 19: a finished run read as an input is sealed, intact and finished ------------------
    Case("teacher-rundir-flipped", "`--teacher RUN_DIR` whose model.pt has 64 flipped bytes",
         lambda c: c.student_cmd(_teacher_copy(c, "flip"), "-x", "debug"), ("is damaged", "model.pt does not match its checksum",
                                                                            "--rerun")),
    Case("teacher-modelpt-flipped", "`--teacher RUN_DIR/model.pt` with 64 flipped bytes",
         lambda c: c.student_cmd(_teacher_copy(c, "flip") / "model.pt", "-x", "debug"),
         ("is damaged", "model.pt does not match its checksum")),
    Case("teacher-studydir-flipped", "`--teacher STUDY_DIR` whose one teacher run has a flipped model.pt",
         lambda c: c.student_cmd(_teacher_study_dir(c, "flip"), "-x", "debug"), ("is damaged", "model.pt does not match")),
    Case("teacher-final-truncated", "`--teacher RUN_DIR` whose final.json is cut short",
         lambda c: c.student_cmd(_teacher_copy(c, "final"), "-x", "debug"), ("is damaged", "final.json is unreadable")),
    Case("teacher-metrics-deleted", "`--teacher RUN_DIR` whose metrics.jsonl was deleted",
         lambda c: c.student_cmd(_teacher_copy(c, "metrics"), "-x", "debug"), ("is damaged", "metrics.jsonl is missing")),
    Case("teacher-unfinished", "`--teacher RUN_DIR` of a run that has not finished",
         lambda c: c.student_cmd(_teacher_copy(c, "unfinished"), "-x", "debug"), ("has not finished (partial",)),
    Case("teacher-failed", "`--teacher RUN_DIR` of a failed run",
         lambda c: c.student_cmd(_teacher_copy(c, "failed"), "-x", "debug"), ("failed (loss is NaN at epoch 1)",)),
    Case("study-ckpt-damaged", "a study's `teachers.weak.ckpt:` naming a flipped model.pt of a run",
         lambda c: c.run(tiny("c3", **{"teachers.weak": {"model": "mlp:8", "ckpt": str(_teacher_copy(c, "flip") / "model.pt")}})),
         ("teacher 'weak' ckpt", "is damaged", "model.pt does not match")),
    Case("study-ckpt-rundir-unfinished", "a study's `teachers.weak.ckpt:` naming the folder of an unfinished run",
         lambda c: c.run(tiny("c4", **{"teachers.weak": {"model": "mlp:8", "ckpt": str(_teacher_copy(c, "unfinished"))}})),
         ("teacher 'weak' ckpt", "has not finished")),
    Case("study-ckpt-final-truncated", "a study's `teachers.weak.ckpt:` naming a run whose final.json is cut short",
         lambda c: c.run(tiny("c5", **{"teachers.weak": {"model": "mlp:8", "ckpt": str(_teacher_copy(c, "final") / "model.pt")}})),
         ("teacher 'weak' ckpt", "final.json is unreadable")),
    Case("study-ckpt-fifo", "a study's `teachers.weak.ckpt:` naming a FIFO (would block forever)",
         lambda c: c.run(tiny("c6", **{"teachers.weak": {"model": "mlp:8", "ckpt": str(_fifo(c, "t.pt"))}})),
         ("teacher 'weak' ckpt", "is a FIFO (named pipe)", "pass a run's model.pt")),
    Case("strong-flipped", "`--strong RUN_DIR` whose model.pt has 64 flipped bytes (named as --strong)",
         lambda c: c.student_cmd(c.teacher, "--strong", _teacher_copy(c, "flip"), "-x", "debug"),
         ("--strong ", "is damaged", "model.pt does not match its checksum")),
    Case("teacher-nan-weights", "`--teacher` a model.pt (no run folder) holding a NaN weight",
         lambda c: c.student_cmd(_nan_teacher(c), "-x", "debug"), ("holds non-finite weights (NaN or inf in",)),
    # -- issue 19: the preflight (every model, one batch of the data's shape) and numbers' domains --
    Case("npz-1x1-cnn", "an npz of 1x1 images with `cnn:small` (a conv net that cannot take them)",
         lambda c: c.teacher_cmd(_npz_1x1(c), "-x", "debug", model="cnn:small"), ("model cnn:small on npz:", "1x1 images",
                                                                                   "cannot run")),
    Case("model-too-large", "`--model mlp:100000-100000` (10 G parameters), refused before it is built",
         lambda c: c.teacher_cmd("synthetic", "-x", "debug", model="mlp:100000-100000"), ("parameters, more than the",)),
    Case("lr-inf-cli", "`train teacher --lr inf`", lambda c: c.teacher_cmd("synthetic", "--lr", "inf", "-x", "debug"),
         ("lr must be a finite, positive number, got inf",)),
    Case("weight-decay-inf-cli", "`train teacher --weight-decay inf`",
         lambda c: c.teacher_cmd("synthetic", "--weight-decay", "inf", "-x", "debug"),
         ("weight_decay must be a finite number >= 0, got inf",)),
    Case("warmup-longer-cli", "`train teacher --epochs 2 --warmup-epochs 3`",
         lambda c: c.teacher_cmd("synthetic", "--warmup-epochs", "3", "-x", "debug", epochs=2),
         ("warmup_epochs (3.0) must be shorter than epochs (2)",)),
    Case("warmup-inf-cli", "`train teacher --warmup-epochs inf`",
         lambda c: c.teacher_cmd("synthetic", "--warmup-epochs", "inf", "-x", "debug"),
         ("warmup_epochs must be a finite number >= 0, got inf",)),
    Case("warmup-study", "`schedule.warmup_epochs: 5` with 2 epochs per stage", lambda c: c.run(tiny("n12", **{
        "schedule.warmup_epochs": 5})), ("warmup_epochs (5) must be shorter than epochs (2)",)),
    Case("seed-huge", "`seeds: [2**70]`", lambda c: c.run(tiny("n13", seeds=[2 ** 70])),
         ("seeds must be a non-empty list of integers in [0, 2**32)",)),
    Case("seed-huge-cli", "`train teacher --seed 2**40`", lambda c: c.teacher_cmd("synthetic", "--seed", str(2 ** 40), "-x", "debug"),
         ("--seed must be an integer < 2**32, got 1099511627776",)),
    Case("seeds-bool", "`seeds: [true]` (YAML's true is no seed)", lambda c: c.run(tiny("n14", seeds=[True])),
         ("seeds must be a non-empty list of integers", "got [True]")),
    Case("seeds-bool-twice", "`--set seeds=[true,1]`", lambda c: c.run(tiny(), "--set", "seeds=[true,1]"),
         ("seeds must be a non-empty list of integers", "got [True, 1]")),
    Case("eps-nan", "`attack fgsm --eps nan`", lambda c: ["attack", "fgsm", "-s", c.study(tiny()), "--results", c.results,
                                                          "--eps", "nan", "-x", "debug"], ("--eps values must be in (0, 1]",)),
    Case("distiller-key-twice", "`-D kd:tau=2,tau=3`", lambda c: c.student_cmd(c.teacher, "-D", "kd:tau=2,tau=3", "-x", "debug"),
         ("--distiller kd:tau=2,tau=3: 'tau' is given twice",)),
    Case("set-irrelevant-section", "`--set recipe.stage1.epochs=2` on a replacement study",
         lambda c: c.run(tiny(), "--set", "recipe.stage1.epochs=2"), ("'recipe' is not read by replacement studies",)),
    Case("set-irrelevant-subkey", "`--set grid.scheme=[partial]` on a manipulation study (grid.scheme is replacement's)",
         lambda c: c.run(manip("m9"), "--set", "grid.scheme=[partial]"),
         ("'grid.scheme' is not read by manipulation studies (only by replacement)",)),
    Case("teacher-ckpt-with-epochs", "a teacher given by `ckpt:` that also sets `epochs` (it is not trained)",
         lambda c: c.run(tiny("c7", **{"teachers.weak": {"model": "mlp:8", "ckpt": str(c.teacher), "epochs": 3}})),
         ("teacher 'weak' is given by ckpt", "'epochs' is never read")),
    Case("batch-1e9-set", "`--set batch_size=1e9` (YAML reads it as text)", lambda c: c.run(tiny(), "--set", "batch_size=1e9"),
         ("with --set batch_size=1e9: 'batch_size'", "must be an integer", "YAML reads 1e9 as text; write 1000000000")),
    # -- issue 19: identity ----------------------------------------------------------------------
    Case("config-edited-resume", "an unfinished run whose config.yaml was edited (lr), then resumed",
         lambda c: _edited_unfinished(c), ("is damaged", "config.yaml is not the config the run is named after")),
    Case("rerun-symlink", "`--rerun` a run folder that is a symbolic link", lambda c: _symlinked_rerun(c),
         ("is a symbolic link",)),
    Case("study-name-other-kind", "a manipulation study named like a finished replacement study",
         lambda c: c.run(manip("tiny")), ("study name 'tiny' is already used by a study of kind 'replacement'",)),
    Case("plot-wrong-kind", "`effdstl plot figure8` of a replacement study",
         lambda c: ["plot", "figure8", "tiny", "--results", c.results], ("figure8 draws fig8 studies", "kind 'replacement'",
                                                                          "effdstl plot figure5")),
    Case("cli-name-space", "`train teacher --name 'a b'`", lambda c: c.teacher_cmd("synthetic", "-x", "debug", name="a b"),
         ("--name 'a b' must be letters",)),
    Case("cli-name-newline", "`train teacher --name 'a<newline>b'`",
         lambda c: c.teacher_cmd("synthetic", "-x", "debug", name="a\nb"), ("--name 'a\\nb' must be letters",)),
    Case("cli-name-slash", "`train teacher --name a/b`", lambda c: c.teacher_cmd("synthetic", "-x", "debug", name="a/b"),
         ("--name 'a/b' must be letters",)),
    Case("cli-name-dash", "`train teacher --name=-x`",
         lambda c: [a if a != "--name" else "--name=-x" for a in c.teacher_cmd("synthetic", "-x", "debug", name="X")
                    if a != "X"], ("--name '-x' must be letters",)),
    Case("cli-name-dot", "`train teacher --name .hidden`", lambda c: c.teacher_cmd("synthetic", "-x", "debug", name=".hidden"),
         ("--name '.hidden' must be letters",)),
    # -- issue 19: bounded reads -----------------------------------------------------------------
    Case("study-fifo", "`--study` a FIFO (would block forever)", lambda c: ["run", "-s", _fifo(c, "fifo.yaml"),
                                                                            "--results", c.results], ("is a FIFO",)),
    Case("plot-fifo", "`effdstl plot figure5` of a FIFO named as its study file", lambda c: [
        "plot", "figure5", _fifo(c, "p.yaml"), "--results", c.results], ("study file", "is a FIFO")),
    Case("table-fifo", "`effdstl table table1` of a FIFO named as its study file", lambda c: [
        "table", "table1", _fifo(c, "t.yaml"), "--results", c.results], ("study file", "is a FIFO")),
    Case("study-dev-zero", "`--study /dev/zero`", lambda c: ["run", "-s", "/dev/zero", "--results", c.results],
         ("study file /dev/zero is a character device",)),
    Case("study-huge", "a 2 MB study file", lambda c: ["run", "-s", c.raw("huge.yaml", "# x\n" * 700_000), "--results", c.results],
         ("bytes, more than the 1048576 a study may have",)),
    Case("yaml-alias-bomb", "a YAML alias bomb (9 levels of 9 aliases: 387 M strings)",
         lambda c: ["run", "-s", _alias_bomb(c), "--results", c.results], ("expands to more than 100000 values",)),
    # -- issue 19: messages ----------------------------------------------------------------------
    Case("workers-negative", "`--workers -1` (0 is allowed)", lambda c: c.run(tiny(), "--workers", "-1"),
         ("--workers must be >= 0, got -1",)),
    Case("set-unclosed-list", "`--set seeds=[0,1` (no closing bracket)", lambda c: c.run(tiny(), "--set", "seeds=[0,1"),
         ("--set seeds=[0,1: the value is not valid YAML", "unclosed")),
    Case("ckpt-evil-pickle", "`--teacher` a pickle that would run os.system", lambda c: c.student_cmd(_evil_pickle(c), "-x", "debug"),
         ("is a plain Python pickle", "not loaded for safety", "can run code")),
    Case("ckpt-evil-pickle-proto0", "`--teacher` a protocol-0 (text) pickle that would run os.system",
         lambda c: c.student_cmd(_evil_pickle(c, 0), "-x", "debug"), ("is a plain Python pickle", "can run code")),
    Case("ckpt-evil-pickle-proto2", "`--teacher` a protocol-2 pickle that would run os.system",
         lambda c: c.student_cmd(_evil_pickle(c, 2), "-x", "debug"), ("is a plain Python pickle", "can run code")),
    Case("ckpt-fifo", "`--teacher` a FIFO", lambda c: c.student_cmd(_fifo(c, "fifo.pt"), "-x", "debug"),
         ("is not a regular file",)),
    Case("npz-object-array", "an npz whose y_train is an object array",
         lambda c: c.teacher_cmd("npz:" + str(c.npz("objects.npz", **{**_good_npz_arrays(), "y_train": np.array(
             [{"a": 1}] * 60, dtype=object)})), "-x", "debug"), ("holds Python objects (an object array)",)),
    Case("markup-in-input", "`--model ':thumbs_up:[bold]x'` (rich markup and emoji codes are shown as typed)",
         lambda c: c.teacher_cmd("synthetic", "-x", "debug", model=":thumbs_up:[bold]x"),
         ("unknown model ':thumbs_up:[bold]x'",)),
    Case("usage-missing-option", "`train teacher` without `--model` (Typer's usage error)",
         lambda c: ["train", "teacher", "--results", c.results], ("Missing option '--model'", "effdstl train teacher --help")),
    Case("usage-bad-int", "`train teacher --epochs abc`", lambda c: c.teacher_cmd("synthetic", "-x", "debug", epochs="abc"),
         ("Invalid value for '--epochs'",)),
]


# -- issue 19: the seal wherever a finished run is read, the preflight, identity, bounded reads -----

def _teacher_copy(ctx: Ctx, damage: str) -> Path:
    """A copy of the finished weak teacher's run folder (same hash name) under the case's folder,
    damaged: ``flip`` 64 bytes of model.pt, ``final`` cut final.json short, ``metrics`` delete
    metrics.jsonl, ``unfinished`` drop final.json and model.pt (a partial run), ``failed`` a
    failed run. -> the run folder."""
    import shutil

    run = ctx.tmp / "copies" / ctx.teacher.parent.name
    shutil.copytree(ctx.teacher.parent, run)
    if damage == "flip":
        b = bytearray((run / "model.pt").read_bytes())
        for i in range(len(b) - 400, len(b) - 336):
            b[i] ^= 0xFF
        (run / "model.pt").write_bytes(bytes(b))
    elif damage == "final":
        (run / "final.json").write_bytes((run / "final.json").read_bytes()[:40])
    elif damage == "metrics":
        (run / "metrics.jsonl").unlink()
    elif damage in ("unfinished", "failed"):
        (run / "final.json").unlink()
        if damage == "failed":
            (run / "failed.json").write_text(json.dumps({"status": "failed", "reason": "loss is NaN at epoch 1"}))
    return run


def _teacher_study_dir(ctx: Ctx, damage: str) -> Path:
    """A study folder whose one teacher run is a damaged copy (``--teacher STUDY_DIR``)."""
    run = _teacher_copy(ctx, damage)
    d = ctx.tmp / "one-teacher"
    (d / "runs").mkdir(parents=True)
    run.rename(d / "runs" / run.name)
    return d


def _nan_teacher(ctx: Ctx) -> Path:
    """The teacher's weights with one NaN, outside any run folder (a user's own model.pt)."""
    import torch

    blob = torch.load(ctx.teacher, map_location="cpu", weights_only=True)
    k = next(iter(blob["model"]))
    blob["model"][k].view(-1)[0] = float("nan")
    p = ctx.tmp / "nan-teacher.pt"
    torch.save(blob, p)
    return p


def _evil_pickle(ctx: Ctx, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    """A pickle (not a torch zip) that would call os.system when unpickled without weights_only
    (protocols 0-2 have no header byte to tell them by)."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = ctx.tmp / f"evil{protocol}.pt"
    p.write_bytes(pickle.dumps({"model": Evil()}, protocol=protocol))
    return p


def _fifo(ctx: Ctx, name: str) -> Path:
    p = ctx.tmp / name
    os.mkfifo(p)
    return p


def _alias_bomb(ctx: Ctx) -> Path:
    """Billion laughs: 9 levels of lists of 9 aliases to the level below (9**9 strings in all)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    return ctx.raw("bomb.yaml", "\n".join(lines) + "\n")


def _npz_1x1(ctx: Ctx) -> str:
    rng = np.random.default_rng(0)
    y = (np.arange(40) % 2).astype(np.int64)
    return "npz:" + str(ctx.npz("tiny-images.npz", x_train=rng.integers(0, 256, (40, 1, 1, 3), dtype=np.uint8), y_train=y,
                                x_test=rng.integers(0, 256, (20, 1, 1, 3), dtype=np.uint8), y_test=y[:20]))


def _edited_unfinished(ctx: Ctx) -> list:
    """A student run of the finished study made unfinished (final.json gone) with config.yaml edited."""
    run = next(d for d in sorted((ctx.results / "tiny" / "runs").iterdir())
               if yaml.safe_load((d / "config.yaml").read_text())["role"] == "student")
    (run / "final.json").unlink()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["stages"][0]["optim"]["lr"] = 5.0
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ctx.run(tiny())


def _symlinked_rerun(ctx: Ctx) -> list:
    """runs/<hash> of the finished study replaced by a symbolic link to a copy; --rerun another
    run, then it (the other run must not be cleared before the link is refused: the catalogue
    checks that no file of the results changed)."""
    import shutil

    run = ctx.teacher.parent
    other = next(d for d in sorted(run.parent.iterdir()) if d != run)
    target = ctx.tmp / "elsewhere" / run.name
    shutil.copytree(run, target)
    shutil.rmtree(run)
    run.symlink_to(target, target_is_directory=True)
    return ctx.run(tiny(), "--rerun", other.name, "--rerun", run.name)


def _recipe_study(name: str) -> dict:
    return {**tiny(name, kind="recipe"), "triplets": [], "grid": {}, "baselines": ["none"],
            "recipe": {"student": "mlp:8", "stage1": {"epochs": 1}, "stage2": {"epochs": 1}}}


def _binary(ctx: Ctx) -> Path:
    p = ctx.tmp / "binary.yaml"
    p.write_bytes(b"name: x\n\xff\xfe\x00\x01 kind: replacement\n")
    return p


def _labels_npz(ctx: Ctx, name: str, y_train, y_test, **extra) -> str:
    rng = np.random.default_rng(0)
    ytr, yte = np.asarray(y_train, np.int64), np.asarray(y_test, np.int64)
    return "npz:" + str(ctx.npz(name, x_train=rng.integers(0, 256, (len(ytr), 8, 8), dtype=np.uint8), y_train=ytr,
                                x_test=rng.integers(0, 256, (len(yte), 8, 8), dtype=np.uint8), y_test=yte, **extra))


def _jpeg_folder(ctx: Ctx, bad_split: str) -> str:
    """A 2-class JPEG folder whose <bad_split>/a/1.jpg is truncated."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = ctx.tmp / f"jpegs-{bad_split}"
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    bad = root / bad_split / "a" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    return f"folder:{root}"


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def _a_file(ctx: Ctx) -> Path:
    f = ctx.tmp / "a-file"
    f.write_text("not a folder\n")
    return f


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A results root holding the finished study 'tiny' (trained once, here, with the real CLI)."""
    base = tmp_path_factory.mktemp("finished")
    results = base / "results"
    s = base / "tiny.yaml"
    s.write_text(yaml.safe_dump(tiny(), sort_keys=False))
    p = cli(["run", "-s", s, "--results", results, "-x", "debug"], cwd=base)
    assert p.returncode == 0, p.stderr
    runs = [yaml.safe_load((d / "config.yaml").read_text()) | {"dir": d} for d in (results / "tiny" / "runs").iterdir()]
    weak = [r["dir"] for r in runs if r["role"] == "teacher" and r["model"] == "mlp:8"]
    assert len(runs) == 5 and len(weak) == 1 and (weak[0] / "final.json").exists()
    return results, weak[0].relative_to(results) / "model.pt"


def _selected(request) -> list[Case]:
    ids = {item.callspec.params["case"].id for item in request.session.items
           if getattr(item, "originalname", "") == "test_bad_input" and hasattr(item, "callspec")}
    return [c for c in CASES if c.id in ids and not (c.skip and c.skip())]


@pytest.fixture(scope="module")
def outcomes(request, finished, tmp_path_factory):
    """Run every selected case, a few at a time (each in its own copy of the finished results root,
    so their snapshots cannot see each other). -> {case id: what happened}."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    src, teacher_rel = finished
    prepared = []
    for case in _selected(request):  # files are made here, in order; only the CLI runs in parallel
        tmp = tmp_path_factory.mktemp(case.id)
        results = tmp / "results"
        shutil.copytree(src, results)
        ctx = Ctx(tmp, results, results / teacher_rel)
        prepared.append((case, ctx, case.make(ctx), case.env(ctx) if case.env else None))

    def one(item):
        case, ctx, args, env = item
        before_all, before_tiny = snapshot(ctx.results), snapshot(ctx.results / "tiny")
        if case.inproc:
            p = run_cli_inproc(*args, cwd=ctx.tmp, env=env or env_for())
        else:
            p = cli(args, cwd=ctx.tmp, env=env)
        return case.id, {"ctx": ctx, "args": args, "p": p, "before_all": before_all, "before_tiny": before_tiny,
                         "after_all": snapshot(ctx.results), "after_tiny": snapshot(ctx.results / "tiny")}

    # in-process cases one after another (they share this process's cwd, environment and streams);
    # the subprocess ones a few at a time
    out = dict(one(item) for item in prepared if item[0].inproc)
    workers = int(os.environ.get("EFFDSTL_TEST_WORKERS", "3"))
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        out.update(pool.map(one, [item for item in prepared if not item[0].inproc]))
    rows = []
    for case, *_ in prepared:
        o = out[case.id]
        errs = [ln for ln in o["p"].stderr.splitlines() if ln.startswith("error:")]
        rel = lambda a, o=o: (str(a).replace(str(o["ctx"].results), "$RESULTS")  # noqa: E731
                              .replace(str(o["ctx"].tmp), "$TMP"))
        rows.append({"id": case.id, "what": case.what, "phase": case.phase, "rc": o["p"].returncode,
                     "command": "effdstl " + " ".join(rel(a) for a in o["args"]),
                     "error": rel(errs[0]) if len(errs) == 1 else None,
                     "skipped": case.skip() if case.skip else None})
    dest = os.environ.get("EFFDSTL_CATALOGUE_OUT")
    if dest:
        Path(dest).write_text(json.dumps(rows, indent=1) + "\n")
    return out


# -- the catalogue -------------------------------------------------------------------------------

def test_catalogue_is_large_and_covers_the_issue():
    ids = {c.id for c in CASES}
    assert len(CASES) >= 25 and len(ids) == len(CASES)
    must = {"unknown-model", "unknown-dataset", "unknown-distiller", "unknown-scheme", "unknown-subset",
            "unknown-manipulation", "unknown-study-key", "yaml-syntax", "data-root-missing", "npz-wrong-keys",
            "npz-wrong-shape", "folder-no-classes", "teacher-classes-mismatch", "lr-negative", "epochs-zero",
            "batch-zero", "t-above-1", "delta-negative", "tau-zero", "ckpt-missing", "ckpt-truncated",
            "ckpt-wrong-arch", "gpus-not-here", "results-under-a-file", "slurm-absent", "name-escapes-root"}
    assert must <= ids, must - ids
    # in-job errors are checked under both executors (data and checkpoint errors of the local executor
    # now fail in the preflight, before its job; a bad JPEG still fails inside it)
    assert {"data-root-missing-local", "ckpt-wrong-arch-local", "jpeg-corrupt-local"} <= ids


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, outcomes):
    why = case.skip() if case.skip else None
    if why:
        pytest.skip(why)
    o = outcomes[case.id]
    p = o["p"]
    shown = f"\n--- effdstl {' '.join(map(str, o['args']))}\n--- stdout:\n{p.stdout}\n--- stderr:\n{p.stderr}"
    assert p.returncode != 0, shown
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, shown
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, shown
    line = errors[0]
    for s in case.expect:
        assert s in line, shown
    if case.near:
        assert f"did you mean '{case.near}'" in line, shown
    # submitit's wrapper text never stands in for the job's own message
    assert "----" not in line and "log.out" not in line and "log.err" not in line, shown
    # no rich markup or emoji rendered from user text, no Typer box, no numpy advice that runs code
    assert not re.search(r"[\u2500-\u257f\U0001F300-\U0001FAFF]", p.stderr) and "allow_pickle" not in line, shown
    if case.phase == "pre":
        assert p.stderr.strip().splitlines() == [line], shown          # that line, and only it
        assert o["after_all"] == o["before_all"]                       # not one file written
    else:
        assert p.stderr.strip().splitlines()[-1] == line, shown        # the last word is the error
    assert o["after_tiny"] == o["before_tiny"]                         # the finished study: same bytes


def test_finished_study_still_reads_back(finished, tmp_path):
    results, _ = finished
    p = cli(["results", "tiny", "--results", results, "--format", "csv"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    import pandas as pd

    df = pd.read_csv(results / "tiny" / "tables" / "results.csv")
    assert len(df) == 5 and df["run"].is_unique and set(df["state"]) == {"done"}


# -- safe loading: a static check of the package ---------------------------------------------------

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


_SAFE_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", 'getattr(yaml, "CSafeLoader", yaml.SafeLoader)'}


def _safe_yaml_loader(node, tree) -> bool:
    """``Loader=`` is PyYAML's safe loader (the C one where it is built): written out, or a
    module-level name assigned exactly one of those."""
    if node is None:
        return False
    if isinstance(node, ast.Name):
        found = [a.value for a in tree.body if isinstance(a, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == node.id for t in a.targets)]
        return len(found) == 1 and ast.unparse(found[0]).replace("'", '"') in _SAFE_LOADERS
    return ast.unparse(node) in _SAFE_LOADERS


def test_package_loads_nothing_unsafely():
    """No shell strings, no unsafe YAML or pickle, every torch.load with weights_only=True."""
    problems = []
    files = sorted(PKG.glob("*.py"))
    assert len(files) > 10
    for path in files:
        src = path.read_text()
        tree = ast.parse(src)
        where = lambda n: f"{path.name}:{n.lineno}"  # noqa: E731
        for node, owner, name in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            if "shell" in kw and not (isinstance(kw["shell"], ast.Constant) and kw["shell"].value is False):
                problems.append(f"{where(node)}: shell=")
            if owner == "os" and name in ("system", "popen", "execl", "execlp", "execv", "execvp", "spawnl"):
                problems.append(f"{where(node)}: os.{name}")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load", "unsafe_load_all") \
                    and not (name == "load" and _safe_yaml_loader(kw.get("Loader"), tree)):
                problems.append(f"{where(node)}: yaml.{name} (use yaml.safe_load)")
            if owner in ("pickle", "dill", "cloudpickle", "marshal") and name in ("load", "loads"):
                problems.append(f"{where(node)}: {owner}.{name}")
            if owner == "torch" and name == "load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where(node)}: torch.load without weights_only=True")
            if owner == "np" and name == "load":
                ap = kw.get("allow_pickle")  # numpy's default is False
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{where(node)}: np.load with allow_pickle")
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                problems.append(f"{where(node)}: {node.func.id}()")
            if owner == "subprocess" and name in ("run", "Popen", "call", "check_call", "check_output"):
                arg = node.args[0] if node.args else kw.get("args")
                if not isinstance(arg, (ast.List, ast.Tuple)):
                    problems.append(f"{where(node)}: subprocess.{name} not given an argument list")
        if re.search(r"\byaml\.(Unsafe)?Loader\b|Loader=yaml\.(Full|Unsafe)?Loader", src):
            problems.append(f"{path.name}: an unsafe yaml Loader")
    assert not problems, problems


def test_run_directory_names_are_sanitized(tmp_path):
    """Run folders are 12-hex hashes whatever the config holds; study names are plain folder names."""
    from effdstl_cli.config import config_hash, load_study
    from effdstl_cli.errors import EffdstlError
    from effdstl_cli.studies import plan, study_dir

    nasty = tiny("ok")
    nasty["description"] = "../../etc/passwd; rm -rf / $(reboot)"
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(nasty))
    p = plan(load_study(f), tmp_path / "results")
    for j in p.jobs:
        for cfg, d in j.runs:
            assert re.fullmatch(r"[0-9a-f]{12}", d.name) and d.name == config_hash(cfg)
            assert d.parent == (tmp_path / "results" / "ok" / "runs").resolve()
    for bad in ("..", "../x", "/abs", "a/b", ".hidden", "x y", "a\nb", "", "-x"):
        s = tiny(bad)
        f.write_text(yaml.safe_dump(s))
        with pytest.raises(EffdstlError):
            load_study(f)
    with pytest.raises(EffdstlError):
        study_dir(tmp_path, "../escape")
