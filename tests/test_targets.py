"""benchmarks/targets.py: the verdicts a GPU run's results JSON gets, on made-up results whose every
ratio is known, so that a wrong row, ratio or threshold shows."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402
import report  # noqa: E402
import targets  # noqa: E402

ATT = "B8 H8 N150 L{} D64"
CE = "B8 N150 512x512 maps 128/64/32/16"


def _op(op, shape, dtype, mode, backend, ms, **kw):
    return {"op": op, "shape": shape, "dtype": dtype, "mode": mode, "backend": backend, "status": "ok",
            "median_ms": ms, "p20_ms": ms, "p80_ms": ms, **kw}


def _result() -> dict:
    """Attention fwd at L=16384 moves 271 MB in 0.1 ms = 2710 GB/s of a 4000 GB/s copy (68%); fwd+bwd
    beats the fastest SDPA by 2.0x (bf16, worst shape) and 2.5x (fp32); the loss is 25x eager, 1.25x
    compile at 1/25 of eager's memory; the R50 step 1.6x at 0.5x memory."""
    ops = []
    for L, fwd_ms in ((1024, 0.01), (16384, 0.1)):
        ops.append(_op("class_cross_attention", ATT.format(L), "bfloat16", "fwd", "triton", fwd_ms,
                       params={"B": 8, "H": 8, "N": 150, "D": 64, "L": L}, gbps=271e6 / (fwd_ms * 1e6) * L / 16384))
        ops.append(_op("class_cross_attention", ATT.format(L), "bfloat16", "fwd", "triton[legacy]", 2 * fwd_ms))
    for dtype, ratios in (("bfloat16", (2.0, 3.0)), ("float32", (2.5, 4.0))):
        for L, ratio in zip((1024, 16384), ratios):
            ops += [_op("class_cross_attention", ATT.format(L), dtype, "fwd+bwd", "triton", 1.0),
                    _op("class_cross_attention", ATT.format(L), dtype, "fwd+bwd", "sdpa-flash", ratio),
                    _op("class_cross_attention", ATT.format(L), dtype, "fwd+bwd", "sdpa-cudnn", ratio + 1),
                    _op("class_cross_attention", ATT.format(L), dtype, "fwd+bwd", "triton[legacy]", 1.5)]
    ops += [_op("ensemble_cross_entropy", CE, "bfloat16", "fwd+bwd", "reference", 25.0, peak_mib=2500.0),
            _op("ensemble_cross_entropy", CE, "bfloat16", "fwd+bwd", "compile", 1.25, peak_mib=900.0),
            _op("ensemble_cross_entropy", CE, "bfloat16", "fwd+bwd", "triton", 1.0, peak_mib=100.0),
            _op("ensemble_cross_entropy", CE, "bfloat16", "fwd+bwd", "triton[scatter]", 0.8, peak_mib=100.0),
            _op("ensemble_cross_entropy", CE, "bfloat16", "fwd", "triton", 0.3),
            _op("ensemble_cross_entropy", CE, "bfloat16", "fwd", "triton[scatter]", 0.3 * 1.1)]
    e2e = [{"preset": "senformer_r50", "variant": v, "dtype": "bfloat16", "size": 512, "batch": 8, "group": "base",
            "num_classes": 150, "status": "ok", "train_images_s": s, "train_peak_mib": m, "infer_images_s": 1.0, "infer_peak_mib": 1.0}
           for v, s, m in (("fused", 48.0, 10000.0), ("reference", 30.0, 20000.0))]
    return {"schema": 1, "env": {"device": "cuda", "device_name": "H200"},
            "ceilings": {"bfloat16": {"copy": {"gbps": 4000.0}, "matmul": {"n": 8192, "dtype": "bfloat16", "tflops": 790.0}}},
            "ops": ops, "e2e": e2e}


def _by_target(result) -> dict:
    return {v["target"]: v for v in targets.scorecard(result)}


def test_every_target_is_judged_on_its_rows():
    v = _by_target(_result())
    assert len(v) == 8
    bw = v["attention fwd: share of the measured copy bandwidth"]
    assert bw["value"] == pytest.approx(2710 / 4000) and bw["met"] is False and "L16384" in bw["where"]
    bf = v["attention fwd+bwd bfloat16: speed-up over the fastest SDPA backend"]
    assert bf["value"] == pytest.approx(2.0) and bf["met"] is True and "sdpa-flash" in bf["measured"]
    assert "L1024" in bf["where"]  # the worst shape, not the last one
    assert v["attention fwd+bwd float32: speed-up over the fastest SDPA backend"]["value"] == pytest.approx(2.5)
    assert v["ensemble CE fwd+bwd: speed-up over the eager reference"]["value"] == pytest.approx(25.0)
    assert v["ensemble CE fwd+bwd: speed-up over torch.compile of the reference"]["value"] == pytest.approx(1.25)
    mem = v["ensemble CE fwd+bwd: peak extra memory / eager's"]
    assert mem["value"] == pytest.approx(0.04) and mem["met"] is True and "1/25" in mem["measured"]
    assert v["R50 train step: images/s over the reference path's"]["value"] == pytest.approx(1.6)
    assert v["R50 train step: peak memory / the reference path's"]["value"] == pytest.approx(0.5)
    assert sum(x["met"] is True for x in v.values()) == 7


@pytest.mark.parametrize("change,target,met", [
    (lambda r: r["ceilings"]["bfloat16"]["copy"].update(gbps=3800.0), "attention fwd: share of the measured copy bandwidth", True),
    (lambda r: r["ops"][5].update(median_ms=1.4), "attention fwd+bwd bfloat16: speed-up over the fastest SDPA backend", False),
    (lambda r: r["ops"][-6].update(median_ms=19.0), "ensemble CE fwd+bwd: speed-up over the eager reference", False),
    (lambda r: r["ops"][-5].update(median_ms=0.9), "ensemble CE fwd+bwd: speed-up over torch.compile of the reference", False),
    (lambda r: r["e2e"][0].update(train_peak_mib=13000.0), "R50 train step: peak memory / the reference path's", False),
])
def test_thresholds_flip(change, target, met):
    r = copy.deepcopy(_result())
    change(r)
    assert _by_target(r)[target]["met"] is met


def test_nothing_is_met_off_a_gpu_or_off_its_shapes():
    cpu = {**_result(), "env": {"device": "cpu"}}
    assert all(v["met"] is None and v["measured"] == "not measured" for v in targets.scorecard(cpu))
    r = _result()
    r["e2e"] = [{**e, "size": 256} for e in r["e2e"]]
    r["ops"] = [o for o in r["ops"] if o["backend"] != "compile"]
    v = _by_target(r)
    assert v["R50 train step: images/s over the reference path's"]["met"] is None
    assert v["ensemble CE fwd+bwd: speed-up over torch.compile of the reference"]["met"] is None


def test_design_pairs_name_the_loser():
    d = {x["op"]: x for x in targets.designs(_result())}
    att = d["class_cross_attention"]
    assert (att["variant"], att["cases"], att["default_faster"], att["loser"]) == ("legacy", 6, 6, "legacy")
    ce = d["ensemble_cross_entropy"]  # scatter faster fwd+bwd, slower fwd: no verdict
    assert (ce["cases"], ce["default_faster"], ce["loser"]) == (2, 1, None)
    assert ce["geomean_variant_over_default"] == pytest.approx((0.8 * 1.1) ** 0.5)


def test_report_and_digest_carry_the_verdicts(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_result()))
    md = report.markdown(_result())
    assert "### Targets" in md and "| R50 train step: images/s over the reference path's | >= 1.5x | met | 1.60x" in md
    assert "| class_cross_attention | legacy | 6 of 6 |" in md
    assert "### Targets" not in report.markdown({**_result(), "env": {"device": "cpu"}})
    assert gpu_suite.digest(str(path)) == 0
    out = capsys.readouterr().out.splitlines()
    first = next(i for i, line in enumerate(out) if "target " in line)
    assert "MISSED, 68%" in out[first] and first < 3  # before the kernel rows: the digest is cut at 60 lines
    assert any("design class_cross_attention" in line and "delete legacy" in line for line in out)
