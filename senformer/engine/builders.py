"""Model, dataset and loader construction from a run configuration."""
from __future__ import annotations

import torch

from ..data import TestPipeline, TrainPipeline, build_dataset
from .checkpoint import read_weights


def build_model_from_cfg(cfg: dict, num_classes: int) -> torch.nn.Module:
    mc = cfg["model"]
    preset = mc.get("preset", "senformer_tiny")
    kwargs = dict(mc.get("kwargs") or {})
    if preset == "toy":
        from .toy import ToySegmentor
        model = ToySegmentor(num_classes, **kwargs)
        if mc.get("pretrained"):
            load_backbone(model, mc["pretrained"])
        return model
    from .. import build_model
    if mc.get("pretrained"):
        # model.pretrained (--pretrained) is a backbone file: the zoo's backbone_weights
        given = kwargs.get("backbone_weights")
        if given and str(given) != str(mc["pretrained"]):
            raise ValueError(f"model.pretrained={mc['pretrained']!r} and model.kwargs.backbone_weights={given!r} "
                             f"name different backbone files: set one of them")
        kwargs["backbone_weights"] = mc["pretrained"]
    try:
        return build_model(preset, num_classes=num_classes, **kwargs)
    except TypeError as e:  # unknown override: make it a config error the CLI reports
        raise ValueError(f"model.kwargs: {e}") from e


def load_backbone(model, path):
    """Pretrained backbone weights from a local file (no download is possible); keys may carry a
    ``backbone.`` prefix or none."""
    sd = read_weights(path)
    sd = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in sd.items()}
    own = model.backbone.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not usable:
        sample = ", ".join(list(sd)[:5])
        raise ValueError(f"pretrained file {path} has no key matching model.backbone (file keys start: {sample}; "
                         f"backbone keys start: {', '.join(list(own)[:5])})")
    model.backbone.load_state_dict(usable, strict=False)
    return len(usable), len(own)


def dataset_kwargs(data: dict, split_key: str) -> dict:
    kw = dict(data.get("options") or {})
    kw.update(data.get(f"{split_key}_options") or {})
    return kw


def build_train_dataset(cfg):
    d = cfg["data"]
    pipe = TrainPipeline(d["scale"], d["crop_size"], d["ratio_range"], d["cat_max_ratio"],
                         photometric=d.get("photometric", True), ignore_index=d["ignore_index"])
    return build_dataset(d["dataset"], d.get("train_split", "train"), d.get("root"), pipe,
                         **dataset_kwargs(d, "train"))


def build_val_dataset(cfg, split=None):
    d = cfg["data"]
    return build_dataset(d["dataset"], split or d.get("val_split", "val"), d.get("root"), TestPipeline(d["scale"]),
                         **dataset_kwargs(d, "val"))


def eval_kwargs(cfg) -> dict:
    e, d = cfg["eval"], cfg["data"]
    crop = e.get("crop_size") or d["crop_size"]
    stride = e.get("stride") or [max(1, c * 2 // 3) for c in crop]
    return {"scale": tuple(d["scale"]), "ratios": tuple(e.get("scales") or [1.0]), "flip": bool(e.get("flip")),
            "mode": e.get("mode", "whole"), "crop": tuple(crop), "stride": tuple(stride),
            "merge": e.get("merge"), "protocol": e.get("protocol") or "official", "ignore_index": d["ignore_index"]}
