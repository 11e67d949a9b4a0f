"""``senformer-convert IN.pth OUT.safetensors`` (or ``python -m senformer.cli convert ...``): an official
SenFormer or mmseg UperNet checkpoint -> our format."""
from __future__ import annotations

import argparse
import sys
from typing import Iterable, Optional


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="senformer-convert",
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


def run(argv: Optional[Iterable[str]] = None) -> int:
    from safetensors.torch import save_file

    from . import from_official, metadata

    args = parser().parse_args(None if argv is None else list(argv))
    if not args.output.endswith(".safetensors"):
        print(f"senformer-convert: OUT must end in .safetensors, got {args.output!r}", file=sys.stderr)
        return 2
    try:
        info, sd = from_official(args.input, args.preset, strict=args.strict, num_blocks=args.num_blocks,
                                 trust_pickle=args.trust_pickle)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"senformer-convert: {e}", file=sys.stderr)
        return 1
    # safetensors refuses views sharing storage: give every tensor its own memory
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, args.output, metadata=metadata(info))
    print(f"{args.input}: {info.describe()}, {len(sd)} tensors -> {args.output}")
    return 0
