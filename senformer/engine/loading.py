"""A model ready for evaluation or prediction from whatever checkpoint the user points at: a run's work
dir or checkpoint folder (the config saved in it), a ``.safetensors`` file written by senformer-convert,
or an official SenFormer / mmseg UperNet ``.pth`` (the file describes its own model)."""
from __future__ import annotations

from pathlib import Path

from .builders import build_model_from_cfg, build_val_dataset, eval_kwargs
from .checkpoint import load_weights
from .config import load_config
from .device import pick_device
from .runs import load_run, resolve_checkpoint


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


def _from_released(source, config, overrides):
    """Model built from the file itself; data and evaluation settings from ``config`` / overrides."""
    from ..convert import build_from_checkpoint
    from ..data import KNOWN_CLASSES

    cfg = load_config(config, overrides)
    model = build_from_checkpoint(source)
    names = KNOWN_CLASSES.get(cfg["data"]["dataset"]) or cfg["data"]["options"].get("classes")
    if names is None or isinstance(names, str) or len(names) != model.num_classes:
        names = [f"class{i}" for i in range(model.num_classes)]  # no dataset given: plain names, palette by index
    return cfg, list(names), model


def load_for_inference(checkpoint, config=None, overrides=(), device="auto"):
    """(cfg, class names, model in eval mode on ``device``, the device, evaluation keyword arguments)."""
    path = resolve_checkpoint(checkpoint)
    released = released_model(path) if path.is_file() else None
    if released is not None:
        cfg, classes, model = _from_released(released, config, overrides)
    else:
        cfg, classes, ckpt = load_run(checkpoint, config, overrides)
        if classes is None:
            classes = list(build_val_dataset(cfg).CLASSES)
        model = build_model_from_cfg(cfg, len(classes))
        load_weights(model, ckpt)
    dev = pick_device(device)
    return cfg, classes, model.to(dev).eval(), dev, eval_kwargs(cfg)
