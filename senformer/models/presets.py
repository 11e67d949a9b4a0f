"""The zoo's presets: each one's full build configuration and a one-line description.

Plain data with no torch import, so that ``--help`` and ``senformer.list_models()`` answer at once."""
from __future__ import annotations

import copy

ARCHS = ("senformer", "upernet", "senupernet", "fusion")

_BASE = dict(
    arch="senformer",
    backbone="resnet50c",
    img_size=None,          # transformer backbones: the training crop size
    window_size=None,       # Swin backbones: attention window (None: timm's default for the name)
    drop_path_rate=None,    # backbone stochastic depth (None: timm's default)
    backbone_weights=None,  # local .safetensors / .pth file of backbone weights, never downloaded
    pretrained=None,        # deprecated alias of backbone_weights
    neck="fpnt",
    neck_window=7,
    embed_dim=512,
    num_heads=8,
    num_blocks=6,
    weight_sharing="repeated",
    repeat_block=None,      # None: by weight_sharing (repeated: one block; none/cls/decoder: distinct blocks)
    cache_kv=True,
    post_norm=False,
    levels=(2, 3, 4, 5),
    learners_per_level=1,
    merge="mean",
    merge_channels=256,
    aux=True,
    aux_channels=512,
    avg_non_ignore=False,   # aux / single-output CE over valid pixels (True) or all pixels (False: official)
    channels=512,           # UperNet / SenUperNet decoder width
)

PRESETS = {
    "senformer_r50": dict(backbone="resnet50c"),
    "senformer_r101": dict(backbone="resnet101c"),
    "senformer_swin_t": dict(backbone="swin_tiny_patch4_window7_224", img_size=512, window_size=7, drop_path_rate=0.3),
    "senformer_swin_s": dict(backbone="swin_small_patch4_window7_224", img_size=512, window_size=7, drop_path_rate=0.3),
    "senformer_swin_b": dict(backbone="swin_base_patch4_window12_384", img_size=640, window_size=12, drop_path_rate=0.3),
    "senformer_swin_l": dict(backbone="swin_large_patch4_window12_384", img_size=640, window_size=12, drop_path_rate=0.3),
    "upernet_r50": dict(arch="upernet", backbone="resnet50c", aux_channels=256),
    "upernet_swin_t": dict(arch="upernet", backbone="swin_tiny_patch4_window7_224", img_size=512, window_size=7,
                           drop_path_rate=0.3, aux_channels=256),
    # 512-channel aux head as in the SenFormer configs it shares its code base with (paper: 70M params).
    "senupernet_r50": dict(arch="senupernet", backbone="resnet50c", aux_channels=512),
    "fusion_baseline_r50": dict(arch="fusion", backbone="resnet50c"),
    # small enough to train at 128x128 on a CPU: ResNet-18, width 128, 4 heads, 2 block applications
    "senformer_tiny": dict(backbone="resnet18", embed_dim=128, num_heads=4, num_blocks=2, aux_channels=64,
                           merge_channels=32, channels=128),
}
PRESETS = {name: {**_BASE, **cfg} for name, cfg in PRESETS.items()}
OVERRIDES = tuple(k for k in _BASE if k != "arch")


def preset_config(preset: str, **overrides) -> dict:
    """The full configuration of ``preset`` with ``overrides`` applied (validated)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
    bad = sorted(k for k in overrides if k not in OVERRIDES)
    if bad:
        raise TypeError(f"build_model: unknown override(s) {', '.join(bad)}; valid overrides: {', '.join(OVERRIDES)}")
    cfg = copy.deepcopy(PRESETS[preset])
    cfg.update(overrides)
    return cfg

DESCRIPTIONS = {
    "senformer_r50": "SenFormer, ResNet-50 V1c, FPNT neck, 4 learners (paper: 55M params, 179G FLOPs at 512x512)",
    "senformer_r101": "SenFormer, ResNet-101 V1c, FPNT neck, 4 learners (paper: 79M params)",
    "senformer_swin_t": "SenFormer, Swin-T (window 7, 512 crops), FPNT neck, 4 learners (paper: 59M params)",
    "senformer_swin_s": "SenFormer, Swin-S (window 7, 512 crops), FPNT neck, 4 learners (paper: 81M params)",
    "senformer_swin_b": "SenFormer, Swin-B (window 12, 640 crops), FPNT neck, 4 learners (paper: 120M params)",
    "senformer_swin_l": "SenFormer, Swin-L (window 12, 640 crops), FPNT neck, 4 learners (paper: 233M params)",
    "upernet_r50": "UperNet baseline, ResNet-50 V1c (mmseg's; paper: 67M params)",
    "upernet_swin_t": "UperNet baseline, Swin-T (mmseg's)",
    "senupernet_r50": "SenUperNet: UperNet's conv decoder self-ensembled over the FPN levels, ResNet-50 (paper Table 4)",
    "fusion_baseline_r50": "features-fusion baseline: FPNT levels fused, one transformer learner, ResNet-50 (paper Table 4)",
    "senformer_tiny": "small SenFormer for CPUs: ResNet-18, width 128, 2 block applications (the default run's model)",
}


def list_models() -> dict:
    """{preset name: one-line description} for every preset of the zoo."""
    return {name: DESCRIPTIONS[name] for name in PRESETS}
