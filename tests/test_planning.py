"""Planning without torch (issue 20): ``--dry-run`` of every launching command, ``status``,
``results``, ``table`` and ``plot`` never import torch, so they cost about what the CLI's own
start-up costs (docs/PERFORMANCE.md 'Planning'), and a dry run still refuses a bad study with the
same one-line error. The commands run in ONE fresh interpreter (Typer's runner, in order), which
reports after each whether ``torch`` is in ``sys.modules``: the first command that loads it is named.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli_env, study_dict, write_study

PROBE = r"""
import json, sys
from typer.testing import CliRunner
from effdstl_cli.cli import app
from effdstl_cli.errors import EffdstlError

rows = []
for argv in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, argv)
    exc = r.exception if isinstance(r.exception, EffdstlError) else None
    if r.exception is not None and exc is None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a bug, not a refusal: its traceback fails the test
    rows.append({"argv": argv, "exit": r.exit_code, "error": str(exc) if exc else None,
                 "output": r.output, "torch": "torch" in sys.modules})
print(json.dumps(rows))
"""


def _probe(argvs: list[list[str]], cwd: Path) -> list[dict]:
    """Run each ``effdstl ARGV`` in order in one new interpreter; per command: exit code, the
    EffdstlError it raised (None), its output and whether torch was loaded by then."""
    p = subprocess.run([sys.executable, "-c", PROBE, json.dumps([[str(a) for a in v] for v in argvs])],
                       cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=900)  # a busy machine
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _recipe(name: str) -> dict:
    """A tiny recipe study (Table 1's kind): 1-epoch teachers, 1 + 1 epoch stages, one baseline."""
    return study_dict(name, kind="recipe", triplets=[], grid={}, baselines=["none"],
                      recipe={"student": "mlp:8", "teacher1": "weak", "teacher2": "strong",
                              "stage1": {"epochs": 1}, "stage2": {"epochs": 1}})


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A results root with a finished replacement study ('tiny') and recipe study ('rec'), trained
    in this process (debug executor, a few seconds) through the real CLI."""
    from typer.testing import CliRunner

    from effdstl_cli.cli import app

    root = tmp_path_factory.mktemp("planning")
    (root / "rec.yaml").write_text(yaml.safe_dump(_recipe("rec"), sort_keys=False))
    for study in (write_study(root / "tiny.yaml", name="tiny", epochs=1), root / "rec.yaml"):
        r = CliRunner().invoke(app, ["run", "--study", str(study), "--executor", "debug", "--results",
                                     str(root / "results")])
        assert r.exit_code == 0, (r.output, r.exception)
    return root


def test_planning_commands_import_no_torch(finished):
    res = str(finished / "results")
    fig5 = ROOT / "studies" / "figure5-cifar10.yaml"
    teacher = next(p for p in sorted((finished / "results" / "tiny" / "runs").glob("*/model.pt"))
                   if yaml.safe_load((p.parent / "config.yaml").read_text())["role"] == "teacher")
    cmds = [
        ["--help"],
        ["sweep", "replacement", "--study", fig5, "--dry-run", "--results", res],  # the paper's scale
        ["sweep", "replacement", "--study", ROOT / "studies" / "figure5-imagenet.yaml", "--dry-run",
         "--executor", "slurm", "--gpus-per-job", "4", "--results", res],
        ["sweep", "manipulation", "--study", ROOT / "studies" / "figure6-cifar10.yaml", "--dry-run", "--results", res],
        ["train", "recipe", "--study", ROOT / "studies" / "table1-imagenet.yaml", "--dry-run", "--results", res],
        ["attack", "fgsm", "--study", ROOT / "studies" / "figure7-cifar10.yaml", "--dry-run", "--results", res],
        ["train", "teacher", "-d", "cifar10", "-m", "resnet56", "--dry-run", "--results", res],
        ["train", "student", "-d", "cifar10", "-m", "resnet20", "--teacher", "tv:resnet34", "-D", "kd", "-D", "none",
         "--dry-run", "--results", res],
        ["run", "--study", finished / "tiny.yaml", "--dry-run", "--results", res],  # finished: every job 'skip'
        ["status", "tiny", "--results", res],
        ["results", "tiny", "--results", res],
        ["results", "rec", "--results", res, "--format", "csv"],
        ["plot", "figure5", "tiny", "--results", res],
        ["plot", "curves", "tiny", "--results", res],
        ["table", "table1", "rec", "--results", res],
        ["train", "student", "-d", "synthetic", "-m", "mlp:8", "--teacher", teacher, "-D", "kd", "--dry-run",
         "--results", res],  # the teacher's model spec read from its model.pt without torch
    ]
    rows = _probe(cmds, finished)
    for row in rows:
        assert row["exit"] == 0 and row["error"] is None, row
        assert not row["torch"], f"`effdstl {' '.join(row['argv'])}` imported torch"
    out = {" ".join(r["argv"][:2]): r["output"] for r in rows}
    assert "17 runs" not in out["sweep replacement"] and "-> skip" not in out["sweep replacement"]
    assert "students of resnet8x4" in rows[1]["output"], rows[1]["output"]  # the fusion plan is shown
    assert "[done -> skip]" in rows[8]["output"], rows[8]["output"]
    assert "done" in rows[9]["output"] and "wrote" in rows[12]["output"] and "wrote" in rows[14]["output"]
    assert "mlp:8" in rows[15]["output"] and "kd[" in rows[15]["output"], rows[15]["output"]


def test_dry_run_refuses_bad_names_without_torch(tmp_path):
    """The dry run's checks of names and parameters are torch-free and say what they said before."""
    bad = {"model": study_dict("m", student="resnet2O"), "dataset": study_dict("d", dataset="cifar-10"),
           "distiller": study_dict("p", distill={"tau": "abc", "lam": 1.0})}
    cmds = []
    for name, s in bad.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(s, sort_keys=False))
        cmds.append(["sweep", "replacement", "--study", tmp_path / f"{name}.yaml", "--dry-run",
                     "--results", tmp_path / "r"])
    cmds.append(["train", "student", "-m", "mlp:32", "-D", "kd:tau=0", "--teacher", "tv:resnet34", "--dry-run",
                 "--results", tmp_path / "r"])
    cmds.append(["sweep", "replacement", "--study", tmp_path / "model.yaml", "--dry-run", "--fuse", "sometimes"])
    rows = _probe(cmds, tmp_path)
    errors = [r["error"] or "" for r in rows]
    assert "unknown model 'resnet2O'" in errors[0] and "resnet20" in errors[0], errors[0]
    assert "unknown dataset 'cifar-10'" in errors[1] and "cifar10" in errors[1], errors[1]
    assert "tau" in errors[2] and "'abc'" in errors[2], errors[2]
    assert "tau must be > 0" in errors[3], errors[3]
    assert "--fuse mode" in errors[4] and "sometimes" in errors[4], errors[4]
    assert not (tmp_path / "r").exists()
    for row in rows:
        assert row["exit"] != 0 and not row["torch"], row


def test_the_torch_free_spec_reader_defers_every_doubtful_file_to_torch(tmp_path):
    """``read_saved_spec`` answers only for an intact model.pt of ours; a damaged, truncated,
    foreign or object-holding file gets None, so ``models.saved_spec`` (torch) reads it and names
    the problem exactly as before."""
    import collections

    import torch

    from effdstl_cli.errors import EffdstlError
    from effdstl_cli.models import build_model, save_weights, saved_spec
    from effdstl_cli.modelspec import read_saved_spec

    good = tmp_path / "model.pt"
    save_weights(build_model("mlp:16", 10, 1, 8), good)
    assert read_saved_spec(good) == saved_spec(good) == "mlp:16"
    blob = good.read_bytes()
    i = len(blob) // 2
    (tmp_path / "flipped.pt").write_bytes(blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:])
    (tmp_path / "cut.pt").write_bytes(blob[:-100])
    torch.save({"model_spec": "mlp:16", "x": collections.Counter()}, tmp_path / "object.pt")
    torch.save(build_model("mlp:16", 10, 1, 8).state_dict(), tmp_path / "raw.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    for name in ("flipped", "cut", "object", "raw", "text"):
        assert read_saved_spec(tmp_path / f"{name}.pt") is None, name
    with pytest.raises(EffdstlError, match="corrupt or truncated"):
        saved_spec(tmp_path / "cut.pt")
