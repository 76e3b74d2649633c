"""`effdstl bench --device cpu` end to end with tiny models: every section, every ratio, the JSON."""

from __future__ import annotations

import json

from conftest import run_cli

TINY = ["--student", "mlp:16", "--teacher", "cnn:small", "--strong", "cnn:small", "--image-size", "16",
        "--batch", "16", "--classes", "4", "--steps", "2", "--repeats", "1", "--naive-steps", "2",
        "--k", "4", "--jpegs", "48", "--jpeg-px", "24", "--workers", "1",
        "--fuse-models", "mlp:16@8x1,resnet8@8", "--fuse-k", "3", "--fuse-batch", "8"]


def test_bench_cpu_prints_every_ratio_and_writes_json(tmp_path):
    out = tmp_path / "b.json"
    p = run_cli("bench", "--device", "cpu", *TINY, "--json", str(out), "--profile", str(tmp_path / "prof"),
                cwd=tmp_path, timeout=240)
    text = p.stdout
    res = json.loads(out.read_text())
    assert res["device_type"] == "cpu" and "CPU" in res["device"] and res["device"] in text
    rows = {(r["section"], r["what"]): r for r in res["rows"]}
    sections = [r["section"] for r in res["rows"]]
    assert sections.count("a") == 1 and sections.count("b") == 1
    assert sections.count("c") == 2 and sections.count("d") == 10
    assert sections.count("f") == 5                          # 2 models x (loop, fused) + 1 projection
    fused = [r for r in res["rows"] if r["section"] == "f" and r["what"].endswith(": fused")]
    assert len(fused) == 2 and all(r["vs"] == "loop" and r["memory_mb"] > 0 for r in fused)
    proj = [r for r in res["rows"] if "projection" in r["what"]][0]
    assert proj["projected_hours"] > 0 and proj["projected_hours_loop"] > 0
    for r in res["rows"]:
        assert r["img_s"] > 0 and r["ratio"] > 0, r
        assert f"{r['ratio']:.2f}x" in text                        # printed in the table
    group = [r for r in res["rows"] if r["section"] == "c" and "group" in r["what"]][0]
    assert group["vs"].startswith("cost of separate") and "wall_ratio" in group
    assert any("decode on CPU" in w for _, w in rows)
    assert res["jpegs"]["files"] >= 48 and res["config"]["k"] == 4
    assert res["suggested_decode"].startswith("mixed:") and any("step, mixed" in w for _, w in rows)
    loop = [r for r in res["rows"] if "image by image" in r["what"]][0]
    assert loop["batched_vs_loop"] > 0                                   # batched decode vs the per-image loop
    for name in ("decode_batch", "per_image_loop", "jpeg_to_step"):      # --profile: tables and counts
        prof = res["profile"][name]
        assert prof["compute_ops_per_batch"] > 0 and "aten::" in (tmp_path / "prof" / prof["table"].split("/")[-1]).read_text()


def test_bench_sections_and_bad_options(tmp_path):
    out = tmp_path / "a.json"
    run_cli("bench", "--device", "cpu", *TINY, "--only", "a", "--json", str(out), cwd=tmp_path, timeout=120)
    assert [r["section"] for r in json.loads(out.read_text())["rows"]] == ["a"]
    p = run_cli("bench", "--device", "cpu", "--only", "x", cwd=tmp_path, check=False)
    assert p.returncode != 0 and "unknown section" in p.stderr
    (tmp_path / "file").write_text("x")
    p = run_cli("bench", "--device", "cpu", "--profile", tmp_path / "file" / "prof", cwd=tmp_path, check=False)
    assert p.returncode != 0 and "--profile" in p.stderr and "Traceback" not in p.stderr
    assert "img/s" not in p.stdout                                     # refused before any timing


def test_cache_hit_rate_limits_and_hand_computed_case():
    """The projection's teacher-cache hit rate: E draws from V equally likely variants per image."""
    from effdstl_cli.bench import CIFAR_VARIANTS, cache_hit_rate

    assert abs(cache_hit_rate(1, 162)) < 1e-12                 # one epoch: nothing seen before
    assert abs(cache_hit_rate(2, 2) - 0.25) < 1e-12            # V=2, E=2: E[distinct] = 1.5 of 2 draws
    assert abs(cache_hit_rate(2, 1) - 0.5) < 1e-12             # one variant: every epoch after the first hits
    assert cache_hit_rate(10_000, CIFAR_VARIANTS) > 0.98       # long schedules: almost every lookup hits
    assert 0.47 < cache_hit_rate(240) < 0.49                   # the paper's 240 epochs over 162 crop/flip variants
    rates = [cache_hit_rate(e) for e in (1, 10, 100, 240, 1000)]
    assert rates == sorted(rates)                              # more epochs, more hits
