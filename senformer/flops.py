"""Parameters and FLOPs of the model zoo, in the paper's convention and in full.

Two counts, both for one forward pass of the inference graph (``model.eval()``: no auxiliary head):

- :func:`flops_mmcv` -- multiply-accumulates (MACs) of module layers, counted the way mmcv's
  ``get_model_complexity_info`` counts them (the tool behind the paper's "FLOPs", e.g. 179G for
  SenFormer-R50 at 512x512): forward hooks on convolutions, linear layers, norms, ReLU-family
  activations, pooling and ``nn.Upsample``. Matmuls inside attention, ``F.*`` calls (interpolate,
  softmax, GELU) and elementwise tensor arithmetic are *not* counted, as in mmcv.
- :func:`flops_full` -- every floating-point operation torch's ``FlopCounterMode`` sees (2 FLOPs per
  MAC of every matmul and convolution, attention included). Reported as is, labelled "full".

Both run on the meta device when they can (shapes only, no arithmetic), so a Swin-L count takes
seconds; a model whose forward needs a real kernel falls back to its own device.

``python -m senformer.flops`` prints the paper-comparison table; ``--write-readme`` also replaces
the block between ``<!-- flops-table:start -->`` and ``<!-- flops-table:end -->`` in README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import sys
import time
from typing import Callable, Iterable

import torch
from torch import nn

from .models.module_state import eval_mode, module_device

__all__ = [
    "count_params", "flops_mmcv", "flops_full", "PAPER_ROWS", "paper_table", "markdown_table",
    "build_meta", "main",
]

# --------------------------------------------------------------------------------------------
# mmcv's per-module rules. mmcv matches exact types; we match with isinstance so that timm's
# subclasses (timm LayerNorm / LayerNorm2d, BatchNormAct2d, Conv2dSame, ...) count as the plain
# torch layer they extend -- the paper's mmseg models used the plain layers for the same roles.
# --------------------------------------------------------------------------------------------

_ACTIVATIONS = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
# _BatchNorm covers SyncBatchNorm too. mmseg's tools/get_flops.py counted the configs as built, with
# SyncBN, which mmcv's exact-type table skips; BN is 0.07% of SenFormer-R50's count (0.12G of
# 179.6G), so we count every BN as mmcv counts plain BN rather than model that accident.
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LayerNorm)


def _first(inputs):
    return inputs[0] if isinstance(inputs, (tuple, list)) and len(inputs) else inputs


def _conv_macs(m: nn.modules.conv._ConvNd, inputs, output) -> int:
    out_positions = output.numel() // output.shape[1]  # batch * spatial output positions
    per_position = math.prod(m.kernel_size) * (m.in_channels // m.groups) * m.out_channels
    bias = m.out_channels * out_positions if m.bias is not None else 0
    return per_position * out_positions + bias


def _deconv_macs(m: nn.modules.conv._ConvTransposeNd, inputs, output) -> int:
    x = _first(inputs)
    in_positions = x.numel() // x.shape[1]
    per_position = math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups)
    # mmcv's bias term multiplies out_h * out_h (a typo); we use the real output size.
    bias = output.numel() if m.bias is not None else 0
    return per_position * in_positions + bias


def _linear_macs(m: nn.Linear, inputs, output) -> int:
    # mmcv ignores the bias of linear layers (but not of convolutions).
    return _first(inputs).numel() * output.shape[-1]


def _norm_macs(m: nn.Module, inputs, output) -> int:
    n = _first(inputs).numel()
    affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
    return 2 * n if affine else n


def _elements_out(m, inputs, output) -> int:
    # mmcv's Upsample rule reads output[0] (one image); with batch 1, as the paper, it is the same.
    return output.numel()


def _elements_in(m, inputs, output) -> int:
    return _first(inputs).numel()


def _mha_macs(m: nn.MultiheadAttention, inputs, output) -> int:
    # nn.MultiheadAttention runs its projections functionally, so no Linear hook fires; count the
    # q/k/v/out projections as the separate Linear layers of the paper's timm-style attention.
    q, k, v = inputs[0], inputs[1], inputs[2]
    return (2 * q.numel() + k.numel() + v.numel()) * m.embed_dim


# Order matters: the first matching class wins (ConvTranspose is a _ConvNd subclass).
_RULES: list[tuple[tuple[type, ...], Callable]] = [
    ((nn.MultiheadAttention,), _mha_macs),
    ((nn.modules.conv._ConvTransposeNd,), _deconv_macs),
    ((nn.modules.conv._ConvNd,), _conv_macs),
    ((nn.Linear,), _linear_macs),
    (_NORMS, _norm_macs),
    (_ACTIVATIONS, _elements_out),
    (_POOLS, _elements_in),
    ((nn.Upsample,), _elements_out),
]


def mmcv_rule(module: nn.Module) -> Callable | None:
    """The MAC rule mmcv applies to ``module`` (``None``: mmcv does not count it)."""
    for types, rule in _RULES:
        if isinstance(module, types):
            return rule
    return None


# --------------------------------------------------------------------------------------------
# Running a forward pass cheaply
# --------------------------------------------------------------------------------------------

def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


@contextlib.contextmanager
def _reference_ops():
    """Fused kernels are opaque to FlopCounterMode; the reference path is plain torch ops. SDPA runs
    its math backend for the same reason: FlopCounterMode has no formula for some fused SDPA kernels
    (torch 2.14's CPU flash attention counts 0), and the math path is what the meta device runs,
    so a count no longer depends on the device or on which fused kernel torch picked."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .ops import use_backend
    with use_backend("reference"), sdpa_kernel(SDPBackend.MATH):
        yield


def _check_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise TypeError(f"input_shape must be a tuple of ints like (1, 3, 512, 512), got {input_shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, e.g. (1, 3, 512, 512), "
                         f"got {input_shape!r}")
    return shape


def _forward(model: nn.Module, input_shape, device, attempt: Callable[[], contextlib.AbstractContextManager]) -> str:
    """One eval forward on an input of ``input_shape`` inside a fresh ``attempt()`` context (a
    failed meta try must not leave partial counts behind); returns the device type it ran on.

    ``device=None``: meta when possible -- through ``torch.func.functional_call`` with meta
    stand-ins for a real model's weights (nothing is copied or changed) -- else the model's own
    device with a random input.
    """
    _check_model(model)
    shape = _check_shape(input_shape)
    own = module_device(model)
    if device is not None:
        tries = [torch.device(device)]
        if tries[0].type != "meta" and tries[0].type != own.type:
            raise ValueError(f"device={device!r} but the model's weights are on {own}")
    else:
        tries = [own] if own.type == "meta" else [torch.device("meta"), own]
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for i, dev in enumerate(tries):
        # Detached stand-ins: weights that require grad would make views of them (an expanded
        # class embedding) autograd leaves that FlopCounterMode's module tracker trips over.
        if dev.type == "meta":
            stand_ins = {n: t.detach() if t.is_meta else torch.empty_like(t, device="meta") for n, t in tensors}
            x = torch.empty(shape, device="meta")
        else:
            stand_ins = {n: t.detach() for n, t in tensors}
            x = torch.randn(shape, device=dev)
        try:
            with torch.no_grad(), eval_mode(model), _reference_ops(), attempt():
                torch.func.functional_call(model, stand_ins, (x,))
            return dev.type
        except (NotImplementedError, RuntimeError):  # a missing meta kernel, a data-dependent op
            if i == len(tries) - 1:
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

_AUX_NAMES = ("aux_head", "auxiliary_head")


def _aux_prefixes(model: nn.Module) -> list[str]:
    """Names of the auxiliary-head submodules (training-only), wherever they sit in the tree."""
    return [name for name, _ in model.named_modules() if name and name.rsplit(".", 1)[-1] in _AUX_NAMES]


def count_params(model: nn.Module, include_aux: bool = True) -> int:
    """Number of parameters (shared tensors once). ``include_aux=False`` leaves out the auxiliary
    FCN head (``aux_head`` / ``auxiliary_head`` submodules), which only exists for training."""
    _check_model(model)
    skip = [] if include_aux else [p + "." for p in _aux_prefixes(model)]
    return sum(p.numel() for name, p in model.named_parameters()
               if not any(name.startswith(s) for s in skip))


@contextlib.contextmanager
def _cleared(counts: dict):
    counts.clear()
    yield


def flops_mmcv(model: nn.Module, input_shape=(1, 3, 512, 512), device=None, per_module: dict | None = None) -> int:
    """MACs of one eval forward of ``model`` on an input of ``input_shape`` (the whole batch),
    in mmcv's convention (the paper's "FLOPs"). A module called k times is counted k times, so a
    repeated block counts once per application and a K/V projection cached across blocks once.

    ``per_module``, when given a dict, is filled with ``{qualified module name: MACs}``.
    """
    _check_model(model)
    _check_shape(input_shape)
    counts: dict[str, int] = {}
    handles = []

    def hook_for(name: str, rule: Callable):
        def hook(module, inputs, output):
            counts[name] = counts.get(name, 0) + int(rule(module, inputs, output))
        return hook

    try:
        for name, m in model.named_modules():
            rule = mmcv_rule(m)
            if rule is not None:
                handles.append(m.register_forward_hook(hook_for(name, rule)))
        _forward(model, input_shape, device, lambda: _cleared(counts))
    finally:
        for h in handles:
            h.remove()
    if per_module is not None:
        per_module.update(counts)
    return sum(counts.values())


def flops_full(model: nn.Module, input_shape=(1, 3, 512, 512), device=None) -> int:
    """All FLOPs of one eval forward (2 per multiply-accumulate of every matmul, attention
    included), as counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    counters = []

    def attempt():
        counters.append(FlopCounterMode(display=False))
        return counters[-1]

    _forward(model, input_shape, device, attempt)
    return int(counters[-1].get_total_flops())


def build_meta(preset: str, num_classes: int = 150, **overrides) -> nn.Module:
    """``senformer.models.zoo.build_model`` on the meta device (no memory, no init arithmetic);
    falls back to CPU when the constructor needs real values."""
    from .models.zoo import build_model

    try:
        with torch.device("meta"):
            return build_model(preset, num_classes=num_classes, **overrides)
    except (NotImplementedError, RuntimeError):
        return build_model(preset, num_classes=num_classes, **overrides)


# --------------------------------------------------------------------------------------------
# The paper's figures (Tables 2, 3, 4, 5, 14; ADE20K, 150 classes)
# --------------------------------------------------------------------------------------------

PARAMS_TOL, FLOPS_TOL = 0.03, 0.02  # the acceptance tolerances against the paper's figures


def _row(name, table, preset, size, params_m, flops_g, aux, note=None, **overrides):
    # ``aux``: whether the paper's parameter count includes the auxiliary FCN head. Worked out from
    # the architecture (the head is 4.8M on ResNet C4=1024, 1.9M/2.4M/3.6M on Swin-T/B/L C4): the
    # paper counts it on every row except SenFormer-R50 with repeated blocks (55M) and the fusion
    # baseline, where adding it overshoots by 5M. None = the paper gives no figure. ``note``: why
    # the row may miss, printed under the table only when it does.
    return dict(name=name, table=table, preset=preset, overrides=overrides, size=size,
                paper_params_m=params_m, paper_flops_g=flops_g, paper_params_include_aux=aux, note=note)


_NOTE_CLS = ("the paper disagrees with itself: Table 2 says 67M, its text says 'cls embedding' has 89M more "
             "than the 55M base (= 144M, what shared embeddings + 6 distinct blocks per learner give)")
_NOTE_SENUPER = ("the paper's 70M needs the 512-channel aux head of the SenFormer configs (69.2M); "
                 "mmseg's UperNet aux width, 256, gives 66.8M")


PAPER_ROWS: list[dict] = [
    _row("SenFormer R50", "2,3,5", "senformer_r50", 512, 55, 179, False),
    _row("SenFormer R50, 1 block", "3", "senformer_r50", 512, 55, 111, False, num_blocks=1),
    _row("SenFormer R50, 3 blocks", "3", "senformer_r50", 512, 55, 139, False, num_blocks=3),
    _row("SenFormer R50, 9 blocks", "3", "senformer_r50", 512, 55, 220, False, num_blocks=9),
    _row("SenFormer R50, decoder shared", "2", "senformer_r50", 512, 68, 179, True,
         weight_sharing="decoder", repeat_block=False),
    _row("SenFormer R50, cls shared", "2", "senformer_r50", 512, 67, 179, True, _NOTE_CLS,
         weight_sharing="cls"),
    _row("SenFormer R50, none, 1 block", "2", "senformer_r50", 512, 55, 111, False,
         weight_sharing="none", num_blocks=1),
    _row("SenFormer R50, none, 6 blocks", "2,14", "senformer_r50", 512, 144, 179, True, weight_sharing="none"),
    _row("UperNet R50", "2,4,5", "upernet_r50", 512, 67, 238, True),
    _row("SenUperNet R50", "4", "senupernet_r50", 512, 70, 135, True, _NOTE_SENUPER),
    _row("FeaturesFusionBaseline R50", "4", "fusion_baseline_r50", 512, 52, 307, False),
    _row("SenFormer R101", "5,14", "senformer_r101", 512, 79, 199, True),
    _row("SenFormer R101, none", "14", "senformer_r101", 512, 163, None, True, weight_sharing="none"),
    _row("SenFormer Swin-T", "5", "senformer_swin_t", 512, 59, 179, True),
    _row("SenFormer Swin-S", "5", "senformer_swin_s", 512, 81, 202, True),
    _row("SenFormer Swin-B", "5", "senformer_swin_b", 640, 120, 371, True),
    _row("SenFormer Swin-L", "5,14", "senformer_swin_l", 640, 233, 546, True),
    _row("SenFormer Swin-L, none", "14", "senformer_swin_l", 640, 314, None, True, weight_sharing="none"),
]


def _rel(ours: float, paper: float | None) -> float | None:
    return None if paper is None else (ours - paper) / paper


def paper_table(rows: Iterable[dict] | None = None, num_classes: int = 150, full: bool = True,
                cached: bool = True) -> list[dict]:
    """Count every row of :data:`PAPER_ROWS` (or ``rows``): params with and without the aux head,
    mmcv MACs with the paper's recompute-K/V path (``cache_kv=False``) and, with ``cached``, with
    ``cache_kv=True``; with ``full``, FlopCounterMode's FLOPs; the paper's figures and relative
    errors (params against the convention the paper used on that row)."""
    from .models.zoo import preset_config

    out = []
    for row in (PAPER_ROWS if rows is None else rows):
        t0 = time.perf_counter()
        size = row["size"]
        shape = (1, 3, size, size)
        # the heads with transformer learners take cache_kv; the conv baselines have no K/V
        has_kv = preset_config(row["preset"], **row["overrides"])["arch"] in ("senformer", "fusion")
        overrides = {**row["overrides"], "cache_kv": False} if has_kv else dict(row["overrides"])
        model = build_meta(row["preset"], num_classes=num_classes, **overrides)
        p_aux, p_noaux = count_params(model, True), count_params(model, False)
        macs = flops_mmcv(model, shape)
        total = flops_full(model, shape) if full else None
        macs_cached = total_cached = None
        if has_kv and cached:
            model_cached = build_meta(row["preset"], num_classes=num_classes, **{**overrides, "cache_kv": True})
            macs_cached = flops_mmcv(model_cached, shape)
            total_cached = flops_full(model_cached, shape) if full else None
        params_cmp = p_aux if row["paper_params_include_aux"] else p_noaux
        out.append(dict(
            name=row["name"], table=row["table"], preset=row["preset"], overrides=row["overrides"],
            input=f"{size}x{size}", params_with_aux=p_aux, params_without_aux=p_noaux,
            paper_params_include_aux=row["paper_params_include_aux"],
            flops_mmcv=macs, flops_mmcv_cache_kv=macs_cached, flops_full=total,
            flops_full_cache_kv=total_cached,
            paper_params_m=row["paper_params_m"], paper_flops_g=row["paper_flops_g"],
            params_rel_err=_rel(params_cmp / 1e6, row["paper_params_m"]),
            flops_rel_err=_rel(macs / 1e9, row["paper_flops_g"]), note=row.get("note"),
            seconds=time.perf_counter() - t0,
        ))
    return out


def _fmt(x, scale, digits=1):
    return "-" if x is None else f"{x / scale:.{digits}f}"


def _pct(x):
    return "-" if x is None else f"{100 * x:+.1f}%"


def markdown_table(rows: list[dict]) -> str:
    """The rows of :func:`paper_table` as a markdown table (M params, G MACs / G FLOPs)."""
    head = ("| model | table | input | params M (aux / no aux) | paper params M | err | "
            "MACs G (mmcv, recompute K/V) | paper FLOPs G | err | MACs G (cache_kv) | saved | "
            "full FLOPs G (FlopCounterMode; recompute / cache_kv) |")
    lines = [head, "|" + "---|" * 12]
    misses = []
    for r in rows:
        p_err, f_err = r["params_rel_err"], r["flops_rel_err"]
        if (p_err is not None and abs(p_err) > PARAMS_TOL) or (f_err is not None and abs(f_err) > FLOPS_TOL):
            misses.append(f"- {r['name']}: outside the {PARAMS_TOL:.0%} params / {FLOPS_TOL:.0%} FLOPs tolerance"
                          + (f"; {r['note']}." if r.get("note") else "."))
        a, n = _fmt(r["params_with_aux"], 1e6), _fmt(r["params_without_aux"], 1e6)
        params = f"**{a}** / {n}" if r["paper_params_include_aux"] else f"{a} / **{n}**"
        cached, saved = "-", "-"
        if r["flops_mmcv_cache_kv"] is not None:
            cached = _fmt(r["flops_mmcv_cache_kv"], 1e9)
            saved = f"{100 * (1 - r['flops_mmcv_cache_kv'] / r['flops_mmcv']):.0f}%"
        full = _fmt(r["flops_full"], 1e9)
        if r.get("flops_full_cache_kv") is not None:
            full += " / " + _fmt(r["flops_full_cache_kv"], 1e9)
        lines.append(
            f"| {r['name']} | {r['table']} | {r['input']} | {params} | {_fmt(r['paper_params_m'], 1, 0)} | "
            f"{_pct(r['params_rel_err'])} | {_fmt(r['flops_mmcv'], 1e9)} | {_fmt(r['paper_flops_g'], 1, 0)} | "
            f"{_pct(r['flops_rel_err'])} | {cached} | {saved} | {full} |")
    notes = [
        "Params: the bold figure is the one compared with the paper -- with the auxiliary FCN head "
        "(training only) where the paper's figure includes it, without it where it does not "
        "(SenFormer-R50 with a repeated or single block, and the fusion baseline). One image, ADE20K's "
        "150 classes, the preset's crop size.",
        "MACs (mmcv): multiply-accumulates of conv/linear/norm/ReLU/pool/upsample modules as mmcv's "
        "`get_model_complexity_info` counts them (the paper's \"FLOPs\"); attention matmuls and "
        "functional ops are not counted. Recompute K/V = the paper's path (`cache_kv=False`); "
        "cache_kv = K/V of the pixel tokens projected once per learner and reused by every "
        "repeated block (our default), same outputs.",
        "Full FLOPs: `torch.utils.flop_counter.FlopCounterMode`, 2 FLOPs per MAC of every matmul "
        "and convolution, attention included, on the paper's recompute path and with `cache_kv`.",
        "Generated by `python -m senformer.flops --write-readme`.",
    ]
    parts = ["\n".join(lines)] + (["\n".join(misses)] if misses else []) + notes
    return "\n\n".join(parts)


_START, _END = "<!-- flops-table:start -->", "<!-- flops-table:end -->"


def _default_readme() -> pathlib.Path:
    """The checkout's README.md when the package runs from a source tree, else ./README.md."""
    root = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    return root if root.exists() else pathlib.Path("README.md")


def write_readme(table_md: str, path: str | pathlib.Path | None = None) -> None:
    """Replace the block between the flops-table markers of ``path`` (default: the checkout's
    README.md); the markers are appended under a "Parameters and FLOPs" heading if absent."""
    path = _default_readme() if path is None else pathlib.Path(path)
    text = path.read_text() if path.exists() else ""
    if _START in text and _END in text:
        pre, rest = text.split(_START, 1)
        _, post = rest.split(_END, 1)
    else:
        pre, post = text.rstrip("\n") + "\n\n## Parameters and FLOPs\n\n", "\n"
    path.write_text(f"{pre}{_START}\n{table_md}\n{_END}{post}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m senformer.flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-readme", nargs="?", const="", default=None, metavar="PATH",
                        help="replace the flops-table block of the checkout's README.md (or of PATH)")
    parser.add_argument("--only", default=None, help="comma-separated substrings of row names to keep")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    rows = PAPER_ROWS
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
        rows = [r for r in rows if any(k in r["name"].lower() for k in keys)]
        if not rows:
            parser.error(f"--only {args.only!r} matches no row; rows: {', '.join(r['name'] for r in PAPER_ROWS)}")
    counted = paper_table(rows)
    table = markdown_table(counted)
    print(table)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(counted, indent=1) + "\n")
    if args.write_readme is not None:
        path = _default_readme() if args.write_readme == "" else pathlib.Path(args.write_readme)
        write_readme(table, path)
        print(f"wrote the table into {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
