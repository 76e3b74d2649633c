"""A new replacement scheme, subset and manipulation (with a parameter of its own) are one
registry entry each in targets.py: studies plan them, the engine trains them, the results table
and the figures show them, and nothing else is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from effdstl_cli import plots, targets
from effdstl_cli.config import load_study
from effdstl_cli.launch import LaunchOptions, launch
from effdstl_cli.results import collect, write_table
from effdstl_cli.studies import plan, validate_runs


def _mix(p_weak, p_strong, labels):
    """Half of each teacher (a new replacement scheme)."""
    return 0.5 * (p_weak + p_strong)


def _temper(p, labels, gamma, p_student):
    """``p ** gamma``, renormalized (a new manipulation whose parameter is ``gamma``)."""
    q = p.clamp_min(1e-12) ** gamma
    return q / q.sum(1, keepdim=True)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(targets.SCHEMES, "mix", targets.Scheme("mix", _mix, "half and half", True))
    monkeypatch.setitem(targets.SUBSETS, "not_reg_not_cor",
                        targets.Subset("not_reg_not_cor", lambda c, r: ~r & ~c, "neither", True))
    monkeypatch.setitem(targets.MANIPULATIONS, "temper",
                        targets.Manipulation("temper", _temper, "gamma", "γ", 2.0, "tempering",
                                             lambda g: g > 0, "> 0"))


def _study(tmp_path: Path, name: str, kind: str, grid: dict) -> dict:
    s = {"name": name, "kind": kind, "dataset": "digits", "seeds": [0], "batch_size": 128,
         "teachers": {"weak": {"model": "mlp:16", "epochs": 1}, "strong": {"model": "mlp:64", "epochs": 1}},
         "triplets": [{"weak": "weak", "strong": "strong", "student": "mlp:16"}],
         "schedule": {"epochs": 1, "lr": 0.1}, "grid": grid}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(s, sort_keys=False))
    return load_study(path)


def _run(study: dict, root: Path):
    p = plan(study, root)
    validate_runs(p)
    launch(p, LaunchOptions(executor="debug", device="cpu"), report=lambda m: None)
    return p


def test_registered_entries_behave_like_the_papers(registered):
    p = torch.softmax(torch.randn(6, 4), 1)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    q = targets.manipulate("temper", p, y, gamma=2.0)
    assert torch.allclose(q.sum(1), torch.ones(6))
    with pytest.raises(Exception, match="temper needs gamma > 0"):
        targets.manipulate("temper", p, y, gamma=0.0)
    assert torch.allclose(targets.replace("mix", p, p.flip(0), y), 0.5 * (p + p.flip(0)))
    assert "mix" in targets.grid_defaults(targets.SCHEMES)


def test_new_scheme_subset_and_manipulation_run_to_table_and_figures(registered, tmp_path):
    root = tmp_path / "results"
    rep = _run(_study(tmp_path, "reg-fig5", "replacement", {"scheme": ["mix", "full"], "subset": ["not_reg_not_cor"]}),
               root)
    man = _run(_study(tmp_path, "reg-fig6", "manipulation",
                      {"kind": ["temper"], "subset": ["not_reg_not_cor", "all"], "params": {"temper": {"gamma": [0.5, 2.0]}}}),
               root)

    df = collect(rep.study_dir)
    assert (df["state"] == "done").all()
    csv, _ = write_table(df, rep.study_dir / "tables")
    text = csv.read_text()
    assert "mix" in text and "not_reg_not_cor" in text
    fig5 = plots.figure5(rep.study_dir)
    assert fig5.paths[0].exists() and fig5.paths[0].suffix == ".png"
    assert fig5.info["x_groups"] == ["full", "mix"]
    assert fig5.info["subsets"] == ["not_reg_not_cor"] and "neither" in fig5.info["legend"]

    df = collect(man.study_dir)
    assert (df["state"] == "done").all()
    st = df[df["distiller"] == "manipulate"]
    assert set(st["manipulation"]) == {"temper"} and set(st["scheme"]) == {""}
    assert sorted(st["param"].unique()) == [0.5, 2.0]
    csv, _ = write_table(df, man.study_dir / "tables")
    assert "temper" in csv.read_text()
    fig6 = plots.figure6(man.study_dir)
    assert fig6.paths[0].exists()
    assert fig6.info["x_groups"] == ["tempering\nγ=0.5", "tempering\nγ=2"]
    assert set(fig6.info["subsets"]) == {"not_reg_not_cor", "all"}


def test_a_study_with_an_unknown_parameter_fails_with_the_registered_names(registered, tmp_path):
    with pytest.raises(Exception, match="gamma"):
        _study(tmp_path, "bad", "manipulation", {"kind": ["temper"], "params": {"temper": {"gama": 2.0}}})
