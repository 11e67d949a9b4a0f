"""Where senformer stands: one command for the model, kernel and end-to-end tables.

    python benchmarks/run.py                 # everything, on CUDA if there is one
    python benchmarks/run.py --quick         # CI-sized (a few minutes on a CPU)
    python benchmarks/run.py --only ops --dtype bf16,fp32 --backends reference,triton
    python benchmarks/run.py --only class_cross_attention,models
    python benchmarks/run.py --only e2e,senformer_r50 --e2e-variants fused,reference --no-e2e-scaling --time-budget 60

Writes ``benchmarks/results/<device>-<date>[-quick].json`` (a later run with ``--only`` on the same
day replaces just the sections it ran), the markdown table beside it and PNG plots drawn from the
JSON (``report.py``; matplotlib when importable), and prints the markdown. The JSON is rewritten
after every kernel row and end-to-end case, so a run that is stopped keeps what it measured
(``run_<section>.complete`` says whether a section finished; ``report.py`` renders any of them).
The kernel and end-to-end sections measure the ceilings (copy bandwidth, matmul rate) in the same
run: every row's roofline (ideal time, % of that limit) is drawn on them.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # run from a checkout without `pip install -e .`

SECTIONS = ("ceilings", "models", "ops", "e2e")
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
SCHEMA = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized shapes and repetitions")
    p.add_argument("--only", default="",
                   help="comma list of sections (" + ", ".join(SECTIONS) + "), op names (implies ops) "
                        "or model presets (implies models and e2e)")
    p.add_argument("--backends", default="", help="comma list of kernel backends to run (default: all)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="comma list of fp32, bf16, fp16 (default: bf16,fp32 on CUDA, fp32 on CPU)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON, markdown and plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--shapes", default="auto", choices=("auto", "quick", "full", "tiny"),
                   help="kernel shape set: auto (quick with --quick, else full), quick, full, or tiny (smoke test)")
    p.add_argument("--compile-ops", default="",
                   help="comma list of ops whose torch.compile row runs (default: all; 'none' for none)")
    p.add_argument("--e2e-variants", default="", help="comma list of fused, reference, compile (default: all)")
    p.add_argument("--e2e-batch", type=int, default=None, help="end-to-end batch (default: 8 on CUDA, 2 on CPU)")
    p.add_argument("--e2e-size", type=int, default=None, help="end-to-end base input side (default: 512; 64 with --quick on CPU)")
    p.add_argument("--no-e2e-scaling", action="store_true", help="end to end: base cases only, no size/class scaling")
    p.add_argument("--e2e-reps", type=int, default=None, help="end to end: timed training steps (default: 20 on CUDA)")
    p.add_argument("--e2e-images", type=int, default=None, help="end to end: inference images (default: 200 on CUDA)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: rows not started by then are recorded as skipped (the run still writes its files)")
    return p.parse_args(argv)


def _split_only(only: str):
    """Sections, op names and presets named by --only; an op name alone implies the kernel
    section, a preset alone the model and end-to-end sections."""
    from bench_ops import OPS
    sections, ops, presets = set(), set(), set()
    for tok in filter(None, (t.strip() for t in only.split(","))):
        if tok in SECTIONS:
            sections.add(tok)
        elif tok in OPS:
            ops.add(tok)
        else:
            presets.add(tok)
    if not sections:
        sections = ({"ops"} if ops else set()) | ({"models", "e2e"} if presets else set()) or set(SECTIONS)
    if sections & {"ops", "e2e"}:
        sections.add("ceilings")  # the rooflines of the kernel and end-to-end rows are drawn on them
    return sections, ops, presets


def _device_slug(device) -> str:
    import torch
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-" + (_cpu_model() or platform.machine())
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


def _cpu_model() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(device, args, dtypes) -> dict:
    import torch

    import senformer
    import senformer.ops as sops
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("SENFORMER_COMMIT") or None  # a copy without .git (the GPU suite passes it)
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "senformer": senformer.__version__, "commit": commit,
        "extension_loaded": sops.extension_loaded(), "cpu_isa": sops.extension_cpu_isa(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "quick": bool(args.quick), "dtypes": dtypes, "argv": sys.argv[1:],
    }
    try:
        import bench_ops
        env["auto_backends"] = bench_ops.auto_backends(device)
    except Exception as e:  # informative only; never stop a run for it
        env["auto_backends"] = f"unknown ({type(e).__name__}: {e})"
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]  # a shared host slows every figure
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    want = args.device or ("cuda" if _cuda_available() else "cpu")
    if want.startswith("cpu"):
        # On CPU the Triton backend can only run interpreted; it must be set before kernels import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sections, only_ops, presets = _split_only(args.only)
    import torch

    import report
    device = torch.device(want)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("run.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = [t.strip() for t in (args.dtype or ("bf16,fp32" if device.type == "cuda" else "fp32")).split(",") if t.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad:
        print(f"run.py: --dtype {','.join(bad)} not one of {sorted(set(DTYPES))}", file=sys.stderr)
        return 2
    dtypes = [getattr(torch, DTYPES[n]) for n in names]
    backends = _list(args.backends) or None
    compile_ops = _list(args.compile_ops)
    compile_ops = None if not compile_ops else [] if compile_ops == ["none"] else compile_ops
    variants = _list(args.e2e_variants) or None
    bad = [v for v in variants or [] if v not in ("fused", "reference", "compile")]
    if bad:
        print(f"run.py: --e2e-variants {','.join(bad)} not one of fused, reference, compile", file=sys.stderr)
        return 2
    # the order ops are named in --only is the order they run in (what a time budget cuts last)
    op_order = [t for t in _list(args.only) if t in (only_ops or ())] or (only_ops or None)
    t_start = time.monotonic()
    deadline = None if args.time_budget is None else t_start + args.time_budget

    result = {"schema": SCHEMA, "env": environment(device, args, [DTYPES[n] for n in names])}
    result["env"]["time_budget_s"] = args.time_budget
    print(f"# senformer benchmarks on {result['env']['device_name']} ({device}), torch {result['env']['torch']}, "
          f"triton {result['env']['triton']}, {'quick' if args.quick else 'full'}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{_device_slug(device)}-{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}" + ("-quick" if args.quick else "")
    path = out / f"{stem}.json"

    def save(section=None, rows=None, complete=False):
        """Rewrite the JSON with what this run has so far (atomically: a kill never leaves half a file)."""
        if section is not None:
            if rows is not None:
                result[section] = list(rows)
            result[f"run_{section}"] = {"date": result["env"]["date"], "commit": result["env"]["commit"],
                                        "argv": sys.argv[1:], "complete": complete,
                                        "seconds": round(time.monotonic() - t_section, 1)}
        merged = _merge(path, result, sections)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(merged, indent=1, default=str) + "\n")
        os.replace(tmp, path)

    t0 = time.time()
    if "ceilings" in sections:
        import ceilings
        print("## ceilings", flush=True)
        t_section = time.monotonic()
        result["ceilings"] = {str(d).replace("torch.", ""): ceilings.measure(device, d, args.quick) for d in dtypes}
        for d, c in result["ceilings"].items():
            print(f"  {d}: copy {c['copy']['gbps']:.1f} GB/s, matmul {c['matmul']['tflops']:.3f} TFLOP/s", flush=True)
        save("ceilings", complete=True)
    if "models" in sections:
        import bench_models
        print("## models", flush=True)
        t_section = time.monotonic()
        result["models"] = bench_models.run(quick=args.quick, presets=presets or None, log=_log)
        save("models", complete=True)
    if "ops" in sections:
        import bench_ops
        print("## ops", flush=True)
        t_section = time.monotonic()
        rows: list = []
        for d in dtypes:
            ceil = result.get("ceilings", {}).get(str(d).replace("torch.", ""))
            done = list(rows)
            rows += bench_ops.run(device, [d], args.quick, ceil, only_ops=op_order,
                                  only_backends=backends, log=_log, shape_set=args.shapes,
                                  compile_ops=compile_ops, deadline=deadline,
                                  progress=lambda r, done=done: save("ops", done + r))
        save("ops", rows, complete=not _cut(rows))
    if "e2e" in sections:
        import bench_e2e
        print("## end to end", flush=True)
        t_section = time.monotonic()
        preset_order = [t for t in _list(args.only) if t in presets] or None  # run in the order named
        rows = bench_e2e.run(device, dtypes[0], args.quick, presets=preset_order, log=_log,
                             variants=variants, batch=args.e2e_batch, size=args.e2e_size,
                             scaling=not args.no_e2e_scaling, deadline=deadline,
                             progress=lambda r: save("e2e", r), reps=args.e2e_reps, n_infer=args.e2e_images,
                             ceilings=result["ceilings"][str(dtypes[0]).replace("torch.", "")])
        save("e2e", rows, complete=not _cut(rows))
    result["env"]["seconds"] = round(time.time() - t0, 1)
    if hasattr(os, "getloadavg"):
        result["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    save()
    md = report.write_markdown(path)
    pngs = [] if args.no_plots else report.plot(path)
    print()
    print(md.read_text())
    print(f"wrote {path}, {md}" + "".join(f", {p}" for p in pngs))
    return 0


def _merge(path: Path, new: dict, sections: set) -> dict:
    """Keep the sections of an earlier run of the same device and day that this run did not redo."""
    if not path.exists():
        return new
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return new
    if old.get("schema") != SCHEMA:
        return new
    merged = dict(old)
    merged.update({k: v for k, v in new.items() if k in sections or k not in SECTIONS})
    if "ceilings" in new and isinstance(old.get("ceilings"), dict):
        # per dtype: a run of one dtype (the GPU suite's e2e stage) keeps the other dtypes' ceilings,
        # which the earlier kernel rows were drawn on
        merged["ceilings"] = {**old["ceilings"], **new["ceilings"]}
    return merged


def _log(line: str):
    print(line, flush=True)


def _list(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _cut(rows) -> bool:
    """Whether the time budget left rows of a section unrun."""
    return any(r.get("note") == "time budget spent" for r in rows)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
