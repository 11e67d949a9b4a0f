"""Compare a state dict with a model's keys and shapes; errors name every key a user must fix."""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

LIMIT = 40  # keys shown per list; the count is always given


class MismatchError(ValueError):
    """A checkpoint does not fit the model; ``missing``, ``unexpected`` and ``mismatched`` hold the keys."""

    def __init__(self, message: str, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


def _listing(title: str, lines: Sequence[str]) -> str:
    more = f"\n    ... and {len(lines) - LIMIT} more" if len(lines) > LIMIT else ""
    return f"  {title} ({len(lines)}):\n" + "\n".join(f"    {x}" for x in lines[:LIMIT]) + more


def check_against(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, Tuple[int, ...]], *,
                  strict: bool = True, unknown: Iterable[str] = (), what: str = "checkpoint",
                  official_names: Optional[Mapping[str, str]] = None) -> Dict[str, torch.Tensor]:
    """The entries of ``state_dict`` that fit ``expected`` (key -> shape).

    ``unknown``: source keys no rule could translate. Under ``strict`` any missing, unexpected,
    unknown or mis-shaped key raises :class:`MismatchError`; otherwise they are reported in a
    warning and only fitting tensors are returned. A shape mismatch always raises: loading a
    tensor into a slot of another shape is never meaningful."""
    names = official_names or {}

    def src(k: str) -> str:
        return f" <- {names[k]}" if k in names else ""

    missing = [f"{k} {tuple(s)}{src(k)}" for k, s in expected.items() if k not in state_dict]
    unexpected = [f"{k} {tuple(v.shape)}{src(k)}" for k, v in state_dict.items() if k not in expected]
    unexpected += [f"{k} (no counterpart in our model)" for k in unknown]
    mismatched = [f"{k}: file {tuple(v.shape)}{src(k)}, model expects {tuple(expected[k])}"
                  for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(_listing("missing from the file (key, expected shape)", missing))
        if unexpected:
            parts.append(_listing("in the file but not in the model", unexpected))
        if mismatched:
            parts.append(_listing("shape differs", mismatched))
        msg = f"{what} does not match the model:\n" + "\n".join(parts)
        if strict or mismatched:
            hint = "" if mismatched else "\n  (strict=False / --strict false loads the matching tensors only)"
            raise MismatchError(msg + hint, missing, unexpected, mismatched)
        warnings.warn(msg + "\n  loading the matching tensors only (strict=False)", stacklevel=3)
    return {k: v for k, v in state_dict.items() if k in expected}
