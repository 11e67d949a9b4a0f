"""mmseg 0.20's Swin block function on timm's Swin Transformer blocks.

The official SenFormer checkpoints were trained with mmseg's Swin, and timm's block differs from it
whenever a stage's token map is not a multiple of the window (every stage at the paper's 512/640
crops):

- timm rolls the (H, W) map by the shift and then zero-pads it to window multiples; mmseg pads first
  and rolls the padded map, so its windows, its padded tokens and its shifted-window mask (built on
  the padded map in both) sit elsewhere;
- timm (unless built with ``always_partition=True``) shrinks the window to a map no larger than it
  and drops that stage's shift; mmseg always uses the full window and shifts every odd block.

``use_mmseg_order`` swaps each timm ``SwinTransformerBlock`` to ``MmsegSwinBlock``, a subclass
that keeps timm's sub-modules (so timm weights and the official-checkpoint converter's key mapping
load unchanged) and replaces only the window step, in mmseg's order. Everything else already
agrees: unshifted blocks, pre-norm residuals, MLP, relative-position indexing, patch embedding and
merging with bottom/right zero padding, and the stochastic-depth schedule (linear 0..rate over all
blocks, one rate per block, on both residual branches).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock

# what the swapped block reads off timm's block; checked once, at swap time, for a clear error
_REQUIRED = ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2", "window_size", "shift_size")

# masks depend only on the padded map size, window, shift, device and dtype: all blocks of a stage
# (and all forwards at a crop size) share one. Bounded so whole-image inference at many sizes stays small.
_MASKS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_MAX_MASKS = 32


def shifted_window_mask(hp: int, wp: int, window: Tuple[int, int], shift: Tuple[int, int],
                        device=None, dtype=torch.float32) -> torch.Tensor:
    """mmseg's SW-MSA mask for a padded ``(hp, wp)`` map: ``(num_windows, wh*ww, wh*ww)``, -100 between
    tokens of one window that came from different regions of the rolled map, 0 elsewhere.

    mmseg labels rows ``[0, hp-wh)``, ``[hp-wh, hp-sh)``, ``[hp-sh, hp)`` (and columns alike) as regions
    0, 1, 2 with nine slice assignments; comparing each index with the two borders gives the same labels
    without a Python loop over slices."""
    (wh, ww), (sh, sw) = window, shift

    def bands(n, w, s):
        i = torch.arange(n, device=device)
        return (i >= n - w).long() + (i >= n - s).long()

    region = bands(hp, wh, sh)[:, None] * 3 + bands(wp, ww, sw)[None, :]
    region = region.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    differ = region[:, None, :] != region[:, :, None]
    return torch.zeros(differ.shape, device=device, dtype=dtype).masked_fill(differ, -100.0)


def _mask(hp, wp, window, shift, device, dtype):
    if torch.compiler.is_compiling():
        # a traced graph folds the mask into constants; a Python dict would only add guards
        return shifted_window_mask(hp, wp, window, shift, device, dtype)
    # an inference-mode tensor must not leak into an autograd forward: keep the two apart
    key = (hp, wp, window, shift, device, dtype, torch.is_inference_mode_enabled())
    mask = _MASKS.get(key)
    if mask is None:
        mask = shifted_window_mask(hp, wp, window, shift, device, dtype)
        _MASKS[key] = mask
        if len(_MASKS) > _MAX_MASKS:
            _MASKS.popitem(last=False)
    else:
        _MASKS.move_to_end(key)
    return mask


class MmsegSwinBlock(SwinTransformerBlock):
    """timm's Swin block (same modules and parameter names) computing mmseg 0.20's ``SwinBlock``."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C), already layer-normed; mmseg's ShiftWindowMSA minus its drop path
        b, h, w, c = x.shape
        wh, ww = self.window_size
        sh, sw = self.shift_size
        ph, pw = (-h) % wh, (-w) % ww
        # pad first: padded tokens are part of the map that is rolled and windowed, as in mmseg
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        shifted = bool(sh or sw)
        mask = None
        if shifted:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
            mask = _mask(hp, wp, (wh, ww), (sh, sw), x.device, x.dtype)
        windows = x.view(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)
        windows = self.attn(windows, mask=mask)
        x = windows.view(b, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if shifted:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        if ph or pw:
            x = x[:, :h, :w].contiguous()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written out (not inherited) so the block function does not depend on timm's forward
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _check(name: str, block: nn.Module) -> None:
    missing = [a for a in _REQUIRED if not hasattr(block, a)]
    if missing or not hasattr(block.attn, "window_size"):
        raise RuntimeError(f"Swin block {name!r}: this timm's SwinTransformerBlock lacks "
                           f"{missing or ['attn.window_size']}; senformer's mmseg-order Swin needs timm >= 1.0.8")
    if not getattr(block, "always_partition", False):
        # without it timm may have shrunk the window (and its bias table) and dropped the shift
        raise RuntimeError(f"Swin block {name!r} was built without always_partition=True: timm may have shrunk "
                           f"its window, which mmseg never does; build the model with always_partition=True")
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    if tuple(block.attn.window_size) != window or shift not in ((0, 0), (window[0] // 2, window[1] // 2)):
        raise RuntimeError(f"Swin block {name!r}: window {window} / attention window {tuple(block.attn.window_size)} "
                           f"/ shift {shift} is not an mmseg Swin block (shift 0 or window // 2)")


def use_mmseg_order(model: nn.Module) -> int:
    """Make every timm Swin v1 block of ``model`` compute mmseg's block; returns how many were swapped.

    Parameters, buffers and module names are untouched. The model must have been built with
    ``always_partition=True`` (``TimmBackbone`` does so for Swin)."""
    count = 0
    for name, module in model.named_modules():
        if type(module) is SwinTransformerBlock:
            _check(name, module)
            module.__class__ = MmsegSwinBlock
            if getattr(module, "attn_mask", None) is not None:
                # timm's precomputed mask (strict-size models) is for its own order: drop it, never used
                module.attn_mask = None
            count += 1
    return count
