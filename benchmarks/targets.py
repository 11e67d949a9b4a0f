"""The GPU targets senformer is held to, read from a stored results JSON of ``benchmarks/run.py``: one
verdict per target (met, missed, or not measured, with the number and where it came from), and one
per kernel design pair (the default against each older ``triton[<variant>]`` design), so a GPU run
states its gaps and the loser of each pair without anyone re-reading the tables.

    python benchmarks/targets.py benchmarks/results/<file>.json

The goals are the kernels issue's (H200, bf16 unless stated). A target is judged only on rows of the
shapes it names, timed on a CUDA device; anything else is "not measured", never met.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

SDPA_PREFIX = "sdpa-"
ATTN_FWD_L = 16384  # the bandwidth target's key count (the paper's 1/4-scale map of a 512x512 input)


def on_cuda(result: dict) -> bool:
    return result.get("env", {}).get("device") == "cuda"


def _timed(result: dict, op: str, mode: str, dtype: str) -> dict:
    """{shape: {backend: row}} of the rows of (op, mode, dtype) that were timed on a CUDA device."""
    if not on_cuda(result):
        return {}
    out: dict = {}
    for r in result.get("ops") or []:
        if (r.get("op"), r.get("mode"), r.get("dtype")) == (op, mode, dtype) and r.get("median_ms"):
            out.setdefault(r["shape"], {})[r["backend"]] = r
    return out


def _verdict(name: str, goal: str, value: float | None, ok, shown: str, where: str = "") -> dict:
    met = None if value is None else bool(ok(value))
    return {"target": name, "goal": goal, "value": value, "met": met,
            "measured": shown if value is not None else "not measured", "where": where}


def _attention(result: dict) -> list[dict]:
    out = []
    copy = ((result.get("ceilings") or {}).get("bfloat16") or {}).get("copy", {}).get("gbps")
    rows = [r.get("triton") for s, r in _timed(result, "class_cross_attention", "fwd", "bfloat16").items()
            if (r.get("triton") or {}).get("params", {}).get("L") == ATTN_FWD_L]
    frac = rows[0]["gbps"] / copy if rows and rows[0] and copy else None
    out.append(_verdict("attention fwd: share of the measured copy bandwidth", ">= 70%", frac, lambda x: x >= 0.70,
                        f"{100 * (frac or 0):.0f}% ({rows[0]['gbps']:.0f} of {copy:.0f} GB/s)" if frac else "",
                        rows[0]["shape"] if frac else ""))
    for dtype, goal in (("bfloat16", 1.5), ("float32", 2.0)):
        worst = None
        for shape, by in _timed(result, "class_cross_attention", "fwd+bwd", dtype).items():
            sdpa = [r for b, r in by.items() if b.startswith(SDPA_PREFIX)]
            if "triton" not in by or not sdpa:
                continue
            best = min(sdpa, key=lambda r: r["median_ms"])
            ratio = best["median_ms"] / by["triton"]["median_ms"]
            if worst is None or ratio < worst[0]:
                worst = (ratio, shape, best["backend"])
        out.append(_verdict(f"attention fwd+bwd {dtype}: speed-up over the fastest SDPA backend", f">= {goal}x",
                            worst and worst[0], lambda x, g=goal: x >= g,
                            f"{worst[0]:.2f}x (vs {worst[2]}, the worst shape)" if worst else "",
                            worst[1] if worst else ""))
    return out


def _loss(result: dict) -> list[dict]:
    by_shape = _timed(result, "ensemble_cross_entropy", "fwd+bwd", "bfloat16")
    shape, by = next(iter(by_shape.items()), (None, {}))
    tri, ref, comp = by.get("triton"), by.get("reference"), by.get("compile")
    eager = ref["median_ms"] / tri["median_ms"] if tri and ref else None
    vs_compile = comp["median_ms"] / tri["median_ms"] if tri and comp else None
    mem = (tri["peak_mib"] / ref["peak_mib"] if tri and ref and tri.get("peak_mib") is not None
           and ref.get("peak_mib") else None)
    where = shape or ""
    return [
        _verdict("ensemble CE fwd+bwd: speed-up over the eager reference", ">= 20x", eager, lambda x: x >= 20,
                 f"{eager:.1f}x" if eager else "", where),
        _verdict("ensemble CE fwd+bwd: speed-up over torch.compile of the reference", "> 1x", vs_compile, lambda x: x > 1,
                 f"{vs_compile:.2f}x" if vs_compile else "", where),
        _verdict("ensemble CE fwd+bwd: peak extra memory / eager's", "<= 1/20", mem, lambda x: x <= 0.05,
                 f"1/{1 / mem:.0f} ({tri['peak_mib']:.0f} vs {ref['peak_mib']:.0f} MiB)" if mem else "", where),
    ]


def _train_step(result: dict) -> list[dict]:
    rows = {r["variant"]: r for r in (result.get("e2e") or [] if on_cuda(result) else [])
            if r.get("status") == "ok"
            and (r.get("preset"), r.get("dtype"), r.get("size"), r.get("batch"), r.get("group", "base"))
            == ("senformer_r50", "bfloat16", 512, 8, "base")}
    fused, ref = rows.get("fused"), rows.get("reference")
    speed = fused["train_images_s"] / ref["train_images_s"] if fused and ref else None
    mem = (fused["train_peak_mib"] / ref["train_peak_mib"]
           if fused and ref and fused.get("train_peak_mib") and ref.get("train_peak_mib") else None)
    where = "senformer_r50 512x512 B8 bf16"
    return [
        _verdict("R50 train step: images/s over the reference path's", ">= 1.5x", speed, lambda x: x >= 1.5,
                 f"{speed:.2f}x ({fused['train_images_s']:.1f} vs {ref['train_images_s']:.1f} img/s)" if speed else "",
                 where),
        _verdict("R50 train step: peak memory / the reference path's", "<= 0.6x", mem, lambda x: x <= 0.6,
                 f"{mem:.2f}x" if mem else "", where),
    ]


def scorecard(result: dict) -> list[dict]:
    """Every GPU target: {target, goal, value, met (True / False / None = not measured), measured, where}."""
    return _attention(result) + _loss(result) + _train_step(result)


def designs(result: dict) -> list[dict]:
    """For each (op, older design): in how many timed cases the default ``triton`` row was faster, and
    the geometric mean of (older / default) time. ``loser`` names the design to delete, or None while
    the cases disagree or none was timed."""
    pairs: dict = {}
    for r in result.get("ops") or []:
        b = r.get("backend", "")
        if b.startswith("triton[") and r.get("median_ms"):
            pairs.setdefault((r["op"], b[len("triton["):-1]), []).append(r)
    defaults = {(r["op"], r["shape"], r["dtype"], r["mode"]): r for r in result.get("ops") or []
                if r.get("backend") == "triton" and r.get("median_ms")}
    out = []
    for (op, variant), rows in sorted(pairs.items()):
        ratios = [r["median_ms"] / d["median_ms"] for r in rows
                  if (d := defaults.get((op, r["shape"], r["dtype"], r["mode"])))]
        wins = sum(x > 1 for x in ratios)
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else None
        loser = None
        if ratios and wins == len(ratios):
            loser = variant
        elif ratios and wins == 0:
            loser = "default"
        out.append({"op": op, "variant": variant, "cases": len(ratios), "default_faster": wins,
                    "geomean_variant_over_default": geo, "loser": loser})
    return out


def _mark(met) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[met]


def lines(result: dict) -> list[str]:
    """Plain text: one line per target, then one per design pair."""
    out = [f"target {v['target']} {v['goal']}: {_mark(v['met'])}"
           + (f", {v['measured']}" if v["met"] is not None else "") + (f" [{v['where']}]" if v["where"] else "")
           for v in scorecard(result)]
    for d in designs(result):
        geo = d["geomean_variant_over_default"]
        verdict = (f"delete {d['variant']}" if d["loser"] == d["variant"] else
                   "the default is slower in every case" if d["loser"] == "default" else "no clear loser")
        out.append(f"design {d['op']}: default faster than {d['variant']} in {d['default_faster']}/{d['cases']} "
                   f"timed cases" + (f", {d['variant']}/default time geomean {geo:.2f}" if geo else "")
                   + f": {verdict}")
    return out


def markdown(result: dict) -> str:
    rows = ["| target | goal | verdict | measured | where |", "|---|---|---|---|---|"]
    rows += [f"| {v['target']} | {v['goal']} | {_mark(v['met'])} | {v['measured'] if v['met'] is not None else '-'} "
             f"| {v['where'] or '-'} |" for v in scorecard(result)]
    pairs = designs(result)
    if pairs:
        rows += ["", "| op | older design | default faster in | older / default time (geomean) | loser |",
                 "|---|---|---|---|---|"]
        rows += [f"| {d['op']} | {d['variant']} | {d['default_faster']} of {d['cases']} | "
                 f"{'-' if d['geomean_variant_over_default'] is None else format(d['geomean_variant_over_default'], '.2f')}"
                 f" | {d['loser'] or '-'} |" for d in pairs]
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/targets.py RESULTS.json", file=sys.stderr)
        return 2
    print("\n".join(lines(json.loads(Path(argv[0]).read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
