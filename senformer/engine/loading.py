"""A model ready for evaluation or prediction from whatever checkpoint the user points at: a run's work
dir or checkpoint folder, a folder written by ``save_pretrained`` or a lone ``model.safetensors`` of
either (the run config in its header), a ``.safetensors`` file written by senformer-convert, or an
official SenFormer / mmseg UperNet ``.pth`` (the file describes its own model)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from .builders import build_model_from_cfg, build_val_dataset, eval_kwargs
from .checkpoint import WEIGHTS, load_weights, read_header
from .config import available_configs, load_config
from .device import pick_device
from .runs import load_run, resolve_checkpoint

# an official checkpoint names no dataset; its class count does (the paper's four)
DATASET_BY_CLASSES = {150: "ade20k", 19: "cityscapes", 59: "pascal_context59", 171: "coco_stuff10k"}


def released_model(path: Path):
    """What ``build_from_checkpoint`` should load when ``path`` describes its own model, else None: a file
    written by senformer-convert (preset in its metadata: the path), or an official SenFormer / mmseg
    UperNet .pth (its state dict, so that the file is read once). No training config is needed for these."""
    from ..convert import is_official, read_state_dict
    from ..convert.reading import read_metadata

    if read_metadata(path).get("format") == "senformer":
        return path
    if path.suffix not in (".pth", ".pt"):
        return None
    try:
        state = read_state_dict(path)
    except ValueError:
        return None
    return state if is_official(state) else None


def model_section(model) -> dict:
    """The run config's ``model`` section that rebuilds a zoo model: its preset and the build arguments
    that differ from the preset's (backbone files left out: the weights come from the checkpoint)."""
    from ..models.presets import PRESETS

    preset = model.preset
    base = PRESETS[preset]
    kwargs = {k: v for k, v in model.config.items()
              if k not in ("arch", "backbone_weights", "pretrained") and v != base.get(k)}
    return {"preset": preset, "pretrained": None, "kwargs": json.loads(json.dumps(kwargs))}


def _released_config(model, config, overrides):
    """Data and evaluation settings for a file that carries none: ``config`` if given, else the preset of
    the dataset its class count names (ade20k_r50, cityscapes_swin_l, ...), else the defaults."""
    if config is None:
        dataset = DATASET_BY_CLASSES.get(model.num_classes)
        if dataset is not None:
            suffix = model.preset.split("_", 1)[-1]  # senformer_swin_l -> swin_l, upernet_r50 -> r50
            known = available_configs()
            config = next((c for c in (f"{dataset}_{suffix}", f"{dataset}_r50") if c in known), None)
    return load_config(config, [("model", model_section(model))] + list(overrides))


def _from_released(source, config, overrides):
    """Model built from the file itself; data and evaluation settings from ``config`` / overrides."""
    from ..convert import build_from_checkpoint
    from ..data import KNOWN_CLASSES

    model = build_from_checkpoint(source)
    cfg = _released_config(model, config, overrides)
    names = KNOWN_CLASSES.get(cfg["data"]["dataset"]) or cfg["data"]["options"].get("classes")
    if names is None or isinstance(names, str) or len(names) != model.num_classes:
        names = [f"class{i}" for i in range(model.num_classes)]  # no dataset given: plain names, palette by index
    return cfg, list(names), model


def inference_config(cfg: dict) -> dict:
    """``cfg`` without what only training needs from the local machine: the backbone file (the checkpoint
    holds every weight) is not read again, so a run loads after its pretrained file moved."""
    cfg = copy.deepcopy(cfg)
    cfg["model"]["pretrained"] = None
    cfg["model"].setdefault("kwargs", {}).pop("backbone_weights", None)
    return cfg


def load_model(checkpoint, config=None, overrides=()):
    """(cfg, class names, palette or None, model on the CPU in eval mode) from any checkpoint form."""
    path = resolve_checkpoint(checkpoint)
    weights = path / WEIGHTS if path.is_dir() else path
    header = read_header(weights) if weights.suffix == ".safetensors" and weights.is_file() else {}
    released = released_model(path) if path.is_file() and "config" not in header else None
    if released is not None:
        cfg, classes, model = _from_released(released, config, overrides)
    else:
        cfg, classes, ckpt = load_run(checkpoint, config, overrides)
        if classes is None:
            classes = list(build_val_dataset(cfg).CLASSES)
        model = build_model_from_cfg(inference_config(cfg), len(classes))
        load_weights(model, ckpt)
    palette = json.loads(header["palette"]) if "palette" in header else None
    return cfg, list(classes), palette, model.eval()


def load_for_inference(checkpoint, config=None, overrides=(), device="auto"):
    """(cfg, class names, model in eval mode on ``device``, the device, evaluation keyword arguments,
    palette (K,3) uint8)."""
    from ..data.classes import palette_for

    cfg, classes, palette, model = load_model(checkpoint, config, overrides)
    dev = pick_device(device)
    palette = palette_for(classes) if palette is None else np.asarray(palette, np.uint8)
    return cfg, classes, model.to(dev).eval(), dev, eval_kwargs(cfg), palette
