"""Official (mmseg) key -> our key, with the value transforms where the layouts differ.

Every rule is a regex over the official key, a template for our key and a transform. The
inverse (ours -> official) is derived from the same table, so the two directions cannot drift.
The backbone and auxiliary-head rules are shared; the decode head (and neck) rules depend on the
architecture (``"senformer"`` or mmseg's ``"upernet"``), because both name their head
``decode_head`` and ``decode_head.conv_seg`` is dead weight in one and the classifier in the other.
Layout differences handled here:

- Swin patch merging: mmseg gathers each 2x2 neighbourhood with ``nn.Unfold`` (feature index
  ``c*4 + 2*kh + kw``); timm concatenates the four shifted maps (index ``(2*kw + kh)*C + c``).
  The reduction's input columns and the norm's vector are permuted accordingly. mmseg merges at
  the end of stage ``s``, timm at the start of stage ``s+1``.
- class embeddings: official ``queries`` (1, N, d), ours ``cls_emb`` (N, d).
- mmseg's ``relative_position_index`` buffers are a function of the window size; ours are
  recomputed, so they are checked and dropped. ``decode_head.conv_seg`` exists in every mmseg
  decode head but SenFormer never uses it: it is dropped (UperNet's is its classifier: kept).
- mmcv ``ConvModule`` (conv without bias, BN named ``bn``, ReLU) -> our ``nn.Sequential`` of
  conv, BN, ReLU: ``X.conv.weight`` -> ``X.0.weight``, ``X.bn.*`` -> ``X.1.*``.
- ``cross_attn.kv`` keeps the official concatenated (2*d, d) layout: our learner splits it the
  same way (reshape to (2, heads, d/heads)), so it needs no reshaping.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

# Where each part of our segmentor lives in its state dict.
BACKBONE = "backbone.body."
BACKBONE_NORMS = "backbone.out_norms."  # per-level LayerNorms mmseg's Swin applies to its outputs
NECK = "neck."
HEAD = "head."
AUX = "aux_head."


def _merge_to_timm(w: torch.Tensor) -> torch.Tensor:
    # last dim indexed (c, kh, kw) -> indexed (kw, kh, c): reverse the three factors
    lead, c4 = w.shape[:-1], w.shape[-1]
    return w.reshape(*lead, c4 // 4, 2, 2).permute(*range(len(lead)), -1, -2, -3).reshape(*lead, c4)


def _merge_to_mmseg(w: torch.Tensor) -> torch.Tensor:
    lead, c4 = w.shape[:-1], w.shape[-1]
    return w.reshape(*lead, 2, 2, c4 // 4).permute(*range(len(lead)), -1, -2, -3).reshape(*lead, c4)


Transform = Tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
IDENTITY: Transform = (lambda t: t, lambda t: t)
MERGE: Transform = (_merge_to_timm, _merge_to_mmseg)
QUERIES: Transform = (lambda t: t.reshape(t.shape[-2:]), lambda t: t.unsqueeze(0))

ARCHS = ("senformer", "upernet")

# Official keys that carry nothing our model needs (see module docstring), per architecture.
DROPPED = {"senformer": re.compile(r"(relative_position_index$|^decode_head\.conv_seg\.)"),
           "upernet": re.compile(r"relative_position_index$")}

_SWIN_BLOCK = [  # official suffix inside a Swin block -> ours (timm's and our neck's naming)
    (r"norm1", "norm1"), (r"norm2", "norm2"),
    (r"attn\.w_msa\.relative_position_bias_table", "attn.relative_position_bias_table"),
    (r"attn\.w_msa\.qkv", "attn.qkv"), (r"attn\.w_msa\.proj", "attn.proj"),
]


def _conv_module(official: str, ours: str) -> List[Tuple[str, str, Transform]]:
    """mmcv ConvModule ``official`` (regex) -> our conv-BN(-ReLU) Sequential ``ours`` (template)."""
    return [(official + r"\.conv\.weight", ours + ".0.weight", IDENTITY),
            (official + r"\.bn\.(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)", ours + ".1.{p}",
             IDENTITY)]


def _shared_rules() -> List[Tuple[str, str, Transform]]:
    """Backbones (mmseg ResNetV1c, Swin) and the FCN auxiliary head: the same in both architectures."""
    r: List[Tuple[str, str, Transform]] = []
    # mmseg ResNetV1c -> timm resnet{50,101}c: only the deep stem is named differently.
    for off, ours in (("0", "conv1.0"), ("1", "conv1.1"), ("3", "conv1.3"), ("4", "conv1.4"),
                      ("6", "conv1.6"), ("7", "bn1")):
        r.append((rf"backbone\.stem\.{off}\.(?P<rest>.+)", BACKBONE + ours + ".{rest}", IDENTITY))
    r.append((r"backbone\.(?P<rest>layer[1-4]\..+)", BACKBONE + "{rest}", IDENTITY))
    # mmseg SwinTransformer -> timm swin (features_only names stages "layers_i").
    r.append((r"backbone\.patch_embed\.projection\.(?P<p>weight|bias)", BACKBONE + "patch_embed.proj.{p}", IDENTITY))
    r.append((r"backbone\.patch_embed\.norm\.(?P<p>weight|bias)", BACKBONE + "patch_embed.norm.{p}", IDENTITY))
    blk = r"backbone\.stages\.(?P<s>\d)\.blocks\.(?P<b>\d+)\."
    for off, ours in _SWIN_BLOCK:
        r.append((blk + off + r"(?P<p>\.weight|\.bias|)$", BACKBONE + "layers_{s}.blocks.{b}." + ours + "{p}", IDENTITY))
    r.append((blk + r"ffn\.layers\.0\.0\.(?P<p>weight|bias)", BACKBONE + "layers_{s}.blocks.{b}.mlp.fc1.{p}", IDENTITY))
    r.append((blk + r"ffn\.layers\.1\.(?P<p>weight|bias)", BACKBONE + "layers_{s}.blocks.{b}.mlp.fc2.{p}", IDENTITY))
    r.append((r"backbone\.stages\.(?P<s>\d)\.downsample\.(?P<m>norm|reduction)\.(?P<p>weight|bias)",
              BACKBONE + "layers_{s+1}.downsample.{m}.{p}", MERGE))
    r.append((r"backbone\.norm(?P<s>\d)\.(?P<p>weight|bias)", BACKBONE_NORMS + "{s}.{p}", IDENTITY))
    # FCN auxiliary head.
    r += _conv_module(r"auxiliary_head\.convs\.0", AUX + "conv")
    r.append((r"auxiliary_head\.conv_seg\.(?P<p>weight|bias)", AUX + "conv_seg.{p}", IDENTITY))
    return r


def _senformer_rules() -> List[Tuple[str, str, Transform]]:
    r: List[Tuple[str, str, Transform]] = []
    # FPNT neck.
    r.append((r"neck\.lateral_convs\.(?P<i>\d)\.conv\.(?P<p>weight|bias)", NECK + "lateral_convs.{i}.{p}", IDENTITY))
    nb = r"neck\.fpn_swins\.(?P<i>\d)\.swin_blocks\.blocks\.0\."
    for off, ours in _SWIN_BLOCK:
        r.append((nb + off + r"(?P<p>\.weight|\.bias|)$", NECK + "fpn_outs.{i}." + ours + "{p}", IDENTITY))
    r.append((nb + r"ffn\.layers\.0\.0\.(?P<p>weight|bias)", NECK + "fpn_outs.{i}.mlp.0.{p}", IDENTITY))
    r.append((nb + r"ffn\.layers\.1\.(?P<p>weight|bias)", NECK + "fpn_outs.{i}.mlp.2.{p}", IDENTITY))
    # SenFormer head: learners.i.layers.j -> learners.i.decoder.blocks.j (same sub-module names).
    lr = r"decode_head\.learners\.(?P<i>\d+)\."
    r.append((lr + r"layers\.(?P<j>\d+)\.(?P<rest>.+)", HEAD + "learners.{i}.decoder.blocks.{j}.{rest}", IDENTITY))
    r.append((lr + r"(?P<m>norm_features|norm_embs)\.(?P<p>weight|bias)", HEAD + "learners.{i}.decoder.{m}.{p}", IDENTITY))
    r.append((lr + r"queries", HEAD + "learners.{i}.cls_emb", QUERIES))
    return r


def _upernet_rules() -> List[Tuple[str, str, Transform]]:
    # mmseg UPerHead -> our UPerHead: the pyramid part (PPM, bottleneck, laterals, fpn convs) lives
    # in ``head.fpn``; the PPM is a ModuleList of Sequential(AdaptiveAvgPool2d, ConvModule) there
    # and ``psp_modules.stages`` here.
    r = _conv_module(r"decode_head\.psp_modules\.(?P<i>\d+)\.1", HEAD + "fpn.psp_modules.stages.{i}.1")
    r += _conv_module(r"decode_head\.bottleneck", HEAD + "fpn.bottleneck")
    r += _conv_module(r"decode_head\.(?P<m>lateral_convs|fpn_convs)\.(?P<i>\d+)", HEAD + "fpn.{m}.{i}")
    r += _conv_module(r"decode_head\.fpn_bottleneck", HEAD + "fpn_bottleneck")
    r.append((r"decode_head\.conv_seg\.(?P<p>weight|bias)", HEAD + "conv_seg.{p}", IDENTITY))
    return r


def _compile(rules: List[Tuple[str, str, Transform]]) -> List[Tuple[re.Pattern, str, Transform]]:
    return [(re.compile("^" + pat + "$"), tpl, tf) for pat, tpl, tf in rules]


RULES = {"senformer": _compile(_shared_rules() + _senformer_rules()),
         "upernet": _compile(_shared_rules() + _upernet_rules())}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def _fill(template: str, groups: Dict[str, str]) -> str:
    out = template
    if "{s+1}" in out:
        out = out.replace("{s+1}", str(int(groups["s"]) + 1))
    return out.format(**groups)


def map_key(key: str, arch: str = "senformer") -> Optional[Tuple[str, Transform]]:
    """Our key and the transform for an official key of ``arch``; None when no rule knows the key."""
    _check_arch(arch)
    for rx, tpl, tf in RULES[arch]:
        m = rx.match(key)
        if m:
            return _fill(tpl, m.groupdict()), tf
    return None


def official_to_ours(state_dict: Dict[str, torch.Tensor], keep_blocks: Optional[int] = None,
                     arch: str = "senformer"):
    """Rename and reshape every official tensor of an ``arch`` ("senformer" | "upernet") checkpoint.

    ``keep_blocks``: keep only ``layers.j`` with j < keep_blocks in each learner (1 for a
    weight-shared model, whose other stored blocks are copies). Returns (ours, unknown, dropped):
    unknown official keys are listed, never silently ignored."""
    _check_arch(arch)
    ours: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    dropped: List[str] = []
    layer_rx = re.compile(r"^decode_head\.learners\.\d+\.layers\.(\d+)\.")
    for k, v in state_dict.items():
        if DROPPED[arch].search(k):
            dropped.append(k)
            continue
        m = layer_rx.match(k)
        if keep_blocks is not None and m and int(m.group(1)) >= keep_blocks:
            dropped.append(k)
            continue
        hit = map_key(k, arch)
        if hit is None:
            unknown.append(k)
            continue
        name, (fwd, _) = hit
        ours[name] = fwd(v)
    return ours, unknown, dropped


def ours_to_official(state_dict: Dict[str, torch.Tensor], official_keys,
                     arch: str = "senformer") -> Dict[str, torch.Tensor]:
    """The inverse of :func:`official_to_ours` for the given official keys (e.g. from
    ``official_shapes``). A weight-shared learner's single block is written to every ``layers.j``;
    ``relative_position_index`` is regenerated from the window size, SenFormer's
    ``decode_head.conv_seg`` (never used) is not recreated."""
    from .official_layout import _mmseg_relative_position_index

    _check_arch(arch)
    out: Dict[str, torch.Tensor] = {}
    for k in official_keys:
        if k.endswith("relative_position_index"):
            table_key = k.replace("relative_position_index", "relative_position_bias_table")
            table = state_dict[map_key(table_key, arch)[0]]
            out[k] = _mmseg_relative_position_index((round(table.shape[0] ** 0.5) + 1) // 2)
            continue
        if DROPPED[arch].search(k):
            continue
        hit = map_key(k, arch)
        if hit is None:
            raise KeyError(f"no rule maps official key {k!r}")
        name, (_, inv) = hit
        if name not in state_dict:
            # a weight-shared learner stores blocks.0 only: every official layer is that block
            name = re.sub(r"\.decoder\.blocks\.\d+\.", ".decoder.blocks.0.", name)
        out[k] = inv(state_dict[name])
    return out
