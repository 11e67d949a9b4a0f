"""The Python half of ``benchmarks/gpu_suite.sh``: the checks that are easier in Python than in bash.

    python3 benchmarks/gpu_suite.py env --json env.json    # print the environment, write it as JSON
    python3 benchmarks/gpu_suite.py cuda-home              # the CUDA toolkit setup.py would use ('' if none)
    python3 benchmarks/gpu_suite.py commit                 # the commit under test ('' if unknown)
    python3 benchmarks/gpu_suite.py check-ext [--require-cuda]   # senformer._C loaded (with CUDA kernels)?
    python3 benchmarks/gpu_suite.py bench-check RESULTS.json SECTION   # rows that errored fail the stage
    python3 benchmarks/gpu_suite.py digest RESULTS.json    # a screenful of the results (the suite's last output)
    python3 benchmarks/gpu_suite.py merge-junit OUT.xml IN.xml...      # one JUnit file for all test stages
    python3 benchmarks/gpu_suite.py list-files DIR         # what the caller gets back (at most 8 files)

Every environment probe is guarded: a machine without nvidia-smi, nvcc, git or a GPU gets 'absent'
(or the error) in that field, never a failure. ``env`` does not import senformer: it runs before
the build.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from build_ext_config import detect_cuda_home  # noqa: E402  (no torch import)
from run import _cpu_model  # noqa: E402  (run.py imports torch lazily)
import targets  # noqa: E402
ABSENT = "absent"


def _run(cmd: list[str], timeout: float = 20.0) -> str | None:
    """stdout of ``cmd`` (stripped), or None when it is missing, fails or hangs."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def cuda_home() -> str | None:
    """The toolkit setup.py builds with (csrc/build_ext_config.py's ``detect_cuda_home``)."""
    return detect_cuda_home()


def commit() -> dict:
    """$SENFORMER_COMMIT (a copy of the tree without .git) wins; else git, with a dirty flag."""
    env = os.environ.get("SENFORMER_COMMIT")
    sha = _run(["git", "rev-parse", "--short", "HEAD"]) if (ROOT / ".git").exists() else None
    dirty = None
    if sha:
        status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        dirty = bool(status) if status is not None else None
    source = "git" if sha and (not env or env == sha) else ("SENFORMER_COMMIT" if env else None)
    return {"commit": env or sha, "commit_source": source,
            "git_commit": sha, "git_dirty": dirty}


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "present"))
    except Exception as e:  # importable in name only (a broken install): say so
        return f"error: {type(e).__name__}: {e}"[:200]


def _meminfo_gib(key: str) -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def nvidia_smi() -> dict:
    fields = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,pstate,temperature.gpu,compute_mode"
    out = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    if out is None:
        return {"nvidia_smi": ABSENT}
    gpus = [dict(zip(fields.split(","), (v.strip() for v in line.split(",")))) for line in out.splitlines()]
    return {"nvidia_smi": gpus, "driver": gpus[0].get("driver_version") if gpus else None}


def nvcc(home: str | None) -> str:
    exe = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    out = _run([exe, "--version"], timeout=60) if exe else None
    if not out:
        return ABSENT
    release = [line for line in out.splitlines() if "release" in line]
    return (release[-1].strip() if release else out.splitlines()[-1]) + f" ({exe})"


def torch_info() -> dict:
    try:
        import torch
    except Exception as e:
        return {"torch": f"error: {type(e).__name__}: {e}"[:200]}
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        try:
            p = torch.cuda.get_device_properties(0)
            info.update(gpu_count=torch.cuda.device_count(), gpu=p.name, capability=f"{p.major}.{p.minor}",
                        sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                        l2_cache_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None,
                        tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
        except Exception as e:  # a broken driver: record it, keep going
            info["gpu"] = f"error: {type(e).__name__}: {e}"[:200]
    return info


def collect() -> dict:
    home = cuda_home()
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        **commit(),
        "python": platform.python_version(), "python_executable": sys.executable,
        "machine": platform.machine(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": _meminfo_gib("MemTotal"), "mem_available_gib": _meminfo_gib("MemAvailable"),
        **torch_info(),
        "triton": _version("triton"), "numpy": _version("numpy"), "xformers": _version("xformers"),
        **nvidia_smi(),
        "cuda_home": home or ABSENT, "nvcc": nvcc(home),
        "ninja": shutil.which("ninja") or ("python module" if importlib.util.find_spec("ninja") else ABSENT),
        "cmake": shutil.which("cmake") or ABSENT,
        "pytest": _version("pytest"), "pytest_xdist": _version("xdist"), "pytest_timeout": _version("pytest_timeout"),
        "matplotlib": _version("matplotlib"),
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CUDA_HOME",
                                               "SENFORMER_BACKEND", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")},
    }
    return env


def check_ext(require_cuda: bool) -> int:
    """senformer._C must load; on a GPU run it must also hold CUDA kernels (the build asked for them)."""
    import torch

    import senformer.ops as sops
    from senformer.ops import _dispatch
    loaded = sops.extension_loaded()
    print(f"senformer._C loaded: {loaded}; torch.cuda.is_available(): {torch.cuda.is_available()}")
    ops = ("class_cross_attention", "mask_logits", "ensemble_cross_entropy", "ensemble_predict")
    for op in ops:
        print(f"  {op:<24} cpu kernel: {_dispatch.extension_has(op, 'cpu')!s:<5}  "
              f"cuda kernel: {_dispatch.extension_has(op, 'cuda')}")
    ok = loaded
    if not loaded:
        print("FAIL: senformer._C is not importable (was the extension built?)")
    if require_cuda:
        if not torch.cuda.is_available():
            print("FAIL: torch sees no CUDA device")
            ok = False
        if not _dispatch.extension_has("ensemble_cross_entropy", "cuda"):
            print("FAIL: senformer._C has no CUDA kernel for ensemble_cross_entropy (built without CUDA?)")
            ok = False
    return 0 if ok else 1


# rows of these backends that error are the project's bugs; an SDPA backend or xformers refusing
# an input is torch's business and only reported
OWN_BACKENDS = ("reference", "compile", "triton", "cuda", "cpu")


def bench_check(path: str, section: str) -> int:
    """Status counts of one section of a results JSON; non-zero when it is missing or our rows errored."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        print(f"FAIL: cannot read {path}: {e}")
        return 4
    rows = result.get(section)
    if not rows:
        print(f"FAIL: no '{section}' rows in {path}")
        return 4
    counts: dict = {}
    for r in rows:
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
    run = result.get(f"run_{section}", {})
    print(f"{section}: {len(rows)} rows, " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=str))
          + (", cut by the time budget" if run.get("complete") is False else ""))
    # "triton[<variant>]" rows are an older design of our own kernel
    bad = [r for r in rows if r.get("status") == "error"
           and r.get("backend", "e2e").split("[")[0] in OWN_BACKENDS + ("e2e",)]
    for r in rows:
        if r.get("status") == "error":
            what = " ".join(str(r.get(k)) for k in ("op", "preset", "backend", "variant", "dtype", "mode", "shape")
                            if r.get(k) is not None)
            print(f"  error: {what}: {r.get('note')}")
    if bad:
        print(f"FAIL: {len(bad)} rows of senformer's own backends errored")
        return 3
    return 0


def digest(path: str) -> int:
    """A screenful of a results JSON for the end of the suite's output (the caller of a device run
    sees only the last 12,000 characters): ceilings, the verdict on every target and design pair
    (``targets.py``), one line per kernel case with its ideal time
    (roofline) and every backend's median time, speedup over the eager reference and % of that
    limit, one line per end-to-end case with its % of the matmul limit."""
    result = json.loads(Path(path).read_text())
    env = result.get("env", {})
    print(f"results {Path(path).name}: {env.get('device_name')}, torch {env.get('torch')}, triton {env.get('triton')}, "
          f"commit {env.get('commit')}, {env.get('date')}")
    for d, c in (result.get("ceilings") or {}).items():
        print(f"  ceiling {d}: copy {c['copy']['gbps']:.0f} GB/s, matmul {c['matmul']['tflops']:.1f} TFLOP/s")
    for line in targets.lines(result):  # first: the caller sees only the digest's first 60 lines
        print("  " + line)
    groups: dict = {}
    for r in result.get("ops") or []:
        groups.setdefault((r["op"], r["dtype"], r["mode"], r["shape"]), []).append(r)
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    for (op, dtype, mode, shape), rows in groups.items():
        cells = []
        for r in rows:
            if r.get("median_ms") is not None:
                sp = r.get("speedup_vs_reference")
                cells.append(f"{r['backend']} {r['median_ms']:.3g}" + (f" x{sp:.2f}" if sp and r["backend"] != "reference" else "")
                             + (f" {r['pct_of_limit']:.3g}%" if r.get("pct_of_limit") is not None else ""))
            elif r.get("status") == "untimed":
                cells.append(f"{r['backend']} untimed")
            elif r.get("status") == "error":
                cells.append(f"{r['backend']} ERROR")
        budget = sum(r.get("note") == "time budget spent" for r in rows)
        if budget:
            cells.append(f"{budget} rows cut by the time budget")
        ideal = next((r for r in rows if r.get("ideal_ms") is not None), None)
        limit = f"; ideal {ideal['ideal_ms']:.3g} {ideal['bound']}-bound" if ideal else ""
        if cells:
            print(f"  {op} {short.get(dtype, dtype)} {mode} {shape} (ms{limit}): " + ", ".join(cells))
    for r in result.get("e2e") or []:
        head = f"  e2e {r.get('preset')} {r.get('variant')} {r.get('size')}px B{r.get('batch')}"
        if r.get("status") != "ok":
            print(f"{head}: {r.get('status')}: {r.get('note', '')}"[:200])
        else:
            pct = lambda k: f" ({r[k]:.0f}% of limit)" if r.get(k) is not None else ""  # noqa: E731
            print(f"{head} {r.get('dtype')}: train {r['train_images_s']:.1f} img/s{pct('train_pct_of_limit')} "
                  f"{r['train_peak_mib'] or 0:.0f} MiB, infer {r['infer_images_s']:.1f} img/s{pct('infer_pct_of_limit')}, "
                  f"first step {r.get('first_step_s', 0):.1f} s")
    return 0


def merge_junit(out: str, inputs: list[str]) -> int:
    """One <testsuites> file from the JUnit files of several pytest runs (those that exist)."""
    import xml.etree.ElementTree as ET
    root = ET.Element("testsuites")
    for path in inputs:
        try:
            tree = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            continue
        suites = [tree] if tree.tag == "testsuite" else list(tree)
        for suite in suites:
            suite.set("name", f"{Path(path).stem}")
            root.append(suite)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)
    return 0


def list_files(folder: str) -> int:
    """What comes back to the caller of a device run: at most 8 files, 16 MiB each."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    for f in files:
        size = f.stat().st_size
        print(f"  {f.relative_to(folder)}  {size / 2**20:.2f} MiB" + ("  (over 16 MiB!)" if size > 16 * 2**20 else ""))
    print(f"  {len(files)} files" + ("  (more than 8: some will not come back)" if len(files) > 8 else ""))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="print the environment").add_argument("--json", help="also write it here as JSON")
    sub.add_parser("cuda-home", help="print the CUDA toolkit directory")
    sub.add_parser("commit", help="print the commit under test")
    sub.add_parser("check-ext", help="senformer._C loaded?").add_argument("--require-cuda", action="store_true")
    b = sub.add_parser("bench-check", help="check one section of a results JSON")
    b.add_argument("json")
    b.add_argument("section")
    sub.add_parser("digest", help="a screenful of a results JSON").add_argument("json")
    m = sub.add_parser("merge-junit", help="merge JUnit XML files")
    m.add_argument("out")
    m.add_argument("inputs", nargs="*")
    sub.add_parser("list-files", help="list a folder's files").add_argument("folder")
    args = p.parse_args(argv)
    if args.cmd == "cuda-home":
        print(cuda_home() or "")
        return 0
    if args.cmd == "commit":
        print(commit()["commit"] or "")
        return 0
    if args.cmd == "check-ext":
        return check_ext(args.require_cuda)
    if args.cmd == "bench-check":
        return bench_check(args.json, args.section)
    if args.cmd == "digest":
        return digest(args.json)
    if args.cmd == "merge-junit":
        return merge_junit(args.out, args.inputs)
    if args.cmd == "list-files":
        return list_files(args.folder)
    env = collect()
    width = max(len(k) for k in env)
    for k, v in env.items():
        print(f"{k:<{width}}  {v if v is not None else '-'}")
    if args.json:
        Path(args.json).write_text(json.dumps(env, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
