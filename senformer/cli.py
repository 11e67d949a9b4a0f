"""Console entry points: senformer-train, senformer-eval, senformer-predict, senformer-export,
senformer-convert. Argument parsing only; torch and the engine are imported after parsing, so that
``--help`` answers at once."""
from __future__ import annotations

import argparse
import json
import os
import sys

MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _pair(text):
    parts = [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected N or H,W (positive ints), got {text!r}")
    return parts


def _int_at_least(lo):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v
    return parse


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


_POSITIVE, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def _floats(text):
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def _subsets(text):
    """'0,1;2' -> [(0,1),(2,)]"""
    try:
        out = [tuple(int(i) for i in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"learner subsets look like '0,1;0,2;3', got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("no learner subset given")
    return out


def _threads():
    # a CPU run on a shared machine should not spawn a thread per core in every worker process
    if "OMP_NUM_THREADS" in os.environ:
        import torch
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))


def _data_overrides(args, resetting=True):
    ov = []
    if getattr(args, "dataset", None):
        ov.append(("data.dataset", args.dataset))
        # the built-in default's shapes options mean nothing to a real dataset (a resumed run keeps its own)
        if args.dataset != "shapes" and resetting:
            ov += [("data.options", {}), ("data.train_options", {}), ("data.val_options", {})]
    if getattr(args, "data_root", None):
        ov.append(("data.root", args.data_root))
    if getattr(args, "classes", None):
        ov.append(("data.options.classes", args.classes))
    return ov


class _Help(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" only where it tells something: not for None/False defaults (flags, values
    taken from the config) and not where the help text already speaks of the default; keeps the
    epilog's line breaks (the preset lists)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or action.default == [] or "default" in text
                or "%(default)" in text or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _presets_epilog():
    from .engine.config import available_configs
    from .models.presets import list_models
    models = list_models()
    width = max(map(len, models))
    return ("model presets (--model; also senformer.list_models()):\n"
            + "\n".join(f"  {name:<{width}}  {text}" for name, text in models.items())
            + "\n\nrun presets (the CONFIG argument; configs/*.yaml):\n  "
            + "\n  ".join(_wrap(", ".join(available_configs()), 96)))


def _wrap(text, width):
    import textwrap
    return textwrap.wrap(text, width)


def _fail(parser, err):
    parser.exit(2, f"{parser.prog}: error: {err}\n")


def _debug_option(p):
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")


def _guarded(parser, args, body):
    """Run ``body()``; a user error (bad value, missing or corrupt file, bad dataset) becomes one line on
    stderr and exit status 2, Ctrl-C outside the training loop exit 130; ``--debug`` re-raises."""
    from .engine import distributed as du
    try:
        return body()
    except (ValueError, FileNotFoundError) as e:  # senformer.errors.UserError is a ValueError
        if args.debug or du.world_size() > 1:
            raise
        _fail(parser, e)
    except KeyboardInterrupt:
        if args.debug:
            raise
        parser.exit(130, f"\n{parser.prog}: interrupted\n")


# ---------------------------------------------------------------- train
def train_parser():
    p = argparse.ArgumentParser(
        prog="senformer-train",
        description="Train SenFormer. With no arguments: the small CPU preset (senformer_tiny) on the built-in "
                    "procedural 'shapes' dataset, a few minutes on a laptop CPU, then the validation mIoU. "
                    "Multi-GPU / multi-node: torchrun --nproc_per_node=N -m senformer.cli train ...",
        epilog=_presets_epilog(), formatter_class=_Help)
    p.add_argument("config", nargs="?", default=None,
                   help="YAML preset: a path or a name in configs/ (e.g. ade20k_r50); default: built-in shapes_tiny")
    p.add_argument("--work-dir", help="output folder (checkpoints, train.log, scalars.csv); default ./work_dirs/<name>")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue the run in the work dir (or CKPT: a work dir or checkpoint) exactly where its latest "
                        "checkpoint left it, with its saved config; only --iters, --data-root, --num-workers, --device "
                        "and eval/checkpoint/log settings may change")
    p.add_argument("--iters", type=_POSITIVE, help="total training iterations (schedule.iters)")
    p.add_argument("--batch-size", type=_POSITIVE, help="global batch size, split across DDP processes (data.batch_size)")
    p.add_argument("--lr", type=_positive_float, help="base learning rate (optim.lr)")
    p.add_argument("--crop-size", type=_pair, help="training crop, N or H,W (data.crop_size)")
    p.add_argument("--dataset", help="shapes | ade20k | cityscapes | pascal_context59 | coco_stuff10k | folder")
    p.add_argument("--data-root", help="dataset root folder (data.root)")
    p.add_argument("--classes", help="folder dataset: class-name file, one per line (data.options.classes)")
    p.add_argument("--model", help="model preset, e.g. senformer_tiny, senformer_r50, toy (model.preset)")
    p.add_argument("--pretrained", help="local file of pretrained backbone weights (model.pretrained); a whole-model "
                                        "checkpoint is refused with the call that loads it")
    p.add_argument("--num-workers", type=_NON_NEGATIVE, help="data-loading worker processes per training process")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device (default from config: auto)")
    p.add_argument("--seed", type=_NON_NEGATIVE, help="random seed")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on GPU")
    p.add_argument("--eval-interval", type=_NON_NEGATIVE, help="evaluate every N iterations (0: only at the end)")
    p.add_argument("--checkpoint-interval", type=_NON_NEGATIVE, help="checkpoint every N iterations")
    p.add_argument("--keep-last", type=_NON_NEGATIVE, help="keep only the last K checkpoints")
    p.add_argument("--stop-after", type=_POSITIVE, metavar="STEP",
                   help="stop after STEP iterations with a checkpoint (continue later with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, YAML-parsed, e.g. --set optim.weight_decay=0.01 --set eval.mode=slide")
    p.add_argument("--check-data", action="store_true",
                   help="decode every label map before training (always: image/label sizes of every pair and the "
                        "labels of a sample)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _debug_option(p)
    return p


def train_main(argv=None):
    parser = train_parser()
    args = parser.parse_args(argv)
    _threads()
    return _guarded(parser, args, lambda: _train(args))


def _train(args):
    from .engine.config import load_config, parse_override
    flags = {"schedule.iters": args.iters, "data.batch_size": args.batch_size, "optim.lr": args.lr,
             "data.crop_size": args.crop_size, "model.preset": args.model, "model.pretrained": args.pretrained,
             "data.num_workers": args.num_workers, "device": args.device, "seed": args.seed,
             "eval.interval": args.eval_interval, "checkpoint.interval": args.checkpoint_interval,
             "checkpoint.keep_last": args.keep_last}
    ov = (_data_overrides(args, resetting=not args.resume) + [(k, v) for k, v in flags.items() if v is not None]
          + [parse_override(o) for o in args.overrides] + ([("amp", False)] if args.no_amp else []))
    ckpt, work_dir = None, args.work_dir
    if args.resume:
        from .engine.resume import resume_run
        cfg, ckpt, work_dir = resume_run(args.config, args.resume, args.work_dir, ov)
    else:
        cfg = load_config(args.config, ov)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    from .engine import distributed as du
    from .engine.trainer import train
    try:
        res = train(cfg, work_dir=work_dir, resume=ckpt, stop_after=args.stop_after, progress=not args.no_progress,
                    check_data=args.check_data)
    finally:
        du.cleanup()
    if res["interrupted"]:
        import signal
        print(f"interrupted by {signal.Signals(res['interrupted']).name} at step {res['step']}, checkpoint written to "
              f"{res['checkpoint']}; resume with senformer-train --resume --work-dir {res['work_dir']}",
              file=sys.stderr)
        return 128 + res["interrupted"]
    return 0


# ---------------------------------------------------------------- eval / predict / export shared
CHECKPOINT_HELP = ("a run's work dir (its latest checkpoint), a checkpoint folder, a save_pretrained folder, a "
                   ".safetensors file (senformer-train / senformer-convert) or an official SenFormer / mmseg .pth")


def _checkpoint_arguments(p, nargs="?", option_help="the checkpoint given as an option instead"):
    """The checkpoint as a positional and as -c/--checkpoint (``_checkpoint_argument`` reconciles them)."""
    p.add_argument("checkpoint", nargs=nargs, help=CHECKPOINT_HELP)
    p.add_argument("--checkpoint", "-c", dest="checkpoint_option", metavar="CHECKPOINT", help=option_help)


def _checkpoint_argument(parser, args, paths_attr=None):
    """eval, predict and export take the checkpoint first, as a positional, or as -c/--checkpoint."""
    if args.checkpoint_option is not None:
        if paths_attr is None and args.checkpoint is not None:
            _fail(parser, f"two checkpoints given: {args.checkpoint} and -c {args.checkpoint_option}")
        if paths_attr is not None:
            setattr(args, paths_attr, [args.checkpoint] + getattr(args, paths_attr)
                    if args.checkpoint is not None else getattr(args, paths_attr))
        args.checkpoint = args.checkpoint_option
    if args.checkpoint is None:
        _fail(parser, "no checkpoint given (the first positional argument, or -c CHECKPOINT)")
    if paths_attr is not None and not getattr(args, paths_attr):
        _fail(parser, "no input images given: senformer-predict CHECKPOINT IMAGE_OR_FOLDER [...]")


def _inference_options(p):
    p.add_argument("--config", help="YAML preset to build the model from (default: the config saved in the checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.scale=[1024,512]")
    p.add_argument("--mode", choices=["whole", "slide"], help="whole-image or sliding-window inference")
    p.add_argument("--crop-size", type=_pair, help="sliding-window size, N or H,W (default: the training crop)")
    p.add_argument("--stride", type=_pair, help="sliding-window stride, N or H,W (default: 2/3 of the window)")
    p.add_argument("--scale", type=_pair, help="base test scale (long,short edge) (default: data.scale)")
    p.add_argument("--ms", action="store_true",
                   help=f"multi-scale + flip, the paper's +MS: ratios {','.join(map(str, MS_RATIOS))} and flip")
    p.add_argument("--scales", type=_floats, help="test scale ratios, comma-separated, e.g. 0.75,1,1.25")
    p.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--merge", help="how learners are merged: mean | product | vote (default: the model's own)")
    p.add_argument("--protocol", choices=["official", "fast"],
                   help="test arithmetic (default: eval.protocol of the config, official): official = mmseg 0.20's, "
                        "which produced the paper's numbers (OpenCV resize, softmax of the summed learner "
                        "probabilities after resizing, unpadded small windows, fp32); fast = senformer's own "
                        "(mean of softmaxes resized once, fused prediction, Pillow resize, bf16 on GPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device")


def _load_for_inference(args):
    from .engine.config import parse_override
    from .engine.loading import load_for_inference
    ov = _data_overrides(args) + [parse_override(o) for o in args.overrides]
    for key, value in (("eval.mode", args.mode), ("eval.crop_size", args.crop_size), ("eval.stride", args.stride),
                       ("data.scale", args.scale), ("eval.merge", args.merge), ("eval.protocol", args.protocol)):
        if value:
            ov.append((key, value))
    if args.ms:
        ov += [("eval.scales", list(MS_RATIOS)), ("eval.flip", True)]
    if args.scales:
        ov.append(("eval.scales", args.scales))
    if args.flip:
        ov.append(("eval.flip", True))
    return load_for_inference(args.checkpoint, args.config, ov, args.device)


# ---------------------------------------------------------------- eval
def eval_parser():
    p = argparse.ArgumentParser(
        prog="senformer-eval",
        description="Evaluate a trained SenFormer checkpoint: mIoU / per-class IoU / aAcc of the ensemble, "
                    "optionally of each learner and learner subsets (paper Table 1), per-pixel variance "
                    "(Table 11) and the class-embedding cosine-similarity histogram (Figure 4).",
        formatter_class=_Help)
    _checkpoint_arguments(p)
    p.add_argument("--dataset", help="evaluate on another dataset than the one trained on")
    p.add_argument("--data-root", help="dataset root folder")
    p.add_argument("--classes", help="folder dataset: class-name file")
    p.add_argument("--split", default=None, help="dataset split (default: data.val_split, usually val)")
    _inference_options(p)
    p.add_argument("--per-learner", action="store_true", help="also the mIoU of each learner alone")
    p.add_argument("--learners", type=_subsets, metavar="SUBSETS",
                   help="learner subsets to score, e.g. '0,1;0,2,3' (0 = finest learner)")
    p.add_argument("--all-subsets", action="store_true", help="every non-empty learner subset (Table 1)")
    p.add_argument("--variance", action="store_true", help="mean per-pixel variance of each learner and the ensemble")
    p.add_argument("--similarity-plot", metavar="PNG", help="write the class-embedding cosine-similarity histogram")
    p.add_argument("--limit", type=_POSITIVE, help="evaluate only the first N images")
    p.add_argument("--out", metavar="JSON", help="write all results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _debug_option(p)
    return p


def eval_main(argv=None):
    parser = eval_parser()
    args = parser.parse_args(argv)
    _checkpoint_argument(parser, args)
    _threads()
    return _guarded(parser, args, lambda: _eval(args))


def _eval(args):
    from .engine.evaluate import evaluate_checkpoint
    cfg, classes, model, device, ek, _ = _load_for_inference(args)
    res, n_images = evaluate_checkpoint(
        model, cfg, classes, device, ek, split=args.split, per_learner=args.per_learner, subsets=args.learners,
        all_subsets=args.all_subsets, variance=args.variance, similarity_plot=args.similarity_plot,
        limit=args.limit, progress=not args.no_progress)
    e = res["ensemble"]
    print(f"ensemble: mIoU {e['mIoU'] * 100:.2f}  mAcc {e['mAcc'] * 100:.2f}  aAcc {e['aAcc'] * 100:.2f}  "
          f"({n_images} images, {ek['protocol']} protocol, mode {ek['mode']}, "
          f"scales {list(ek['ratios'])}{' +flip' if ek['flip'] else ''})")
    width = max(len(c) for c in classes)
    for c, v in zip(classes, e["IoU"]):
        print(f"  {c:<{width}}  {'  n/a' if v != v else f'{v * 100:5.2f}'}")
    for i, r in enumerate(res.get("learners", [])):
        print(f"learner {i}: mIoU {r['mIoU'] * 100:.2f}")
    for name, r in res.get("subsets", {}).items():
        print(f"learners {name}: mIoU {r['mIoU'] * 100:.2f}")
    for name, v in res.get("variance", {}).items():
        print(f"variance {name}: {v:.3e}")
    if args.similarity_plot:
        print(f"class-embedding similarity histogram: {args.similarity_plot}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"classes": list(classes), **res}, f, indent=1)
    return 0


# ---------------------------------------------------------------- predict
def predict_parser():
    p = argparse.ArgumentParser(
        prog="senformer-predict", usage="%(prog)s CHECKPOINT INPUT [INPUT ...] [options]",
        description="Segment images: writes <out>/label/*.png (class ids), <out>/color/*.png (palette PNGs), "
                    "<out>/overlay/*.png (image blended with the colour map), <out>/legend.png (class name and "
                    "colour of the classes found) and <out>/classes.json (id, name, colour, pixel count).",
        formatter_class=_Help)
    _checkpoint_arguments(p, None, "the checkpoint given as an option instead (then every positional is an input)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files and/or folders of images")
    p.add_argument("--out-dir", "-o", default="predictions", help="output folder")
    p.add_argument("--learners", type=_subsets, metavar="SUBSET", help="predict with this learner subset only, e.g. '0,2'")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colour map")
    p.add_argument("--outputs", default="label,color,overlay", help="which of label,color,overlay to write")
    p.add_argument("--legend", choices=["present", "all", "none"], default="present",
                   help="legend.png rows: the classes found in the predictions, every class, or no legend")
    _inference_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _debug_option(p)
    return p


def predict_main(argv=None):
    parser = predict_parser()
    args = parser.parse_args(argv)
    _checkpoint_argument(parser, args, "inputs")
    _threads()
    outputs = tuple(o.strip() for o in args.outputs.split(",") if o.strip())
    bad = [o for o in outputs if o not in ("label", "color", "overlay")]
    if bad or not outputs:
        _fail(parser, f"--outputs: unknown kind(s) {bad}; choose from label,color,overlay")
    if not 0 <= args.alpha <= 1:
        _fail(parser, f"--alpha must be in [0, 1], got {args.alpha}")
    if args.learners and len(args.learners) > 1:
        _fail(parser, "--learners takes a single subset for prediction, e.g. '0,2'")
    args.dataset = args.data_root = args.classes = None

    def body():
        from .engine.predict import collect_images, predict_files
        files = collect_images(args.inputs)
        cfg, classes, model, device, ek, palette = _load_for_inference(args)
        ek.pop("ignore_index")
        written = predict_files(model, files, args.out_dir, palette, device=device,
                                learners=args.learners[0] if args.learners else None, alpha=args.alpha,
                                outputs=outputs, classes=classes, legend=args.legend,
                                progress=not args.no_progress, **ek)
        extra = "" if args.legend == "none" else ", legend.png"
        print(f"wrote {len(written)} prediction(s) to {args.out_dir}/{{{','.join(outputs)}}}, classes.json{extra}")
        return 0
    return _guarded(parser, args, body)


# ---------------------------------------------------------------- export
def export_parser():
    p = argparse.ArgumentParser(
        prog="senformer-export",
        description="Export the evaluation model to ONNX (and optionally a torch.export program). The graph takes "
                    "'image', a float32 RGB batch (B,3,H,W) with values 0..255, normalises it inside, and returns "
                    "'probs' (B,N,H,W) and 'labels' (B,H,W): the official test protocol's single-scale "
                    "whole-image view. Test-time resizing, sliding windows and multi-scale/flip stay outside the "
                    "graph. The export is checked with onnxruntime against eager PyTorch.",
        formatter_class=_Help)
    _checkpoint_arguments(p)
    p.add_argument("output", nargs="?", metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--size", type=_POSITIVE, nargs=2, metavar=("H", "W"),
                   help="input size the graph is traced at (default: the training crop of the run config)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--opset", type=_POSITIVE, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--program", metavar="OUT.pt2", help="also save a torch.export program of the same module")
    _debug_option(p)
    return p


def export_main(argv=None):
    parser = export_parser()
    args = parser.parse_args(argv)
    if args.checkpoint_option is not None and args.output is None:
        args.checkpoint, args.output = None, args.checkpoint
    _checkpoint_argument(parser, args)
    if args.output is None:
        _fail(parser, "no output file given: senformer-export CHECKPOINT OUT.onnx")
    _threads()

    def body():
        from .engine.export import export_onnx, export_program
        from .engine.pretrained import load
        model = load(args.checkpoint, device="cpu")
        size = tuple(args.size or model.config["data"]["crop_size"])
        info = export_onnx(model, args.output, size=size, dynamic=args.dynamic, opset=args.opset,
                           check=not args.no_check)
        print(_export_summary(info))
        if args.program:
            import torch
            torch.export.save(export_program(model, size=size, dynamic=args.dynamic), args.program)
            print(f"torch.export program: {args.program}")
        return 0
    return _guarded(parser, args, body)


def _export_summary(info):
    h, w = info["size"]
    line = (f"wrote {info['path']} ({info['file_bytes'] / 2**20:.1f} MiB, traced at {h}x{w}, "
            f"{'dynamic batch/height/width' if info['dynamic'] else 'fixed shape'}, opset {info['opset']})")
    runs = info.get("check")
    if not isinstance(runs, list):
        return f"{line}; onnxruntime check: {runs}"
    shapes = ", ".join("x".join(map(str, r["input"])) for r in runs)
    differ = sum(r["labels_differ"] for r in runs)
    return (f"{line}; onnxruntime vs PyTorch on {shapes}: max relative error {info['max_rel_err']:.1e}, "
            + ("labels equal" if not differ else f"{differ} label(s) differ, all at near ties"))


# ---------------------------------------------------------------- convert
def _bool(text):
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="senformer-convert", formatter_class=_Help,
        description="Convert an official SenFormer checkpoint (mmsegmentation 0.x .pth, github.com/WalBouss/SenFormer) "
                    "or an mmseg 0.x UperNet checkpoint (ResNet-50 V1c or Swin-T backbone) to a senformer .safetensors "
                    "file. The preset, classes and weight sharing are inferred from the keys and shapes and stored in "
                    "the file's metadata.")
    p.add_argument("input", metavar="IN.pth", help="official SenFormer or mmseg UperNet checkpoint")
    p.add_argument("output", metavar="OUT.safetensors", help="converted weights")
    p.add_argument("--preset", default=None,
                   help="expected zoo preset (e.g. senformer_r50, upernet_r50); checked against the file, inferred "
                        "if omitted")
    p.add_argument("--strict", type=_bool, default=True, metavar="true|false",
                   help="refuse files with unknown or missing keys (default true); false converts the matching tensors")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="applications of the single block of a weight-shared learner (default: as stored, 6 if one)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle a file that torch.load(weights_only=True) refuses; only for files you trust")
    return p


def convert_main(argv=None):
    """``senformer-convert``: official SenFormer / mmseg UperNet checkpoint -> .safetensors (senformer.convert.cli)."""
    args = convert_parser().parse_args(argv)
    from .convert.cli import run
    return run(args)


def main(argv=None):
    """``python -m senformer.cli train|eval|predict|export|convert ...`` (what torchrun launches)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = {"train": train_main, "eval": eval_main, "predict": predict_main, "export": export_main,
            "convert": convert_main}
    if not argv or argv[0] not in cmds:
        print(f"usage: python -m senformer.cli {{{','.join(cmds)}}} [options]  (see each --help)", file=sys.stderr)
        return 2
    return cmds[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
