"""Backbones: any timm ``features_only`` model, cut to its last four feature levels (C2..C5), NCHW.

Nothing is ever downloaded: timm always gets ``pretrained=False``; weights come from a local file.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# timm names of the paper's backbones. resnet50c/101c: deep 3x3 stem 32-32-64 without average-pool
# downsampling in the shortcuts, i.e. mmseg's ResNetV1c.
SWIN_NAMES = {
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window12_384",
    "swin_l": "swin_large_patch4_window12_384",
}

# checkpoint wrappers and prefixes met in the wild (mmseg/mmcv, DDP, timm checkpoints)
_WRAPPERS = ("state_dict", "model", "module", "model_state")
_PREFIXES = ("module.", "backbone.", "model.")
# a classifier checkpoint carries these; a features-only backbone legitimately lacks them
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "norm.", "global_pool.", "conv_head.", "bn2.")


class TimmBackbone(nn.Module):
    """timm features_only model returning the last 4 levels as NCHW tensors.

    ``channels``: the 4 channel counts; ``reductions``: their strides (4, 8, 16, 32 for the paper's models).
    timm's Swin v1 models are built with ``always_partition=True`` and their blocks compute mmseg 0.20's
    function (``swin_mmseg``), the one the official checkpoints were trained with."""

    def __init__(self, name: str, img_size: Optional[int] = None, window_size: Optional[int] = None,
                 pretrained: Optional[str] = None, drop_path_rate: Optional[float] = None, **timm_kwargs):
        super().__init__()
        import timm

        self.name = name
        kwargs = dict(timm_kwargs)
        if img_size is not None:
            kwargs["img_size"] = img_size
        if window_size is not None:
            kwargs["window_size"] = window_size
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        if name.startswith("swin") and "img_size" in kwargs:
            # training crops, sliding-window crops and whole images differ in size: do not assert on it
            kwargs.setdefault("strict_img_size", False)
        mmseg_swin = _is_timm_swin_v1(timm, name)
        if mmseg_swin:
            # mmseg never shrinks a window to a small stage map (nor drops its shift); timm does unless told
            kwargs.setdefault("always_partition", True)
        self.body = _create(timm, name, kwargs)
        if mmseg_swin:
            # the official checkpoints were trained with mmseg's Swin: pad, then shift (see swin_mmseg)
            from .swin_mmseg import use_mmseg_order

            use_mmseg_order(self.body)
        info = self.body.feature_info
        self.channels = list(info.channels())
        self.reductions = list(info.reduction())
        if len(self.channels) != 4:
            raise ValueError(f"backbone {name!r} exposes {len(self.channels)} feature levels, 4 are needed")
        self.nhwc = str(getattr(self.body, "output_fmt", "NCHW")).upper().endswith("NHWC")
        patch = getattr(getattr(self.body, "patch_embed", None), "patch_size", 1)
        self.pad_to = tuple(patch) if isinstance(patch, (tuple, list)) else (int(patch), int(patch))
        # mmseg's Swin (and so the official checkpoints) normalises every output level; timm's
        # features_only Swin returns the stages un-normalised.
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels) if name.startswith("swin") else None
        if pretrained:
            load_backbone_weights(self.body, pretrained)

    def forward(self, x: torch.Tensor):
        ph, pw = (-x.shape[-2]) % self.pad_to[0], (-x.shape[-1]) % self.pad_to[1]
        if ph or pw:
            # patch-embedding models need multiples of the patch size: zero-pad bottom/right as mmseg's Swin
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.body(x)
        if self.out_norms is not None:
            feats = [norm(f) if self.nhwc else norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                     for norm, f in zip(self.out_norms, feats)]
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return list(feats)


def _is_timm_swin_v1(timm, name: str) -> bool:
    try:
        return timm.models.is_model_in_modules(name, ("swin_transformer",))
    except (AttributeError, KeyError, TypeError):  # registry API changed: fall back to the name
        return name.split(".")[0].startswith("swin_") and not name.startswith("swinv2")


def _create(timm, name: str, kwargs: dict):
    """timm features_only model; img_size / window_size are dropped for models that do not take them
    (CNNs accept any input size), so a preset's sizes can be overridden with any backbone."""
    while True:
        try:
            return timm.create_model(name, pretrained=False, features_only=True, out_indices=(-4, -3, -2, -1), **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"backbone: timm has no model named {name!r}") from e
            raise
        except TypeError as e:
            if "always_partition" in str(e):
                raise RuntimeError(f"backbone {name!r}: this timm ({timm.__version__}) has no always_partition; "
                                   f"mmseg-order Swin needs timm >= 1.0.8") from e
            dropped = [k for k in ("img_size", "window_size", "strict_img_size") if k in kwargs and k in str(e)]
            if not dropped:
                raise
            for k in dropped:
                kwargs.pop(k)


def _read_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained: no such file {path!r} (weights are never downloaded; pass a local "
                                f".safetensors or .pth file)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPERS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"pretrained: {path!r} does not hold a state dict of tensors")
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _canonical(key: str) -> str:
    # timm's FeatureListNet renames nested children "layers.0" -> "layers_0"
    return key.replace(".", "_")


def _short_list(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _resize_bias_table(table: torch.Tensor, shape) -> Optional[torch.Tensor]:
    """A Swin relative-position table of another window size, resized bicubically as mmseg's
    ``SwinTransformer.init_weights`` does; None if the head counts differ or a table is not square."""
    (l1, h1), (l2, h2) = tuple(table.shape), shape
    s1, s2 = round(l1 ** 0.5), round(l2 ** 0.5)
    if h1 != h2 or s1 * s1 != l1 or s2 * s2 != l2:
        return None
    work = table if table.dtype == torch.float64 else table.float()  # bicubic has no half kernel on CPU
    grid = work.permute(1, 0).reshape(1, h1, s1, s1)
    resized = F.interpolate(grid, size=(s2, s2), mode="bicubic")
    return resized.reshape(h2, l2).permute(1, 0).contiguous().to(table.dtype)


def load_backbone_weights(body: nn.Module, path: str):
    """Load a timm/torchvision-style state dict from a local file into ``body``. Raises with the lists of
    missing, unexpected and shape-mismatched keys (classifier-head keys of the file are ignored)."""
    sd = _read_state_dict(path)
    own = body.state_dict()
    by_canon = {_canonical(k): k for k in own}
    mapped, unexpected, mismatched = {}, [], []
    for k, v in sd.items():
        target = by_canon.get(_canonical(k))
        if target is None:
            if not k.startswith(_CLASSIFIER_PREFIXES) and not k.endswith("num_batches_tracked"):
                unexpected.append(k)
            continue
        shape = tuple(own[target].shape)
        if tuple(v.shape) != shape and target.endswith("relative_position_bias_table"):
            # another window size (or a timm model that shrank a small stage's window): mmseg resizes
            resized = _resize_bias_table(v, shape)
            v = v if resized is None else resized
        if tuple(v.shape) != shape:
            mismatched.append(f"{k}: file {tuple(v.shape)} vs model {shape}")
            continue
        mapped[target] = v
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_short_list(mismatched)}")
        raise ValueError(f"pretrained: {path!r} does not match the backbone; " + "; ".join(parts))
    body.load_state_dict(mapped, strict=False)
