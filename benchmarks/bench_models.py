"""Model table: params and FLOPs of every paper preset beside the paper's figures (``senformer.flops``).

Each SenFormer row is counted with ``cache_kv`` off (the paper's recompute-K/V path, what its
figures count) and on (our default); both in mmcv's convention (module MACs, the paper's "FLOPs")
and in full (every matmul, attention included, from ``FlopCounterMode``). Counting runs on the
meta device, so it costs seconds and no memory whatever the host.
"""
from __future__ import annotations

import time

# --quick keeps one row per backbone family the end-to-end section also runs
QUICK_ROWS = ("SenFormer R50", "SenFormer Swin-T")


def run(quick: bool, presets=None, log=print) -> list[dict]:
    try:
        from senformer import flops
        rows = list(flops.PAPER_ROWS)
    except Exception as e:  # the flops module or the zoo is missing from this checkout
        log(f"  models skipped: {type(e).__name__}: {e}")
        return [{"status": "skipped", "note": f"senformer.flops unavailable: {type(e).__name__}: {e}"}]
    if presets:
        rows = [r for r in rows if r["preset"] in presets]
    elif quick:
        rows = [r for r in rows if r["name"] in QUICK_ROWS]
    out = []
    for row in rows:
        t0 = time.perf_counter()
        try:
            r = flops.paper_table([row])[0]
            if r["flops_mmcv_cache_kv"] is not None:
                shape = (1, 3, row["size"], row["size"])
                cached = flops.build_meta(row["preset"], **{**row["overrides"], "cache_kv": True})
                r["flops_full_cache_kv"] = flops.flops_full(cached, shape)
            else:
                r["flops_full_cache_kv"] = None
            r["status"] = "ok"
        except Exception as e:  # one preset that does not build must not hide the others
            r = {"name": row["name"], "preset": row["preset"], "status": "error",
                 "note": f"{type(e).__name__}: {str(e).strip()[:200]}"}
        r["seconds"] = round(time.perf_counter() - t0, 2)
        out.append(r)
        log(_line(r))
    return out


def _g(x):
    return "-" if x is None else f"{x / 1e9:.1f}"


def _line(r: dict) -> str:
    if r["status"] != "ok":
        return f"  {r['name']:<32} {r['status']}: {r.get('note', '')}"
    return (f"  {r['name']:<32} params {r['params_with_aux'] / 1e6:6.1f}M (paper {r['paper_params_m']}M)  "
            f"MACs {_g(r['flops_mmcv'])}G (paper {r['paper_flops_g']}G), cache_kv {_g(r['flops_mmcv_cache_kv'])}G  "
            f"full {_g(r['flops_full'])}G / cache_kv {_g(r.get('flops_full_cache_kv'))}G")
