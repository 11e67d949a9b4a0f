"""Markdown tables and PNG plots drawn from a stored results JSON (never from live objects), so any
past run can be re-rendered: ``python benchmarks/report.py benchmarks/results/<file>.json``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import targets


def _load(path) -> dict:
    return json.loads(Path(path).read_text())


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def _ms(x: float) -> str:
    """Three significant digits, without an exponent for the seconds-long ideals of whole models."""
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def header(env: dict) -> str:
    load = env.get("loadavg_start")
    return (f"**{env.get('device_name')}** ({env.get('device')}), torch {env.get('torch')}, triton {env.get('triton')}, "
            f"CUDA {env.get('cuda') or '-'}, python {env.get('python')}, {env.get('date')}, commit {env.get('commit') or '-'}, "
            f"{'`--quick`' if env.get('quick') else 'full run'}, {env.get('threads')} torch threads / "
            f"{env.get('cpu_count')} cores" + (f", load average {load[0]} at start" if load else "")
            + f", senformer._C {'loaded' if env.get('extension_loaded') else 'not built'}"
            + (f" (CPU clone {env['cpu_isa']})" if env.get("cpu_isa") else "") + ".")


def ceilings_md(c: dict) -> str:
    lines = ["| dtype | copy GB/s | matmul | TFLOP/s |", "|---|---|---|---|"]
    for d, v in c.items():
        m = v["matmul"]
        lines.append(f"| {d} | {v['copy']['gbps']:.1f} | {m['n']}x{m['n']} {m['dtype']} | {m['tflops']:.3f} |")
    return "\n".join(lines)


def models_md(rows: list) -> str:
    lines = ["| model | input | params M (aux / no aux) | paper params M | MACs G (mmcv, recompute K/V) | "
             "MACs G (cache_kv) | paper FLOPs G | full GFLOPs (recompute) | full GFLOPs (cache_kv) |",
             "|" + "---|" * 9]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r.get('name', '-')} | {r['status']}: {r.get('note', '')} |" + " |" * 7)
            continue
        g = lambda k: _f(r.get(k) and r[k] / 1e9, "{:.1f}")  # noqa: E731
        lines.append(f"| {r['name']} | {r['input']} | {r['params_with_aux'] / 1e6:.1f} / {r['params_without_aux'] / 1e6:.1f} | "
                     f"{_f(r['paper_params_m'], '{}')} | {g('flops_mmcv')} | {g('flops_mmcv_cache_kv')} | "
                     f"{_f(r['paper_flops_g'], '{}')} | {g('flops_full')} | {g('flops_full_cache_kv')} |")
    return "\n".join(lines)


def ops_md(rows: list) -> str:
    lines = ["| op | shape | dtype | mode | backend | median ms [20%, 80%] | peak MiB | MB moved | GFLOP | "
             "ideal ms (bound) | % of limit | GB/s, TFLOP/s | x eager ref | rel err | note |", "|" + "---|" * 15]
    for r in rows:
        t = (f"{r['median_ms']:.3f} [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]" if r.get("median_ms") is not None else r["status"])
        ideal = f"{_ms(r['ideal_ms'])} ({r['bound']})" if r.get("ideal_ms") is not None else "-"
        rate = "-" if r.get("gbps") is None else f"{r['gbps']:.3g}" + (f", {r['tflops']:.3g}" if r.get("tflops") else "")
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['backend']} | {t} | "
                     f"{_f(r.get('peak_mib'), '{:.1f}')} | {_f(r.get('bytes') and r['bytes'] / 1e6, '{:.3g}')} | "
                     f"{_f(r.get('flops') and r['flops'] / 1e9, '{:.3g}')} | {ideal} | "
                     f"{_f(r.get('pct_of_limit'), '{:.3g}%')} | {rate} | {_f(r.get('speedup_vs_reference'))} | "
                     f"{_f(r.get('rel_err'), '{:.1e}')} | {r.get('note', '') if r['status'] != 'ok' else ''} |")
    return "\n".join(lines)


def e2e_md(rows: list) -> str:
    lines = ["| model | ops | input | classes | batch | dtype | train img/s (% of limit) | train GFLOP/step, ideal ms | "
             "train peak MiB | infer img/s (% of limit) | infer GFLOP/batch, ideal ms | infer peak MiB | first step s | note |",
             "|" + "---|" * 14]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r.get('preset', '-')} | {r.get('variant', '-')} | {r.get('size', '-')} | "
                         f"{r.get('num_classes', '-')} | {r.get('batch', '-')} | - | - | - | - | - | - | - | - | "
                         f"{r['status']}: {r.get('note', '')} |")
            continue
        cells = []
        for k in ("train", "infer"):
            pct = r.get(f"{k}_pct_of_limit")
            cells.append(f"{r[f'{k}_images_s']:.2f}" + (f" ({pct:.1f}%)" if pct is not None else ""))
            cells.append("-" if r.get(f"{k}_flops") is None else
                         f"{r[f'{k}_flops'] / 1e9:.1f}, {_ms(r[f'{k}_ideal_ms'])}")
            cells.append(_f(r[f"{k}_peak_mib"], "{:.0f}"))
        lines.append(f"| {r['preset']} | {r['variant']} | {r['size']}x{r['size']} | {r['num_classes']} | {r['batch']} | "
                     f"{r['dtype']} | {' | '.join(cells)} | {_f(r.get('first_step_s'), '{:.1f}')} | "
                     f"{r.get('roofline_note', '')} |")
    return "\n".join(lines)


NOTES = """Time: median and 20/80 quantiles; CUDA: `triton.testing.do_bench` (kernels) or CUDA events
(end to end); CPU: `time.perf_counter`. Peak memory: CUDA `max_memory_allocated` (kernels: beyond
the inputs; end to end: everything allocated, as mmsegmentation reports); CPU: the torch profiler's
allocation events (`profile_memory=True`), plus the live weights/gradients/optimizer state/batch
for end to end. Roofline: "MB moved" = the bytes that must move (each input read once, each output
written once; fwd+bwd adds the upstream gradient and the input gradients), "GFLOP" = the matmuls'
algorithmic FLOPs (attention backward 2.5x forward, as FlashAttention counts; the loss and predict
do no matmul), "ideal ms" = max(bytes / copy GB/s, FLOPs / matmul TFLOP/s) on the ceilings
measured in this run, (bound) = the larger term, "% of limit" = ideal / median (100% = at the
device's limit). End to end: the FLOPs of one training step (forward + loss + backward) and of one
inference batch, from `FlopCounterMode` on the reference path, ideal on the matmul ceiling.
`x eager ref` = eager reference time / this time. rel err = ||out - ref64|| / ||ref64|| against
the reference in float64: of the output on fwd rows, of all input gradients on fwd+bwd rows
(ensemble_predict: fraction of differing labels). On CPU the `triton` backend is the Triton
interpreter: checked and measured for memory, never timed; `triton[<variant>]` = an older design
of the Triton kernel, kept for comparison. "fused" = automatic op backends, "reference" =
`use_backend("reference")`, "compile" = `torch.compile` of the model on the reference path.
"first step s" = the first training step (optimizer state, autotuning, compilation), left out of
the throughput."""


def markdown(result: dict) -> str:
    parts = ["## senformer benchmarks", "", header(result["env"]), ""]
    if result.get("ceilings"):
        parts += ["### Ceilings (measured in this run)", "", ceilings_md(result["ceilings"]), ""]
    if result.get("models"):
        parts += ["### Models: params and FLOPs (meta device)", "", models_md(result["models"]), ""]
    if targets.on_cuda(result):  # the targets are GPU targets: a CPU run measures none
        parts += ["### Targets", "", targets.markdown(result), ""]
    if result.get("ops"):
        parts += ["### Kernels", "", ops_md(result["ops"]), ""]
    if result.get("e2e"):
        auto = result["env"].get("auto_backends")
        where = (", ".join(f"{k}: {v}" for k, v in auto.items()) if isinstance(auto, dict) else auto)
        parts += ["### End to end", "", e2e_md(result["e2e"]), "",
                  f"\"fused\" resolved to: {where or 'not recorded'}. Where every op resolves to `reference`, "
                  "fused and reference rows run the same code and differ by noise only.", ""]
    parts += [NOTES, ""]
    return "\n".join(parts)


def summary(result: dict) -> str:
    """README-sized view of one run: header, ceilings, kernel rows that ran (skipped ones left
    out), end-to-end rows; the full tables stay in the markdown beside the JSON."""
    ran = [r for r in result.get("ops", []) if r.get("status") in ("ok", "untimed")]
    parts = [header(result["env"]), ""]
    if result.get("ceilings"):
        parts += [ceilings_md(result["ceilings"]), ""]
    if ran:
        parts += [ops_md(ran), ""]
    if result.get("e2e"):
        parts += [e2e_md([r for r in result["e2e"] if r.get("status") == "ok"]), ""]
    return "\n".join(parts)


def write_markdown(json_path) -> Path:
    json_path = Path(json_path)
    md = json_path.with_suffix(".md")
    md.write_text(markdown(_load(json_path)))
    return md


# ---------------------------------------------------------------- plots
def plot(json_path) -> list[Path]:
    """PNG plots beside the JSON; [] when matplotlib is not importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    json_path = Path(json_path)
    result = _load(json_path)
    title = f"{result['env'].get('device_name')} - torch {result['env'].get('torch')} - {result['env'].get('date')}"
    out = []
    if result.get("ops"):
        out.append(_plot_ops(plt, result["ops"], json_path.with_name(json_path.stem + "-ops.png"), title))
    if result.get("e2e") and any(r.get("status") == "ok" for r in result["e2e"]):
        out.append(_plot_e2e(plt, result["e2e"], json_path.with_name(json_path.stem + "-e2e.png"), title))
    if result.get("models") and any(r.get("status") == "ok" for r in result["models"]):
        out.append(_plot_models(plt, result["models"], json_path.with_name(json_path.stem + "-models.png"), title))
    return [p for p in out if p is not None]


def _plot_ops(plt, rows, path, title):
    """Speedup over the eager reference per backend and shape (linear, 1 = reference): bars of
    raw times on a log axis exaggerate small differences."""
    timed = [r for r in rows if r.get("speedup_vs_reference") is not None]
    if not timed:
        return None
    panels = sorted({(r["op"], r["mode"], r["dtype"]) for r in timed})
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for ax, (op, mode, dtype) in zip(axes[:, 0], panels):
        sub = [r for r in timed if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
        shapes = list(dict.fromkeys(r["shape"] for r in sub))
        backends = list(dict.fromkeys(r["backend"] for r in sub))
        width = 0.8 / len(backends)
        for j, b in enumerate(backends):
            pts = [(i, r["speedup_vs_reference"]) for i, s in enumerate(shapes)
                   for r in sub if r["backend"] == b and r["shape"] == s]
            ax.bar([i + j * width for i, _ in pts], [v for _, v in pts], width, label=b)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=7)
        ax.set_ylabel("x eager reference")
        ax.set_title(f"{op} {mode} {dtype}", fontsize=9)
        ax.legend(fontsize=7, ncol=4)
    _save(fig, path, title)
    return path


def _save(fig, path, title):
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt
    plt.close(fig)


def _plot_e2e(plt, rows, path, title):
    ok = [r for r in rows if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    base = [r for r in ok if r["group"] == "base"]
    labels = [f"{r['preset'].replace('senformer_', '')}\n{r['variant']}" for r in base]
    xs = range(len(base))
    axes[0].bar([x - 0.2 for x in xs], [r["train_images_s"] for r in base], 0.4, label="train")
    axes[0].bar([x + 0.2 for x in xs], [r["infer_images_s"] for r in base], 0.4, label="inference")
    axes[0].set_xticks(list(xs), labels, fontsize=7)
    axes[0].set_ylabel("images / s")
    axes[0].legend(fontsize=7)
    axes[0].set_title("base size, 150 classes", fontsize=9)
    for ax, key, group, xlabel in ((axes[1], "size", "size", "input side (px)"),
                                   (axes[2], "num_classes", "classes", "classes")):
        for preset in dict.fromkeys(r["preset"] for r in ok):
            for variant in ("fused", "reference"):
                base_pts = [r for r in base if r["preset"] == preset and r["variant"] == variant]
                pts = sorted(base_pts + [r for r in ok if r["group"] == group and r["preset"] == preset
                                         and r["variant"] == variant], key=lambda r: r[key])
                if len(pts) > 1:
                    ax.plot([r[key] for r in pts], [r["infer_images_s"] for r in pts], marker="o",
                            label=f"{preset.replace('senformer_', '')} {variant}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("inference images / s")
        if ax.lines:
            ax.legend(fontsize=7)
    _save(fig, path, title)
    return path


def _plot_models(plt, rows, path, title):
    ok = [r for r in rows if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ok)), 4))
    xs = range(len(ok))
    series = (("paper", lambda r: r["paper_flops_g"]), ("mmcv, recompute K/V", lambda r: r["flops_mmcv"] / 1e9),
              ("mmcv, cache_kv", lambda r: (r["flops_mmcv_cache_kv"] or 0) / 1e9))
    for j, (name, get) in enumerate(series):
        ax.bar([x + (j - 1) * 0.27 for x in xs], [get(r) or 0 for r in ok], 0.27, label=name)
    ax.set_xticks(list(xs), [r["name"].replace("SenFormer ", "") for r in ok], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("G MACs (paper 'FLOPs')")
    ax.legend(fontsize=7)
    _save(fig, path, title)
    return path


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:  # the README's view of a stored run
        print(summary(_load(sys.argv[2])))
    else:
        for p in sys.argv[1:]:
            print(write_markdown(p), *plot(p))
