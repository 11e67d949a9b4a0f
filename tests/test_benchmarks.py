"""Smoke tests of ``benchmarks/run.py`` and its helpers: cheap (one tiny kernel case in a
subprocess), checking the JSON schema and that the measurements mean what they claim."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import run as bench_run  # noqa: E402
import timing  # noqa: E402

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def test_quick_run_writes_schema(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SENFORMER_BACKEND": ""}
    cmd = [sys.executable, str(BENCH / "run.py"), "--quick", "--only", "mask_logits", "--backends", "reference",
           "--device", "cpu", "--dtype", "fp32", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("cpu-") and files[0].name.endswith("-quick.json")
    res = json.loads(files[0].read_text())
    assert res["schema"] == bench_run.SCHEMA
    for key in ("device", "device_name", "date", "torch", "triton", "threads", "quick", "dtypes"):
        assert key in res["env"], key
    assert res["env"]["device"] == "cpu" and res["env"]["quick"] is True
    assert set(res) >= {"ceilings", "ops"} and "e2e" not in res and "models" not in res
    c = res["ceilings"]["float32"]
    assert c["copy"]["gbps"] > 0 and c["matmul"]["tflops"] > 0
    rows = res["ops"]
    assert rows and {r["op"] for r in rows} == {"mask_logits"} and {r["backend"] for r in rows} == {"reference"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] > 0 and r["tflops"] > 0 and r["peak_mib"] > 0
        assert r["speedup_vs_reference"] == pytest.approx(1.0)
    for r in rows:  # the eager reference against its float64 self: output (fwd), input gradients (fwd+bwd)
        assert 0 <= r["rel_err"] < 1e-4, r
    fwd = next(r for r in rows if r["mode"] == "fwd")
    # the fwd output alone is B*N*h*w fp32 values: the peak cannot be below it
    s = fwd["params"]
    assert fwd["peak_mib"] * 2**20 >= s["B"] * s["N"] * s["h"] * s["w"] * 4
    md = files[0].with_suffix(".md").read_text()
    assert "mask_logits" in md and res["env"]["torch"] in md
    if HAS_MPL:
        assert files[0].with_name(files[0].stem + "-ops.png").stat().st_size > 0


def test_merge_keeps_sections_not_rerun(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema": bench_run.SCHEMA, "env": {"date": "old"}, "ops": [1], "e2e": [2]}))
    merged = bench_run._merge(path, {"schema": bench_run.SCHEMA, "env": {"date": "new"}, "ops": [3]}, {"ops", "ceilings"})
    assert merged == {"schema": bench_run.SCHEMA, "env": {"date": "new"}, "ops": [3], "e2e": [2]}


def test_only_selects_sections():
    assert bench_run._split_only("mask_logits")[:2] == ({"ops", "ceilings"}, {"mask_logits"})
    assert bench_run._split_only("senformer_r50")[0] == {"models", "e2e"}
    assert bench_run._split_only("e2e,senformer_r50")[0] == {"e2e"}
    assert bench_run._split_only("")[0] == set(bench_run.SECTIONS)


def test_bad_dtype_is_named(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    assert bench_run.main(["--device", "cpu", "--dtype", "fp64", "--only", "ceilings"]) == 2
    assert "--dtype fp64" in capsys.readouterr().err


def test_quantiles():
    q = timing.quantiles([float(x) for x in range(1, 12)])  # 1..11
    assert (q["median_ms"], q["p20_ms"], q["p80_ms"], q["reps"]) == (6.0, 3.0, 9.0, 11)


def test_cpu_peak_memory_counts_overlap_not_sequence():
    n = 2**18  # 1 MiB of float32

    def overlapping():
        a = torch.ones(n)
        b = torch.ones(n) + a
        return b

    def sequential():
        for _ in range(3):
            a = torch.ones(n)
            del a
    both = timing.peak_memory(overlapping, "cpu")
    one = timing.peak_memory(sequential, "cpu")
    assert 2 * 2**20 <= both < 3.5 * 2**20
    assert 2**20 <= one < 1.5 * 2**20


def test_report_renders_every_section(tmp_path):
    ok_op = {"op": "class_cross_attention", "backend": "reference", "shape": "B1 H8 N150 L256 D64", "dtype": "float32",
             "mode": "fwd", "status": "ok", "median_ms": 2.0, "p20_ms": 1.9, "p80_ms": 2.2, "peak_mib": 3.0,
             "gbps": 1.5, "pct_copy_bw": 20.0, "tflops": 0.02, "pct_matmul": 50.0, "speedup_vs_reference": 1.0,
             "rel_err": 1e-7}
    untimed = {**ok_op, "backend": "triton", "status": "untimed", "note": "Triton interpreter", "median_ms": None}
    model = {"name": "SenFormer R50", "status": "ok", "input": "512x512", "params_with_aux": 60e6,
             "params_without_aux": 55e6, "paper_params_m": 55, "flops_mmcv": 179.6e9, "flops_mmcv_cache_kv": 122e9,
             "paper_flops_g": 179, "flops_full": 405e9, "flops_full_cache_kv": 291e9}
    e2e = [{"preset": "senformer_r50", "variant": v, "size": s, "num_classes": 150, "batch": 2, "group": g,
            "dtype": "float32", "status": "ok", "train_images_s": 1.0, "train_peak_mib": 100.0,
            "infer_images_s": 3.0 + s / 512, "infer_peak_mib": 50.0}
           for v in ("fused", "reference") for s, g in ((512, "base"), (768, "size"))]
    e2e.append({"preset": "senformer_swin_t", "variant": "compile", "status": "skipped", "note": "quick"})
    res = {"schema": 1, "env": {"device": "cpu", "device_name": "Test CPU", "torch": "9.9", "triton": "3.9",
                                "date": "2026-01-01 00:00 UTC", "quick": True, "threads": 1, "cpu_count": 2},
           "ceilings": {"float32": {"copy": {"gbps": 7.5}, "matmul": {"n": 512, "dtype": "float32", "tflops": 0.04}}},
           "models": [model, {"name": "SenFormer Swin-L", "status": "error", "note": "boom"}],
           "ops": [ok_op, untimed], "e2e": e2e}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(res))
    md = report.write_markdown(path).read_text()
    for needle in ("Test CPU", "torch 9.9", "179.6", "122.0", "error: boom", "2.000 [1.900, 2.200]",
                   "1.5 (20%)", "untimed", "Triton interpreter", "senformer_swin_t", "skipped: quick", "| 4.00 |"):
        assert needle in md, needle
    if HAS_MPL:
        pngs = report.plot(path)
        assert {p.name for p in pngs} == {"x-ops.png", "x-e2e.png", "x-models.png"}
