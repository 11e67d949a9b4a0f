"""End to end: training-step and inference throughput of whole models, fused ops on vs off vs compile.

Measured as mmsegmentation does so the figures sit beside theirs:
- training: one step = forward + loss + backward + AdamW step; images/s = batch / median step
  time; memory = peak allocated during a step plus what was live before it (weights, gradients,
  optimizer state, the batch) -- ``torch.cuda.max_memory_allocated`` on CUDA;
- inference: ``model.predict(protocol="fast")`` (whole image, the merge fused with the resize; the
  ``official`` protocol materialises full-resolution scores as mmseg does) over a fixed number of
  images after one warm-up batch, images/s = images / total wall time (mmseg's ``benchmark.py``
  counts frames the same way).
"fused" = automatic op backends; "reference" = ``use_backend("reference")``; "compile" =
``torch.compile`` of the model on the reference path (the best plain-PyTorch alternative).
On CPU the peak is the profiler's allocation count (see ``timing.py``) plus the same live tensors.

Roofline: ``train_flops`` (one step: forward + loss + backward; the optimizer's elementwise update
is not counted) and ``infer_flops`` (one batch) come from ``FlopCounterMode`` over one step on the
reference path with SDPA's math backend (``senformer.flops``' convention: fused kernels are opaque
to the counter; the count is the same algorithm whichever variant runs it). ``*_ideal_ms`` = those
FLOPs / the matmul rate measured in the same run (``ceilings.py``), ``*_pct_of_limit`` = 100 *
ideal / measured time per step or batch.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch

import ceilings as ceiling_probe
import senformer
import senformer.ops as sops
from senformer import flops as sflops
from timing import mib, peak_memory, time_fn

PRESETS = ("senformer_r50", "senformer_swin_t")
VARIANTS = ("fused", "reference", "compile")


def plan(device: torch.device, quick: bool, presets=None, variants=None, batch=None, size=None,
         scaling: bool = True) -> list[dict]:
    """Cases: each preset at the base size x {fused, reference, compile}, then the size and class
    scaling (fused and reference; --quick: fused only, first preset only, one extra point each).
    ``variants``, ``batch`` and ``size`` (the base side) override the defaults; ``scaling=False``
    keeps the base cases only (the GPU suite's time box)."""
    gpu = device.type == "cuda"
    base = size or (512 if (gpu or not quick) else 64)
    batch = batch or (8 if gpu else 2)
    sizes = [512, 768, 1024] if gpu or not quick else [64, 96]
    classes = [19, 59, 150, 171] if not quick else [19, 150]
    variants = tuple(variants or VARIANTS)
    scaled = tuple(v for v in (("fused",) if quick else ("fused", "reference")) if v in variants)
    cases = []
    for i, preset in enumerate(presets or PRESETS):
        for v in variants:
            cases.append(dict(preset=preset, size=base, batch=batch, num_classes=150, variant=v, group="base"))
        if (quick and i > 0) or not scaling:
            continue
        for v in scaled:
            cases += [dict(preset=preset, size=s, batch=batch, num_classes=150, variant=v, group="size")
                      for s in sizes if s != base]
            cases += [dict(preset=preset, size=base, batch=batch, num_classes=n, variant=v, group="classes")
                      for n in classes if n != 150]
    return cases


def _backend(variant: str):
    return contextlib.nullcontext() if variant == "fused" else sops.use_backend("reference")


def _live_bytes(*objs) -> int:
    """Bytes of the tensors a step starts with (CPU stand-in for memory_allocated())."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    model, opt, batch = objs
    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        add(t.grad)
    for state in opt.state.values():
        for t in state.values():
            add(t)
    for t in batch:
        add(t)
    return total


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one(case: dict, device: torch.device, dtype: torch.dtype, quick: bool, reps: int | None = None,
        n_infer: int | None = None, ceil: dict | None = None, flops_cache: dict | None = None) -> dict:
    """One case's row; ``reps`` (timed training steps) and ``n_infer`` (inference images) override
    the defaults (CUDA: 20 and 200, 10 and 40 with --quick). ``ceil`` (one dtype's
    ``ceilings.measure``) adds the roofline fields; ``flops_cache`` shares FLOP counts between the
    variants of one case (same model, same inputs, same count)."""
    row = dict(case)
    if case["variant"] == "compile" and device.type == "cpu" and quick:
        return {**row, "status": "skipped", "note": "--quick on CPU: compiling a whole model takes many minutes here"}
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    b, s, n = case["batch"], case["size"], case["num_classes"]
    model = senformer.build_model(case["preset"], num_classes=n).to(device)
    images = torch.randn(b, 3, s, s, generator=g).to(device)
    target = torch.randint(0, n, (b, s, s), generator=g).to(device)
    amp = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    loss_fn = model.loss
    predict = functools.partial(model.predict, protocol="fast")
    if case["variant"] == "compile":
        # loss/predict are the entry points users call; compiling them covers model + loss + merge
        loss_fn = torch.compile(model.loss)
        predict = torch.compile(predict)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with _backend(case["variant"]), amp:
            loss = loss_fn(images, target)["loss"]
        loss.backward()
        opt.step()
        return None

    res: dict = {"status": "ok", "dtype": str(dtype).replace("torch.", "")}
    key = (case["preset"], s, b, n)
    flops = (flops_cache or {}).get(key)
    try:
        if ceil is not None and flops is None:
            try:
                flops = count_flops(model, images, target)
            except Exception as e:  # the throughput figures stand without the roofline
                res["roofline_note"] = f"FLOPs not counted: {type(e).__name__}: {str(e).strip()[:200]}"
            if flops_cache is not None and flops is not None:
                flops_cache[key] = flops
        model.train()
        t0 = time.perf_counter()
        train_step()  # builds optimizer state; compiles in the compile variant
        _sync(device)
        res["first_step_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            train_step()
            _sync(device)
            res["train_peak_mib"] = mib(torch.cuda.max_memory_allocated(device))
        else:
            base = _live_bytes(model, opt, (images, target))
            delta = peak_memory(train_step, device)
            res["train_peak_mib"] = mib(None if delta is None else base + delta)
        reps = reps or ((10 if device.type == "cuda" else 2) if quick else (20 if device.type == "cuda" else 5))
        # on CPU the memory step above already warmed up; a step costs seconds there
        t = time_fn(train_step, device, warmup=0 if device.type == "cpu" else 3, reps=reps,
                    budget_s=20.0 if quick else 120.0, cuda_events=True)
        res["train"] = t
        res["train_images_s"] = b / (t["median_ms"] * 1e-3)

        model.eval()
        opt.zero_grad(set_to_none=True)
        del opt
        n_images = n_infer or ((40 if quick else 200) if device.type == "cuda" else (b if quick else 4 * b))
        batches = max(1, -(-n_images // b))

        def infer():
            with _backend(case["variant"]), amp, torch.no_grad():
                return predict(images)
        out = infer()  # warm-up batch (compiles in the compile variant)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(batches):
                out = infer()
            _sync(device)
            res["infer_images"] = batches * b
            res["infer_images_s"] = batches * b / (time.perf_counter() - t0)
        else:
            # the median of timed batches: one batch timed once (the old --quick row) read fused
            # inference at 0.95x the reference where an interleaved A/B measured 1.01x
            t = time_fn(infer, device, warmup=0, reps=batches if n_infer else max(5, batches),
                        budget_s=20.0 if quick else 120.0)
            res["infer"] = t
            res["infer_images"] = t["reps"] * b
            res["infer_images_s"] = b / (t["median_ms"] * 1e-3)
        if device.type == "cuda":
            res["infer_peak_mib"] = mib(torch.cuda.max_memory_allocated(device))
        else:
            delta = peak_memory(infer, device)
            res["infer_peak_mib"] = mib(None if delta is None else _live_bytes(model, _NoOpt(), (images,)) + delta)
        del out
        if ceil is not None and flops is not None:
            res.update(_roofline(res, flops, ceil, b))
    except Exception as e:  # an OOM or a broken variant must not hide the other rows
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        res = {"status": "error", "note": f"{type(e).__name__}: {msg[:200]}"}
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**row, **res}


class _NoOpt:
    state: dict = {}


def count_flops(model, images, target) -> dict:
    """FLOPs of one training step (forward + loss + backward) and of one inference batch of
    ``images``, the whole batch, counted by ``FlopCounterMode`` on the reference path. Gradients
    are left cleared; batch-norm statistics see one more batch (no effect on what is timed)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    wants_grad = [p for p in model.parameters() if p.requires_grad]
    try:
        with sflops._reference_ops():
            model.train()
            with FlopCounterMode(display=False) as train:
                model.loss(images, target)["loss"].backward()
            model.zero_grad(set_to_none=True)
            model.eval()
            # FlopCounterMode's module tracker fails on a view made under no_grad of a weight that
            # requires grad (the expanded class embedding); inference needs no grad at all
            for p in wants_grad:
                p.requires_grad_(False)
            with FlopCounterMode(display=False) as infer, torch.no_grad():
                model.predict(images, protocol="fast")
    finally:
        for p in wants_grad:
            p.requires_grad_(True)
        model.train(was_training)
    return {"train_flops": train.get_total_flops(), "infer_flops": infer.get_total_flops()}


def _roofline(res: dict, flops: dict, ceil: dict, batch: int) -> dict:
    """Ideal times on the matmul ceiling and achieved % of them (no copy term: the bytes a whole
    model must move have no simple floor, and its matmuls dominate)."""
    rate = ceil["matmul"]["tflops"] * 1e12
    out = {**flops, "matmul_tflops": ceil["matmul"]["tflops"],
           "train_ideal_ms": flops["train_flops"] / rate * 1e3, "infer_ideal_ms": flops["infer_flops"] / rate * 1e3}
    out["train_pct_of_limit"] = 100 * out["train_ideal_ms"] / res["train"]["median_ms"]
    out["infer_pct_of_limit"] = 100 * out["infer_ideal_ms"] * res["infer_images_s"] / (batch * 1e3)
    return out


def run(device, dtype, quick: bool, presets=None, log=print, variants=None, batch=None, size=None,
        scaling: bool = True, deadline: float | None = None, progress=None, reps: int | None = None,
        n_infer: int | None = None, ceilings: dict | None = None) -> list[dict]:
    """Rows of the end-to-end table (see ``plan`` for the cases). ``ceilings``: ``dtype``'s
    ``ceilings.measure`` from this run, or None to measure them here. Past ``deadline``
    (``time.monotonic()``) cases are recorded as skipped instead of run; ``progress(rows)`` is
    called after each case (incremental saving)."""
    device = torch.device(device)
    known = list(presets or PRESETS)
    try:
        from senformer.models.zoo import PRESETS as ZOO
        missing = [p for p in known if p not in ZOO]
    except Exception as e:
        log(f"  end to end skipped: {type(e).__name__}: {e}")
        return [{"status": "skipped", "note": f"senformer.models.zoo unavailable: {type(e).__name__}: {e}"}]
    rows = [{"preset": p, "status": "skipped", "note": "not a zoo preset"} for p in missing]
    ceil = ceilings or ceiling_probe.measure(device, dtype, quick)
    flops_cache: dict = {}
    out_of_time = 0
    for case in plan(device, quick, [p for p in known if p not in missing], variants, batch, size, scaling):
        if deadline is not None and time.monotonic() > deadline:
            rows.append({**case, "status": "skipped", "note": "time budget spent"})
            out_of_time += 1
            continue
        row = one(case, device, dtype, quick, reps, n_infer, ceil, flops_cache)
        rows.append(row)
        log(_line(row))
        if progress is not None:
            progress(rows)
    if out_of_time:
        log(f"  time budget spent: {out_of_time} cases not run (recorded as skipped)")
        if progress is not None:
            progress(rows)
    return rows


def _line(r: dict) -> str:
    head = f"  {r['preset']:<18} {r.get('variant', ''):<10} {r.get('size', '')}px N{r.get('num_classes', '')} B{r.get('batch', '')}"
    if r["status"] != "ok":
        return f"{head:<50} {r['status']}: {r.get('note', '')}"
    pct = lambda k: f" ({r[k]:.1f}% of limit)" if r.get(k) is not None else ""  # noqa: E731
    return (f"{head:<50} train {r['train_images_s']:7.2f} img/s{pct('train_pct_of_limit')} "
            f"peak {r['train_peak_mib'] or 0:8.1f} MiB | infer {r['infer_images_s']:7.2f} img/s"
            f"{pct('infer_pct_of_limit')} peak {r['infer_peak_mib'] or 0:8.1f} MiB")
