"""Smoke tests of ``benchmarks/run.py`` and its helpers: cheap (one tiny kernel case in a
subprocess), checking the JSON schema and that the measurements mean what they claim."""
from __future__ import annotations

import contextlib
import importlib
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

import bench_ops  # noqa: E402
import ceilings  # noqa: E402
import report  # noqa: E402
import run as bench_run  # noqa: E402
import timing  # noqa: E402

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# made-up ceilings: the roofline arithmetic, not this host's speed, is under test
FAKE_CEILINGS = {"copy": {"gbps": 10.0}, "matmul": {"tflops": 0.1}}
ROOFLINE = ("bytes", "flops", "ideal_ms", "bound", "pct_of_limit")


def assert_roofline(r: dict):
    """A row that ran carries its whole roofline (an untimed one all but the achieved %)."""
    timed = r["status"] == "ok"
    missing = [k for k in ROOFLINE if r.get(k) is None and (timed or k != "pct_of_limit")]
    assert not missing, (missing, r)
    assert r["bytes"] > 0 and r["flops"] >= 0 and r["ideal_ms"] > 0 and r["bound"] in ("memory", "compute"), r
    if timed:
        assert r["pct_of_limit"] > 0, r
        assert r["pct_of_limit"] == pytest.approx(100 * r["ideal_ms"] / r["median_ms"])


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
        assert_roofline(r)
        # drawn on the ceilings stored beside the rows
        mem_ms = r["bytes"] / (c["copy"]["gbps"] * 1e9) * 1e3
        assert r["ideal_ms"] == pytest.approx(max(mem_ms, r["flops"] / (c["matmul"]["tflops"] * 1e12) * 1e3))
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


def test_merge_keeps_ceilings_of_other_dtypes(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema": bench_run.SCHEMA, "ceilings": {"float32": 1, "bfloat16": 2}}))
    merged = bench_run._merge(path, {"schema": bench_run.SCHEMA, "ceilings": {"bfloat16": 3}}, {"e2e", "ceilings"})
    assert merged["ceilings"] == {"float32": 1, "bfloat16": 3}


def test_only_selects_sections():
    assert bench_run._split_only("mask_logits")[:2] == ({"ops", "ceilings"}, {"mask_logits"})
    assert bench_run._split_only("senformer_r50")[0] == {"models", "e2e", "ceilings"}
    assert bench_run._split_only("e2e,senformer_r50")[0] == {"e2e", "ceilings"}
    assert bench_run._split_only("models")[0] == {"models"}
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
             "gbps": 1.5, "tflops": 0.02, "bytes": 3.0e6, "flops": 4.0e7, "ideal_ms": 0.5, "bound": "compute",
             "pct_of_limit": 25.0, "speedup_vs_reference": 1.0, "rel_err": 1e-7}
    untimed = {**ok_op, "backend": "triton", "status": "untimed", "note": "Triton interpreter", "median_ms": None}
    model = {"name": "SenFormer R50", "status": "ok", "input": "512x512", "params_with_aux": 60e6,
             "params_without_aux": 55e6, "paper_params_m": 55, "flops_mmcv": 179.6e9, "flops_mmcv_cache_kv": 122e9,
             "paper_flops_g": 179, "flops_full": 405e9, "flops_full_cache_kv": 291e9}
    e2e = [{"preset": "senformer_r50", "variant": v, "size": s, "num_classes": 150, "batch": 2, "group": g,
            "dtype": "float32", "status": "ok", "train_images_s": 1.0, "train_peak_mib": 100.0,
            "infer_images_s": 3.0 + s / 512, "infer_peak_mib": 50.0, "train_flops": 1.2e12, "train_ideal_ms": 30.0,
            "train_pct_of_limit": 3.0, "infer_flops": 4e11, "infer_ideal_ms": 10.0, "infer_pct_of_limit": 1.5}
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
                   "untimed", "Triton interpreter", "senformer_swin_t", "skipped: quick", "| 4.00 (1.5%) |",
                   "| MB moved | GFLOP | ideal ms (bound) | % of limit |", "| 3 | 0.04 | 0.5 (compute) | 25% | 1.5, 0.02 |",
                   "| 1.00 (3.0%) | 1200.0, 30 |", "| 400.0, 10 |"):
        assert needle in md, needle
    if HAS_MPL:
        pngs = report.plot(path)
        assert {p.name for p in pngs} == {"x-ops.png", "x-e2e.png", "x-models.png"}


def test_roofline_arithmetic():
    ceil = {"copy": {"gbps": 100.0}, "matmul": {"tflops": 10.0}}
    # 1 GB at 100 GB/s = 10 ms; 1 TFLOP at 10 TFLOP/s = 100 ms: compute-bound, ideal 100 ms
    r = ceilings.roofline(1e9, 1e12, ceil, median_ms=200.0)
    assert r == {"bytes": 1e9, "flops": 1e12, "ideal_ms": pytest.approx(100.0), "bound": "compute",
                 "pct_of_limit": pytest.approx(50.0)}
    r = ceilings.roofline(1e9, 0.0, ceil)
    assert r["ideal_ms"] == pytest.approx(10.0) and r["bound"] == "memory" and "pct_of_limit" not in r


def test_cost_by_hand():
    """bench_ops._cost on the tiny shapes, counted by hand (fp32 = 4 bytes, labels int64 = 8)."""
    s = bench_ops._tiny
    f32 = torch.float32
    # attention B1 H2 N19 D16 L72: q = 2*19*16 = 608 values, k = v = 2*72*16 = 2304; QK^T + PV = 4*2*19*72*16
    att = s("class_cross_attention")[0]
    assert bench_ops._cost("class_cross_attention", att, f32, "fwd") == ((2 * 608 + 2 * 2304) * 4, 175104)
    # backward: reads q k v o do, writes dq dk dv; 2.5x the forward FLOPs
    assert bench_ops._cost("class_cross_attention", att, f32, "fwd+bwd") == ((6 * 608 + 6 * 2304) * 4, 3.5 * 175104)
    assert bench_ops._cost("class_cross_attention", att, torch.bfloat16, "fwd")[0] == (2 * 608 + 2 * 2304) * 2
    # mask_logits B1 N19 C32 9x8: features 72*32 = 2304, cls 19*32 = 608, logits 19*72 = 1368
    ml = s("mask_logits")[0]
    assert bench_ops._cost("mask_logits", ml, f32, "fwd") == ((2304 + 608 + 1368) * 4, 2 * 19 * 72 * 32)
    # backward: reads the logits' gradient, features, cls; writes both gradients
    assert bench_ops._cost("mask_logits", ml, f32, "fwd+bwd") == ((3 * 2304 + 3 * 608 + 2 * 1368) * 4, 3 * 2 * 19 * 72 * 32)
    # loss / predict B1 N19 32x32, maps 8/4/2/1: 19*(64+16+4+1) = 1615 map values, 1024 labels
    ce = s("ensemble_cross_entropy")[0]
    assert bench_ops._cost("ensemble_cross_entropy", ce, f32, "fwd") == (1615 * 4 + 1024 * 8, 0)
    # + the maps' gradients written once; nothing full-resolution
    assert bench_ops._cost("ensemble_cross_entropy", ce, f32, "fwd+bwd") == (2 * 1615 * 4 + 1024 * 8, 0)
    assert bench_ops._cost("ensemble_predict", s("ensemble_predict")[0], f32, "fwd") == (1615 * 4 + 1024 * 8, 0)


def test_every_kernel_row_carries_its_roofline():
    rows = bench_ops.run(DEVICE, [torch.float32], True, FAKE_CEILINGS, only_backends=["reference", "triton"],
                         shape_set="tiny", log=lambda line: None)
    assert {r["op"] for r in rows} == set(bench_ops.OPS)
    ran = [r for r in rows if r["status"] in ("ok", "untimed")]
    assert any(r["status"] == "ok" for r in ran)
    for r in ran:
        assert_roofline(r)
        assert (r["bytes"], r["flops"]) == bench_ops._cost(r["op"], r["params"], torch.float32, r["mode"])
    assert {r["bound"] for r in ran if r["op"] in ("ensemble_cross_entropy", "ensemble_predict")} == {"memory"}


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernel_variant_rows(monkeypatch):
    """A kernel module declaring VARIANTS + use_variant gets one triton[<variant>] row per
    non-default variant, run inside use_variant(<variant>)."""
    kern = importlib.import_module("senformer.kernels.mask_logits")
    entered = []

    @contextlib.contextmanager
    def use_variant(name):
        entered.append(name)
        yield
    monkeypatch.setattr(kern, "VARIANTS", ("current", "older"), raising=False)
    monkeypatch.setattr(kern, "use_variant", use_variant, raising=False)
    names = bench_ops.backends_for("mask_logits", DEVICE)
    assert "triton[older]" in names and "triton[current]" not in names
    rows = bench_ops.run(DEVICE, [torch.float32], True, FAKE_CEILINGS, only_ops=["mask_logits"],
                         only_backends=["triton[older]"], shape_set="tiny", log=lambda line: None)
    assert [(r["backend"], r["mode"]) for r in rows] == [("triton[older]", "fwd"), ("triton[older]", "fwd+bwd")]
    for r in rows:
        assert r["status"] in ("ok", "untimed"), r
        assert r["rel_err"] < 1e-4
        assert_roofline(r)
    assert entered and set(entered) == {"older"}


def test_e2e_roofline_arithmetic():
    import bench_e2e
    ceil = {"matmul": {"tflops": 10.0}}
    res = {"train": {"median_ms": 200.0}, "infer_images_s": 4.0}
    r = bench_e2e._roofline(res, {"train_flops": 1e12, "infer_flops": 2e11}, ceil, batch=2)
    # 1 TFLOP at 10 TFLOP/s = 100 ms of a 200 ms step; 0.2 TFLOP = 20 ms of a 2 / 4 s = 500 ms batch
    assert r["train_ideal_ms"] == pytest.approx(100.0) and r["train_pct_of_limit"] == pytest.approx(50.0)
    assert r["infer_ideal_ms"] == pytest.approx(20.0) and r["infer_pct_of_limit"] == pytest.approx(4.0)


def test_lowres_traffic_orders_the_designs():
    """The traffic count runs every design on meta tensors; the fused designs move the least and each
    charge is at least the steps' floor (so a design that skipped its kernel step would show)."""
    pytest.importorskip("triton")
    import lowres_traffic

    rows = {(r["op"], r["design"]): r for r in lowres_traffic.measure(B=2, N=19, size=64)}
    for op, plain in (("ensemble_cross_entropy fwd+bwd", "triton[torch-lowres]"),
                      ("ensemble_predict mean", "triton[torch-merge]")):
        assert rows[(op, "triton")]["gb"] < rows[(op, plain)]["gb"] < rows[(op, "reference")]["gb"]
    loss = "ensemble_cross_entropy fwd+bwd"
    assert rows[(loss, "triton")]["gb"] < rows[(loss, "triton[aten-adjoint]")]["gb"] < rows[(loss, "triton[torch-lowres]")]["gb"]
    names = [n for n, _ in rows[("ensemble_predict mean", "triton")]["top"]]
    assert set(names[:2]) == {"merge_scores (floor)", "upsampled_argmax (floor)"}
    maps = sum(2 * 19 * (64 // s) ** 2 for s in (4, 8, 16, 32)) * 2  # bf16 maps, read at least once
    assert rows[("ensemble_predict mean", "triton")]["gb"] * 1e9 > maps
