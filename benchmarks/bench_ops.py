"""Kernel table: every op x backend at the paper's shapes (reduced on CPU), fwd and fwd+bwd.

Backends: ``reference`` (eager plain torch, through ``senformer.ops`` with the reference backend),
``compile`` (``torch.compile`` of the reference), ``triton``, ``cpu``/``cuda`` (``senformer._C``), and
for attention every ``F.scaled_dot_product_attention`` backend plus xformers when importable.
A Triton kernel module that declares older designs (``VARIANTS`` + ``use_variant``, see
``kernel_variants``) adds one ``triton[<variant>]`` row per non-default variant.

Each row carries median / 20% / 80% time, peak memory, the speedup over the eager reference, the
relative error against the reference in float64 (forward output on fwd rows, all input gradients
on fwd+bwd rows) and its roofline: ``bytes`` that must move and ``flops`` that must be done (see
``_cost``), ``ideal_ms`` on the ceilings measured in the same run, ``bound`` (memory or compute)
and ``pct_of_limit`` = 100 * ideal / median, plus the achieved ``gbps`` and ``tflops``.

On CPU the ``triton`` backend is the Triton interpreter: it is checked for correctness and memory
on the smallest shape only and never timed (its timings mean nothing); such rows say ``untimed``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

import ceilings as ceiling_probe
import senformer.ops as sops
from senformer.ops import reference as ref
from timing import mib, peak_memory, time_fn

OPS = ("class_cross_attention", "mask_logits", "ensemble_cross_entropy", "ensemble_predict")
_MODULE = {"class_cross_attention": "class_attention", "ensemble_cross_entropy": "ensemble_ce"}
SDPA = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
        "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


# ---------------------------------------------------------------- shapes
SHAPE_SETS = ("auto", "quick", "full", "tiny")


def shapes(op: str, device: torch.device, quick: bool, preset: str = "auto") -> list[dict]:
    """The paper's shapes on GPU (DESIGN.md / the Triton issue); smaller ones on CPU.

    ``preset`` picks the set independently of ``--quick``'s repetition counts: ``auto`` follows
    ``quick``; ``tiny`` is a few-second smoke set for any device (the GPU suite's ``--dry-run``)."""
    if preset == "tiny":
        return _tiny(op)
    if preset in ("quick", "full"):
        quick = preset == "quick"
    gpu = device.type == "cuda"
    if op == "class_cross_attention":
        ls = ([1024, 16384] if quick else [256, 1024, 4096, 16384, 65536]) if gpu else \
             ([256, 1024] if quick else [256, 1024, 4096])
        b = 8 if gpu else (1 if quick else 2)
        return [dict(B=b, H=8, N=150, D=64, L=l) for l in ls]
    if op == "mask_logits":
        sides = ([128, 32] if quick else [128, 64, 32, 16]) if gpu else ([32] if quick else [64, 32])
        b = 8 if gpu else (1 if quick else 2)
        return [dict(B=b, N=150, C=512, h=s, w=s) for s in sides]
    # loss / predict: target at full resolution, maps at 1/4 .. 1/32 (the learners' P2..P5)
    side = 512 if gpu else (64 if quick else 256)
    b = 8 if gpu else (1 if quick else 2)
    return [dict(B=b, N=150, H=side, W=side, maps=[side // 4, side // 8, side // 16, side // 32])]


def _tiny(op: str) -> list[dict]:
    """Ragged toy sizes (N not a power of two, L not a block multiple): every code path, seconds."""
    if op == "class_cross_attention":
        return [dict(B=1, H=2, N=19, D=16, L=72)]
    if op == "mask_logits":
        return [dict(B=1, N=19, C=32, h=9, w=8)]
    return [dict(B=1, N=19, H=32, W=32, maps=[8, 4, 2, 1])]


def _label(op: str, s: dict) -> str:
    if op == "class_cross_attention":
        return f"B{s['B']} H{s['H']} N{s['N']} L{s['L']} D{s['D']}"
    if op == "mask_logits":
        return f"B{s['B']} N{s['N']} C{s['C']} {s['h']}x{s['w']}"
    return f"B{s['B']} N{s['N']} {s['H']}x{s['W']} maps {'/'.join(str(m) for m in s['maps'])}"


# ---------------------------------------------------------------- inputs and calls
def make_inputs(op: str, s: dict, device, dtype, grad: bool, seed: int = 0) -> dict:
    # drawn on the target device: the paper's attention shapes are GBs, slow to fill on the host
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype).requires_grad_(grad)

    if op == "class_cross_attention":
        return {"q": rnd(s["B"], s["H"], s["N"], s["D"]), "k": rnd(s["B"], s["H"], s["L"], s["D"]),
                "v": rnd(s["B"], s["H"], s["L"], s["D"])}
    if op == "mask_logits":
        return {"features": rnd(s["B"], s["h"] * s["w"], s["C"]), "cls": rnd(s["B"], s["N"], s["C"]),
                "hw": (s["h"], s["w"])}
    maps = [rnd(s["B"], s["N"], m, m) for m in s["maps"]]
    target = torch.randint(0, s["N"], (s["B"], s["H"], s["W"]), generator=g, device=device)
    target[torch.rand(target.shape, generator=g, device=device) < 0.1] = 255  # ignored pixels, as in real labels
    return {"logits": maps, "target": target, "size": (s["H"], s["W"])}


def _grad_leaves(x: dict) -> list[torch.Tensor]:
    out = []
    for v in x.values():
        for t in (v if isinstance(v, list) else [v]):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                out.append(t)
    return out


def _reference_call(op: str) -> Callable:
    """The op as plain torch, taking the input dict (what ``compile`` compiles)."""
    if op == "class_cross_attention":
        return lambda x: ref.class_cross_attention(x["q"], x["k"], x["v"])
    if op == "mask_logits":
        return lambda x: ref.mask_logits(x["features"], x["cls"], x["hw"])
    if op == "ensemble_cross_entropy":
        # check_labels syncs and is data-dependent: the compiled graph would break on it
        def ce(x):
            u = ref.learner_maps(x["logits"], False)
            size = x["target"].shape[-2:]
            e = torch.log(torch.clamp(sum(torch.softmax(m, dim=1) for m in u), min=1e-15))
            le = ref.masked_cross_entropy(ref.resize(e, size), x["target"], 255)
            ll = sum(ref.masked_cross_entropy(ref.resize(m, size), x["target"], 255) for m in u) / len(u)
            return le, ll
        return ce
    return lambda x: ref.resize(ref.merged_scores(x["logits"], "mean"), x["size"]).argmax(1)


def _ops_call(op: str) -> Callable:
    if op == "class_cross_attention":
        return lambda x: sops.class_cross_attention(x["q"], x["k"], x["v"])
    if op == "mask_logits":
        return lambda x: sops.mask_logits(x["features"], x["cls"], x["hw"])
    if op == "ensemble_cross_entropy":
        return lambda x: sops.ensemble_cross_entropy(x["logits"], x["target"])
    return lambda x: sops.ensemble_predict(x["logits"], x["size"])


def _sdpa_call(name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, SDPA[name])

    def call(x):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"])
    return call


def _xformers_call() -> Callable:
    import xformers.ops as xops

    # xformers wants (B, L, H, D); the transposes are views, as a user calling it would pass
    return lambda x: xops.memory_efficient_attention(
        x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2)).transpose(1, 2)


# ---------------------------------------------------------------- cost model
TARGET_BYTES = 8  # labels are int64 (make_inputs, as datasets yield them); predict writes int64 labels


def _cost(op: str, s: dict, dtype, mode: str) -> tuple[float, float]:
    """(bytes that must move, FLOPs that must be done) by one call of ``op`` at shape ``s``: the
    floor of any implementation, whatever its design.

    Bytes: each input read once and each output written once, floats in ``dtype``. fwd and bwd are
    separate calls (the upstream gradient only exists between them), so the backward re-reads the
    inputs it needs plus the upstream gradient and writes one gradient per input:
    - class_cross_attention: fwd reads q, k, v and writes o; bwd reads q, k, v, o, do and writes
      dq, dk, dv (the log-sum-exp rows, B*H*N floats, are negligible and left out);
    - mask_logits: fwd reads features (B,L,C) and cls (B,N,C), writes logits (B,N,L); bwd reads
      the logits' gradient, features and cls, writes their two gradients;
    - ensemble_cross_entropy: the low-res maps and the int target read once; fwd+bwd adds the maps'
      gradients written once -- they follow from the forward's own reads (the upstream gradients
      are two scalars), and no full-resolution tensor needs to exist;
    - ensemble_predict: the maps read, the (B,H,W) label map written.
    FLOPs: the matmuls' 2*m*n*k, the only work a measured ceiling covers. Attention: QK^T and PV,
    4*B*H*N*L*D forward; backward 2.5x that (FlashAttention's count: S recomputed, then dV, dP,
    dQ, dK -- keeping P instead would move N/D times K's bytes). mask_logits: 2*B*N*L*C forward,
    2x that backward (both gradients). The loss and predict do no matmul: their elementwise work
    (bilinear taps, exp over the classes) is not counted, so their ideal is the memory floor.
    """
    es = torch.finfo(dtype).bits // 8
    fwd = mode == "fwd"
    if op == "class_cross_attention":
        q, kv = s["B"] * s["H"] * s["N"] * s["D"], s["B"] * s["H"] * s["L"] * s["D"]
        mm = 4.0 * s["B"] * s["H"] * s["N"] * s["L"] * s["D"]
        return ((2 * q + 2 * kv) * es, mm) if fwd else ((6 * q + 6 * kv) * es, 3.5 * mm)
    if op == "mask_logits":
        f, c, o = s["B"] * s["h"] * s["w"] * s["C"], s["B"] * s["N"] * s["C"], s["B"] * s["N"] * s["h"] * s["w"]
        mm = 2.0 * s["B"] * s["N"] * s["h"] * s["w"] * s["C"]
        return ((f + c + o) * es, mm) if fwd else ((3 * f + 3 * c + 2 * o) * es, 3 * mm)
    maps = sum(s["B"] * s["N"] * m * m for m in s["maps"])
    labels = s["B"] * s["H"] * s["W"] * TARGET_BYTES
    return (maps * es if fwd else 2 * maps * es) + labels, 0.0


# ---------------------------------------------------------------- availability
def _why_not(op: str, backend: str, x: dict, device: torch.device) -> str | None:
    """Reason ``backend`` cannot run ``op`` here, or None."""
    if backend in SDPA:
        if op != "class_cross_attention":
            return "attention only"
        if device.type != "cuda" and backend in ("sdpa-efficient", "sdpa-cudnn"):
            return "CUDA only"
        return None  # tried; an SDPA backend that refuses these inputs raises and the row says why
    if backend == "xformers":
        if op != "class_cross_attention":
            return "attention only"
        return None if importlib.util.find_spec("xformers") else "xformers is not importable"
    if backend in ("reference", "compile"):
        return None
    backend = _variant(backend)[0]
    from senformer.ops import _dispatch
    lead = x["logits"][0] if "logits" in x else x.get("q", x.get("features"))
    return _dispatch._why_not(backend, op, lead, has_triton=True)  # every op ships a Triton kernel


def auto_backends(device: torch.device) -> dict:
    """The backend each op resolves to with no override, on a float32 tensor of ``device``: what
    "fused" means in the end-to-end table (on a CPU without senformer._C it is the reference)."""
    out = {}
    for op in OPS:
        x = make_inputs(op, shapes(op, device, True)[0], device, torch.float32, False)
        why = {b: _why_not(op, b, x, device) for b in ("triton", "cuda", "cpu")}
        order = ("triton", "cuda") if device.type == "cuda" else ("cpu",) if device.type == "cpu" else ()
        # the function shadows its module in senformer.ops
        skip = importlib.import_module("senformer.ops.mask_logits").SLOWER_HERE if op == "mask_logits" else ()
        out[op] = next((b for b in order if why[b] is None and b not in skip), "reference")
        if op == "class_cross_attention" and out[op] == "cpu":
            from senformer.ops.class_attention import CPU_MIN_KEYS  # below it the kernel is not faster
            out[op] = f"cpu from L >= {CPU_MIN_KEYS} keys, else reference"
    return out


def backends_for(op: str, device: torch.device) -> list[str]:
    names = ["reference", "compile", "triton", *(f"triton[{v}]" for v in kernel_variants(op, device)),
             device.type if device.type in ("cpu", "cuda") else "cpu"]
    if op == "class_cross_attention":
        names += list(SDPA) + ["xformers"]
    return names


def _kernel_module(op: str):
    return importlib.import_module(f"senformer.kernels.{_MODULE.get(op, op)}")


def kernel_variants(op: str, device: torch.device) -> tuple[str, ...]:
    """The non-default designs ``senformer.kernels.<module>`` exposes: a ``VARIANTS`` tuple (first =
    the default) and a ``use_variant(name)`` context manager. Each gets a ``triton[<name>]`` row, so
    an older design is timed beside the current one in the same run. Looked for only where the
    Triton backend runs (CUDA, or the interpreter): importing the kernels elsewhere would fix
    Triton's mode before the interpreter is asked for."""
    from senformer.ops import _dispatch
    if not _dispatch.triton_importable() or (device.type != "cuda" and not _dispatch.triton_interpret()):
        return ()
    try:
        mod = _kernel_module(op)
    except Exception:  # a kernel module that does not import has no rows to add; the triton row says why
        return ()
    names = tuple(getattr(mod, "VARIANTS", None) or ())
    return names[1:] if callable(getattr(mod, "use_variant", None)) else ()


def _variant(backend: str) -> tuple[str, str | None]:
    """``"triton[old]"`` -> ``("triton", "old")``; any other name -> ``(name, None)``."""
    name, _, rest = backend.partition("[")
    return name, (rest[:-1] if rest else None)


# ---------------------------------------------------------------- running
def _rel_err(out, oracle) -> float | None:
    if isinstance(out, (tuple, list)):
        out = torch.stack([torch.as_tensor(o, dtype=torch.float64).reshape(()) for o in out])
        oracle = torch.stack([torch.as_tensor(o, dtype=torch.float64).reshape(()) for o in oracle])
    if not out.is_floating_point():  # label maps: the fraction of pixels that disagree
        return float((out.cpu() != oracle.cpu()).double().mean())
    out, oracle = out.detach().double().cpu(), oracle.detach().double().cpu()
    den = oracle.norm()
    return float((out - oracle).norm() / (den if den > 0 else 1.0))


def _oracle(op: str, x: dict):
    d = {k: ([t.detach().double() for t in v] if isinstance(v, list) else
             (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v))
         for k, v in x.items()}
    return _reference_call(op)(d)


def _grad_err(op: str, x: dict, g) -> float:
    """Relative error of all input gradients together against float64 autograd of the reference,
    with the same upstream gradient (the losses: d(loss_ensemble + loss_learners))."""
    leaves = _grad_leaves(x)
    d = {k: ([t.detach().double().requires_grad_() for t in v] if isinstance(v, list) else
             (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) and v.requires_grad else v))
         for k, v in x.items()}
    out = _reference_call(op)(d)
    if isinstance(out, tuple):
        (out[0] + out[1]).backward()
    else:
        out.backward(g.double())
    ref_leaves = _grad_leaves(d)
    got = torch.cat([t.grad.detach().double().cpu().reshape(-1) for t in leaves])
    want = torch.cat([t.grad.cpu().reshape(-1) for t in ref_leaves])
    den = want.norm()
    return float((got - want).norm() / (den if den > 0 else 1.0))


def _make_fn(op: str, backend: str, x: dict, compiled: dict) -> Callable:
    if backend in SDPA:
        call = _sdpa_call(backend)
    elif backend == "xformers":
        call = _xformers_call()
    elif backend == "compile":
        if op not in compiled:
            # every shape x dtype x grad mode is a recompile of the same code object; past dynamo's
            # default limit (8) it would silently run eager and the row would lie
            for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                         "accumulated_recompile_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
            compiled[op] = torch.compile(_reference_call(op), dynamic=False)
        call = compiled[op]
    else:
        inner = _ops_call(op)
        name, variant = _variant(backend)
        mod = _kernel_module(op) if variant else None

        def call(x, _b=name, _inner=inner):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # a fresh context per call: a generator-based context manager cannot be re-entered
                with sops.use_backend(_b), (mod.use_variant(variant) if mod else contextlib.nullcontext()):
                    out = _inner(x)
            # a silent fallback to reference would put the reference's time under this backend's name
            fell = [w for w in caught if "using 'reference'" in str(w.message)]
            if fell:
                raise RuntimeError(str(fell[0].message))
            return out
    return lambda: call(x)


def _fwd_bwd(fn: Callable, x: dict, grads: dict) -> Callable:
    leaves = _grad_leaves(x)

    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        if isinstance(out, tuple):
            (out[0] + out[1]).backward()
        else:
            if "g" not in grads:
                grads["g"] = torch.randn_like(out)
            out.backward(grads["g"])
    return step


# Backends whose rows run after all the others of a call (whatever their place in the table): each
# compile row is an inductor build of ~10-30 s, which must not starve the kernels under a time budget.
DEFERRED = ("compile",)


def run(device, dtypes, quick: bool, ceilings: dict | None, only_ops=None, only_backends=None, log=print,
        shape_set: str = "auto", compile_ops=None, deadline: float | None = None, progress=None) -> list[dict]:
    """Rows of the kernel table. ``ceilings``: one dtype's ``ceilings.measure`` (run.py calls once per
    dtype), or None to measure them here for each dtype. ``only_ops`` given as a list or tuple also
    sets the order (the GPU suite puts the headline ops first); ``compile_ops`` limits the
    ``compile`` rows to those ops;
    past ``deadline`` (``time.monotonic()``) rows are recorded as skipped instead of run;
    ``progress(rows)`` is called after each row (incremental saving). The rows come back in table
    order (op, dtype, shape, backend, mode) though the ``DEFERRED`` backends run last."""
    device = torch.device(device)
    # every row's roofline is drawn on ceilings of this run, never on figures from elsewhere
    ceil = {d: ceilings or ceiling_probe.measure(device, d, quick) for d in dtypes}
    compiled: dict = {}
    interp = device.type == "cpu"
    order = ([op for op in only_ops if op in OPS] if isinstance(only_ops, (list, tuple))
             else [op for op in OPS if not only_ops or op in only_ops])
    cases = []  # (op, dtype, shape index, shape, backend, mode) in table order
    for op in order:
        for dtype in dtypes:
            for si, s in enumerate(shapes(op, device, quick, shape_set)):
                for backend in backends_for(op, device):
                    if only_backends and backend not in only_backends:
                        continue
                    if backend == "compile" and compile_ops is not None and op not in compile_ops:
                        continue
                    for mode in (["fwd"] if op == "ensemble_predict" else ["fwd", "fwd+bwd"]):
                        cases.append((op, dtype, si, s, backend, mode))
    run_order = ([i for i, c in enumerate(cases) if c[4] not in DEFERRED]
                 + [i for i, c in enumerate(cases) if c[4] in DEFERRED])
    done: dict = {}
    ref_ms: dict = {}
    out_of_time = 0
    for i in run_order:
        op, dtype, si, s, backend, mode = cases[i]
        row = {"op": op, "backend": backend, "shape": _label(op, s), "params": s,
               "dtype": str(dtype).replace("torch.", ""), "mode": mode}
        if deadline is not None and time.monotonic() > deadline:
            done[i] = {**row, "status": "skipped", "note": "time budget spent"}
            out_of_time += 1
            continue
        t0 = time.perf_counter()
        row.update(_one(op, backend, s, device, dtype, mode, quick, compiled, ceil[dtype],
                        interp and backend.startswith("triton"), si))
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        key = (op, dtype, si, mode)
        if backend == "reference" and row.get("median_ms"):
            ref_ms[key] = row["median_ms"]
        if row.get("median_ms") and ref_ms.get(key):
            row["speedup_vs_reference"] = ref_ms[key] / row["median_ms"]
        done[i] = row
        log(_line(row))
        if progress is not None:
            progress([done[j] for j in sorted(done)])
    if out_of_time:
        log(f"  time budget spent: {out_of_time} rows not run (recorded as skipped)")
    rows = [done[j] for j in sorted(done)]
    if out_of_time and progress is not None:
        progress(rows)
    return rows


def _one(op, backend, s, device, dtype, mode, quick, compiled, ceilings, interpreter, shape_index) -> dict:
    grad = mode != "fwd"
    x = make_inputs(op, s, device, dtype, grad)
    why = _why_not(op, backend, x, device)
    if why:
        return {"status": "skipped", "note": why}
    if interpreter and shape_index > 0:
        return {"status": "skipped", "note": "Triton interpreter: smallest shape only"}
    if backend == "compile" and device.type == "cpu" and quick:
        return {"status": "skipped", "note": "--quick on CPU: torch.compile's C++ build takes minutes here"}
    try:
        fn = _make_fn(op, backend, x, compiled)
        out = fn()  # first call: compiles / autotunes / checks dispatch, and gives the output to check
        res: dict = {"status": "ok"}
        if not grad:
            res["rel_err"] = _rel_err(out, _oracle(op, x))
        del out
        upstream: dict = {}
        step = _fwd_bwd(fn, x, upstream) if grad else fn
        if grad:
            step()
            res["rel_err"] = _grad_err(op, x, upstream.get("g"))
        res["peak_mib"] = mib(peak_memory(step, device))
        nbytes, flops = _cost(op, s, dtype, mode)
        if interpreter:
            res.update(status="untimed", note="Triton interpreter on CPU: correctness and memory only")
            return {**res, **ceiling_probe.roofline(nbytes, flops, ceilings)}
        t = time_fn(step, device, warmup=1, reps=5 if quick else 15, budget_s=1.5 if quick else 8.0)
        res.update(t)
        res.update(ceiling_probe.roofline(nbytes, flops, ceilings, t["median_ms"]))
        sec = t["median_ms"] * 1e-3
        res["gbps"] = nbytes / sec / 1e9
        if flops:
            res["tflops"] = flops / sec / 1e12
        return res
    except Exception as e:  # one broken backend must not hide the rest of the table
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if backend in SDPA and "No viable backend" in msg:  # e.g. flash with float32 inputs
            return {"status": "skipped", "note": "this SDPA backend does not take these inputs (dtype/shape/GPU)"}
        return {"status": "error", "note": f"{type(e).__name__}: {msg[:200]}"}


def _line(r: dict) -> str:
    head = f"  {r['op']:<24} {r['backend']:<15} {r['dtype']:<8} {r['mode']:<8} {r['shape']:<34}"
    if r.get("median_ms") is None:
        extra = "".join(f" {k} {r[k]:.3g}" for k in ("rel_err", "peak_mib") if r.get(k) is not None)
        return head + f" {r['status']}: {r.get('note', '')}{extra}"
    sp = r.get("speedup_vs_reference")
    return head + (f" {r['median_ms']:9.3f} ms [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]"
                   f" {r['gbps']:7.3g} GB/s" + (f" {r['tflops']:6.3g} TF/s" if r.get("tflops") else "")
                   + f" ideal {r['ideal_ms']:.3g} ms ({r['bound']}) {r['pct_of_limit']:.3g}% of limit"
                   + (f" x{sp:.2f}" if sp else "") + (f" mem {r['peak_mib']:.1f} MiB" if r.get("peak_mib") is not None else "")
                   + (f" err {r['rel_err']:.1e}" if r.get("rel_err") is not None else ""))
