"""The official checkpoints' layout (mmsegmentation 0.x naming), as key -> shape.

Two architectures share it. The released SenFormer models (github.com/WalBouss/SenFormer) are mmseg
``EncoderDecoder`` state dicts: ``backbone.*`` (mmseg ResNetV1c or SwinTransformer), ``neck.*``
(FPNT: 1x1 ``lateral_convs`` and one mmseg Swin block per level in ``fpn_swins``),
``decode_head.*`` (one ``TransformerLearner`` per level) and ``auxiliary_head.*`` (mmseg
FCNHead). mmseg's UperNet models (configs/_base_/models/upernet_{r50,swin}.py) have the same
backbones and auxiliary head, no neck, and an mmseg ``UPerHead`` as ``decode_head``. The table is
built from the architecture hyper-parameters so that it serves three purposes: inferring a
checkpoint's preset, telling a user the expected shape of a missing key, and generating
checkpoints in the official layout for tests (no download is possible here).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch

Shape = Tuple[int, ...]

# Buffers whose dtype is integral in the official files.
INT_SUFFIXES = ("num_batches_tracked", "relative_position_index")


@dataclass(frozen=True)
class OfficialConfig:
    """Hyper-parameters that determine every key and shape of an official checkpoint."""

    preset: str  # our zoo preset name
    backbone: str  # "resnet" | "swin"
    depths: Tuple[int, ...]  # ResNet bottlenecks per stage, or Swin blocks per stage
    num_classes: int = 150
    num_blocks: int = 6  # decoder blocks stored per learner (branch_depth)
    embed_dim: int = 96  # Swin only
    num_heads: Tuple[int, ...] = (3, 6, 12, 24)  # Swin only
    window_size: int = 7  # Swin backbone only; the neck always uses 7
    dim: int = 512  # FPNT / learner width
    neck_heads: int = 8
    neck_window: int = 7
    head_heads: int = 8
    aux: bool = True
    aux_channels: int = 512
    head_channels: int = 128  # SenFormer: BaseDecodeHead.conv_seg input width, stored but unused
    arch: str = "senformer"  # "senformer" | "upernet" (mmseg UPerHead as decode_head, no neck)
    channels: int = 512  # UPerHead width (its ConvModules and conv_seg input)
    pool_scales: Tuple[int, ...] = (1, 2, 3, 6)  # UPerHead's pyramid pooling module

    @property
    def in_channels(self) -> Tuple[int, ...]:
        if self.backbone == "resnet":
            return (256, 512, 1024, 2048)
        return tuple(self.embed_dim * 2 ** i for i in range(4))


# The paper's six backbones with the official configs' settings (senformer_configs/).
OFFICIAL_PRESETS: Dict[str, OfficialConfig] = {
    "senformer_r50": OfficialConfig("senformer_r50", "resnet", (3, 4, 6, 3)),
    "senformer_r101": OfficialConfig("senformer_r101", "resnet", (3, 4, 23, 3)),
    "senformer_swin_t": OfficialConfig("senformer_swin_t", "swin", (2, 2, 6, 2)),
    "senformer_swin_s": OfficialConfig("senformer_swin_s", "swin", (2, 2, 18, 2)),
    "senformer_swin_b": OfficialConfig("senformer_swin_b", "swin", (2, 2, 18, 2), embed_dim=128,
                                       num_heads=(4, 8, 16, 32), window_size=12),
    "senformer_swin_l": OfficialConfig("senformer_swin_l", "swin", (2, 2, 18, 2), embed_dim=192,
                                       num_heads=(6, 12, 24, 48), window_size=12),
    # mmseg's UperNet baselines (the zoo's upernet_* presets): 256-channel auxiliary head.
    "upernet_r50": OfficialConfig("upernet_r50", "resnet", (3, 4, 6, 3), arch="upernet", aux_channels=256),
    "upernet_swin_t": OfficialConfig("upernet_swin_t", "swin", (2, 2, 6, 2), arch="upernet", aux_channels=256),
}


def official_config(preset: str, **changes) -> OfficialConfig:
    if preset not in OFFICIAL_PRESETS:
        raise ValueError(f"preset={preset!r} has no official counterpart; "
                         f"choose one of {sorted(OFFICIAL_PRESETS)}")
    return replace(OFFICIAL_PRESETS[preset], **changes)


def _bn(out: Dict[str, Shape], prefix: str, c: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        out[f"{prefix}.{name}"] = (c,)
    out[f"{prefix}.num_batches_tracked"] = ()


def _ln(out: Dict[str, Shape], prefix: str, c: int) -> None:
    out[f"{prefix}.weight"] = (c,)
    out[f"{prefix}.bias"] = (c,)


def _linear(out: Dict[str, Shape], prefix: str, cout: int, cin: int, bias: bool = True) -> None:
    out[f"{prefix}.weight"] = (cout, cin)
    if bias:
        out[f"{prefix}.bias"] = (cout,)


def _resnet(out: Dict[str, Shape], cfg: OfficialConfig) -> None:
    # ResNetV1c: three-conv deep stem (32, 32, 64), stride on the 3x3 conv, conv+BN shortcut.
    p = "backbone.stem"
    for conv, bn, cout, cin in ((0, 1, 32, 3), (3, 4, 32, 32), (6, 7, 64, 32)):
        out[f"{p}.{conv}.weight"] = (cout, cin, 3, 3)
        _bn(out, f"{p}.{bn}", cout)
    inp = 64
    for s, n in enumerate(cfg.depths):
        planes = 64 * 2 ** s
        for b in range(n):
            q = f"backbone.layer{s + 1}.{b}"
            out[f"{q}.conv1.weight"] = (planes, inp, 1, 1)
            _bn(out, f"{q}.bn1", planes)
            out[f"{q}.conv2.weight"] = (planes, planes, 3, 3)
            _bn(out, f"{q}.bn2", planes)
            out[f"{q}.conv3.weight"] = (4 * planes, planes, 1, 1)
            _bn(out, f"{q}.bn3", 4 * planes)
            if b == 0:
                out[f"{q}.downsample.0.weight"] = (4 * planes, inp, 1, 1)
                _bn(out, f"{q}.downsample.1", 4 * planes)
            inp = 4 * planes


def _swin_block(out: Dict[str, Shape], p: str, c: int, heads: int, window: int) -> None:
    _ln(out, f"{p}.norm1", c)
    out[f"{p}.attn.w_msa.relative_position_bias_table"] = ((2 * window - 1) ** 2, heads)
    out[f"{p}.attn.w_msa.relative_position_index"] = (window * window, window * window)
    _linear(out, f"{p}.attn.w_msa.qkv", 3 * c, c)
    _linear(out, f"{p}.attn.w_msa.proj", c, c)
    _ln(out, f"{p}.norm2", c)
    _linear(out, f"{p}.ffn.layers.0.0", 4 * c, c)
    _linear(out, f"{p}.ffn.layers.1", c, 4 * c)


def _swin(out: Dict[str, Shape], cfg: OfficialConfig) -> None:
    e = cfg.embed_dim
    out["backbone.patch_embed.projection.weight"] = (e, 3, 4, 4)
    out["backbone.patch_embed.projection.bias"] = (e,)
    _ln(out, "backbone.patch_embed.norm", e)
    for s, n in enumerate(cfg.depths):
        c = e * 2 ** s
        for b in range(n):
            _swin_block(out, f"backbone.stages.{s}.blocks.{b}", c, cfg.num_heads[s], cfg.window_size)
        if s < len(cfg.depths) - 1:
            # mmseg merges patches at the END of a stage (timm at the start of the next one).
            _ln(out, f"backbone.stages.{s}.downsample.norm", 4 * c)
            _linear(out, f"backbone.stages.{s}.downsample.reduction", 2 * c, 4 * c, bias=False)
    for s in range(len(cfg.depths)):
        _ln(out, f"backbone.norm{s}", e * 2 ** s)


def _neck(out: Dict[str, Shape], cfg: OfficialConfig) -> None:
    for i, cin in enumerate(cfg.in_channels):
        out[f"neck.lateral_convs.{i}.conv.weight"] = (cfg.dim, cin, 1, 1)
        out[f"neck.lateral_convs.{i}.conv.bias"] = (cfg.dim,)
    for i in range(len(cfg.in_channels)):
        _swin_block(out, f"neck.fpn_swins.{i}.swin_blocks.blocks.0", cfg.dim, cfg.neck_heads,
                    cfg.neck_window)


def learner_block_shapes(d: int) -> Dict[str, Shape]:
    """One official ``DecoderBlock`` (keys relative to ``layers.j``)."""
    out: Dict[str, Shape] = {}
    for n in ("norm1", "norm2", "norm3"):
        _ln(out, n, d)
    _linear(out, "cross_attn.kv", 2 * d, d)
    _linear(out, "cross_attn.proj", d, d)
    _linear(out, "cross_attn.to_q", d, d)
    _linear(out, "attn.qkv", 3 * d, d)
    _linear(out, "attn.proj", d, d)
    _linear(out, "mlp.fc1", 4 * d, d)
    _linear(out, "mlp.fc2", d, 4 * d)
    return out


def _head(out: Dict[str, Shape], cfg: OfficialConfig) -> None:
    d, n = cfg.dim, cfg.num_classes
    # BaseDecodeHead always builds conv_seg; SenFormer never calls it.
    out["decode_head.conv_seg.weight"] = (n, cfg.head_channels, 1, 1)
    out["decode_head.conv_seg.bias"] = (n,)
    block = learner_block_shapes(d)
    for i in range(len(cfg.in_channels)):
        p = f"decode_head.learners.{i}"
        for j in range(cfg.num_blocks):
            for k, shape in block.items():
                out[f"{p}.layers.{j}.{k}"] = shape
        out[f"{p}.queries"] = (1, n, d)
        _ln(out, f"{p}.norm_features", d)
        _ln(out, f"{p}.norm_embs", d)


def _conv_module(out: Dict[str, Shape], prefix: str, cout: int, cin: int, k: int) -> None:
    # mmcv ConvModule with a norm: ``conv`` has no bias (bias='auto'), the BN is named ``bn``
    out[f"{prefix}.conv.weight"] = (cout, cin, k, k)
    _bn(out, f"{prefix}.bn", cout)


def _uper_head(out: Dict[str, Shape], cfg: OfficialConfig) -> None:
    # registration order of mmseg 0.20's UPerHead: BaseDecodeHead's conv_seg first, then the PPM
    # (a ModuleList of Sequential(AdaptiveAvgPool2d, ConvModule)), bottleneck, laterals, fpn convs
    ch, cin = cfg.channels, cfg.in_channels
    out["decode_head.conv_seg.weight"] = (cfg.num_classes, ch, 1, 1)
    out["decode_head.conv_seg.bias"] = (cfg.num_classes,)
    for i in range(len(cfg.pool_scales)):
        _conv_module(out, f"decode_head.psp_modules.{i}.1", ch, cin[-1], 1)
    _conv_module(out, "decode_head.bottleneck", ch, cin[-1] + len(cfg.pool_scales) * ch, 3)
    for i, c in enumerate(cin[:-1]):
        _conv_module(out, f"decode_head.lateral_convs.{i}", ch, c, 1)
    for i in range(len(cin) - 1):
        _conv_module(out, f"decode_head.fpn_convs.{i}", ch, ch, 3)
    _conv_module(out, "decode_head.fpn_bottleneck", ch, len(cin) * ch, 3)


def _aux(out: Dict[str, Shape], cfg: OfficialConfig) -> None:
    c4, ch = cfg.in_channels[2], cfg.aux_channels
    out["auxiliary_head.conv_seg.weight"] = (cfg.num_classes, ch, 1, 1)
    out["auxiliary_head.conv_seg.bias"] = (cfg.num_classes,)
    _conv_module(out, "auxiliary_head.convs.0", ch, c4, 3)


def official_shapes(cfg: OfficialConfig) -> Dict[str, Shape]:
    """Every key of an official checkpoint with this config, in file order, -> its shape."""
    out: Dict[str, Shape] = {}
    (_resnet if cfg.backbone == "resnet" else _swin)(out, cfg)
    if cfg.arch == "upernet":
        _uper_head(out, cfg)
    else:
        _neck(out, cfg)
        _head(out, cfg)
    if cfg.aux:
        _aux(out, cfg)
    return out


def _mmseg_relative_position_index(window: int) -> torch.Tensor:
    # mmseg's WindowMSA index: double_step_seq, summed with its transpose, flipped.
    seq = (torch.arange(0, (2 * window - 1) * window, 2 * window - 1)[:, None]
           + torch.arange(window)[None, :]).reshape(1, -1)
    return (seq + seq.T).flip(1).contiguous()


def random_official_state_dict(cfg: OfficialConfig, repeated: bool = False,
                               only_first_block: bool = False, seed: int = 0,
                               dtype: torch.dtype = torch.float32,
                               device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """An official-layout state dict filled with random values (for tests and examples).

    ``repeated`` makes every decoder block of a learner equal to its first one (how a
    weight-shared model trained with the released code may be saved); ``only_first_block``
    stores ``layers.0`` only. ``device="meta"`` gives shapes without memory."""
    g = torch.Generator().manual_seed(seed)
    meta = device is not None and torch.device(device).type == "meta"
    out: Dict[str, torch.Tensor] = {}
    for k, shape in official_shapes(cfg).items():
        integral = k.endswith(INT_SUFFIXES)
        if meta:
            out[k] = torch.empty(shape, dtype=torch.int64 if integral else dtype, device="meta")
        elif k.endswith("relative_position_index"):
            out[k] = _mmseg_relative_position_index(int(round(shape[0] ** 0.5)))
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.randint(0, 10 ** 6, (), generator=g, dtype=torch.int64)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g, dtype=dtype) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g, dtype=dtype)
    if repeated or only_first_block:
        for k in list(out):
            parts = k.split(".")
            if parts[:2] == ["decode_head", "learners"] and len(parts) > 4 and parts[3] == "layers" and parts[4] != "0":
                if only_first_block:
                    del out[k]
                else:
                    out[k] = out[".".join(parts[:4] + ["0"] + parts[5:])].clone()
    return out
