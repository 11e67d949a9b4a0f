"""Run configuration: built-in defaults <- YAML preset (with ``_base_`` inheritance) <- overrides."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

# The default run (``senformer-train`` with no arguments): the small CPU preset on ``shapes``.
# No pretrained backbone exists offline, so it trains from scratch with a higher LR and no
# backbone LR reduction; the dataset presets in configs/ carry the paper's settings.
DEFAULTS = {
    "name": "shapes_tiny",
    "seed": 0,
    "device": "auto",           # auto | cpu | cuda
    "amp": True,                # bf16 autocast, on CUDA only
    "deterministic": False,
    "model": {"preset": "senformer_tiny", "pretrained": None, "kwargs": {}},
    "data": {
        "dataset": "shapes",
        "root": None,
        "options": {"size": [128, 128]},      # dataset keyword arguments for every split
        "train_options": {"length": 4000},
        "val_options": {"length": 48},
        "train_split": "train",
        "val_split": "val",
        "scale": [128, 128],                  # base scale (long, short edge) of the random resize / test
        "ratio_range": [0.5, 2.0],
        "crop_size": [64, 64],
        "cat_max_ratio": 0.75,
        "photometric": True,
        "ignore_index": 255,
        "batch_size": 8,                      # global: split over the processes of a DDP run
        "num_workers": 2,
    },
    "optim": {"lr": 1e-3, "weight_decay": 1e-4, "backbone_lr_mult": 1.0, "betas": [0.9, 0.999],
              "grad_clip": 3.0},
    "schedule": {"iters": 300, "warmup_iters": 30, "warmup_ratio": 1e-6, "power": 1.0, "min_lr": 0.0},
    # merge None: the model's own; protocol: official = mmseg 0.20's test arithmetic (the paper's numbers),
    # fast = senformer's cheaper one (fused prediction, Pillow resize); see senformer.models.protocol
    "eval": {"interval": 0, "mode": "whole", "crop_size": None, "stride": None, "scales": [1.0],
             "flip": False, "merge": None, "protocol": "official"},
    "checkpoint": {"interval": 100, "keep_last": 3},
    "log": {"interval": 10},
    "ddp": {"find_unused_parameters": False, "sync_bn": True},
}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_replace_", False):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy({kk: vv for kk, vv in v.items() if kk != "_replace_"} if isinstance(v, dict) else v)
    return out


def config_dirs():
    here = Path(__file__).resolve()
    return [Path.cwd() / "configs", here.parents[2] / "configs"]


def find_config(name_or_path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for d in config_dirs():
        for cand in (d / p, d / f"{p}.yaml"):
            if cand.is_file():
                return cand
    avail = sorted({c.stem for d in config_dirs() if d.is_dir() for c in d.glob("*.yaml")})
    raise FileNotFoundError(f"config {name_or_path!r} not found (looked in ./configs and the package's configs/); "
                            f"available: {', '.join(avail) or 'none'}")


def load_yaml(path, _seen=()) -> dict:
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"config inheritance loop through {path}")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must be a YAML mapping, got {type(cfg).__name__}")
    bases = cfg.pop("_base_", None) or []
    merged = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, load_yaml(path.parent / b, _seen + (path,)))
    return deep_merge(merged, cfg)


def set_by_path(cfg: dict, dotted: str, value):
    keys = dotted.split(".")
    d = cfg
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def parse_override(item: str):
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value (e.g. optim.lr=2e-4)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def load_config(name_or_path=None, overrides=()) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if name_or_path:
        path = find_config(name_or_path)
        loaded = load_yaml(path)
        cfg = deep_merge(cfg, loaded)
        if "name" not in loaded:
            cfg["name"] = path.stem
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown top-level config keys {unknown}; known: {sorted(DEFAULTS)}")
    for item in overrides:
        key, value = item if isinstance(item, tuple) else parse_override(item)
        if key.split(".")[0] not in DEFAULTS:
            raise ValueError(f"override {key!r}: unknown section {key.split('.')[0]!r}; known: {sorted(DEFAULTS)}")
        set_by_path(cfg, key, value)
    validate(cfg)
    return cfg


# sections whose keys are free-form (passed on to the model zoo or the dataset class)
FREE_FORM = {("model", "kwargs"), ("data", "options"), ("data", "train_options"), ("data", "val_options")}


def validate(cfg: dict):
    """Catch misspelt keys (``optim.lrr``) instead of silently ignoring them."""
    for section, known in DEFAULTS.items():
        if not isinstance(known, dict):
            continue
        got = cfg.get(section)
        if not isinstance(got, dict):
            raise ValueError(f"config section {section!r} must be a mapping, got {got!r}")
        unknown = sorted(k for k in got if k not in known)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                             f"known in {section!r}: {', '.join(known)}")
        for k, v in got.items():
            if (section, k) in FREE_FORM and v is not None and not isinstance(v, dict):
                raise ValueError(f"config key {section}.{k} must be a mapping, got {v!r}")
    if cfg["eval"].get("protocol") not in (None, "official", "fast"):
        raise ValueError(f"eval.protocol must be 'official' or 'fast', got {cfg['eval']['protocol']!r}")


def dump_config(cfg: dict, path):
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
