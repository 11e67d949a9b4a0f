"""``senformer-convert IN.pth OUT.safetensors`` (or ``python -m senformer.cli convert ...``): an official
SenFormer or mmseg UperNet checkpoint -> our format. Its arguments are parsed in ``senformer.cli``
(``convert_parser``), which imports no torch, so that ``--help`` answers at once."""
from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    """Convert as the parsed command line ``args`` says; 0 on success, 1 with one line on stderr."""
    from safetensors.torch import save_file

    from . import from_official, metadata

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
