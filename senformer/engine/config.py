"""Run configuration: typed defaults (the dataclasses below, the one place they live) <- YAML preset
(with ``_base_`` inheritance) <- overrides. Every value is converted to its field's type and checked
against its range before anything is built, and an error names the key."""
from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ..errors import ConfigError


def _f(default, *, lo=None, hi=None, lo_open=False, choices=None, length=None, each=None, doc=""):
    """A config field: ``lo``/``hi`` bound the value (or each element of a list), ``choices`` lists
    the allowed strings, ``length`` fixes a list's length."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "length": length, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    preset: str = _f("senformer_tiny", doc="model preset of senformer.models.zoo, or 'toy'")
    pretrained: Optional[str] = _f(None, doc="local file of pretrained backbone weights")
    kwargs: dict = _f({}, doc="preset overrides passed to build_model")


@dataclass
class DataConfig:
    dataset: str = _f("shapes")
    root: Optional[str] = _f(None)
    options: dict = _f({"size": [128, 128]}, doc="dataset keyword arguments for every split")
    train_options: dict = _f({"length": 4000})
    val_options: dict = _f({"length": 48})
    train_split: str = _f("train")
    val_split: str = _f("val")
    scale: list[int] = _f([128, 128], lo=1, length=2, doc="base scale (long, short edge) of the random resize / test")
    ratio_range: list[float] = _f([0.5, 2.0], lo=0, lo_open=True, length=2)
    crop_size: list[int] = _f([64, 64], lo=1, length=2)
    cat_max_ratio: float = _f(0.75, lo=0, lo_open=True, hi=1)
    photometric: bool = _f(True)
    ignore_index: int = _f(255, lo=0)
    batch_size: int = _f(8, lo=1, doc="global: split over the processes of a DDP run")
    num_workers: int = _f(2, lo=0)


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, lo=0, lo_open=True)
    weight_decay: float = _f(1e-4, lo=0)
    backbone_lr_mult: float = _f(1.0, lo=0)
    betas: list[float] = _f([0.9, 0.999], lo=0, hi=1, length=2)
    grad_clip: Optional[float] = _f(3.0, lo=0, doc="max gradient norm; null or 0: no clipping")


@dataclass
class ScheduleConfig:
    iters: int = _f(300, lo=1)
    warmup_iters: int = _f(30, lo=0)
    warmup_ratio: float = _f(1e-6, lo=0, hi=1)
    power: float = _f(1.0, lo=0)
    min_lr: float = _f(0.0, lo=0)


@dataclass
class EvalConfig:
    interval: int = _f(0, lo=0, doc="evaluate every N iterations; 0: only at the end")
    mode: str = _f("whole", choices=("whole", "slide"))
    crop_size: Optional[list[int]] = _f(None, lo=1, length=2, doc="sliding window; null: the training crop")
    stride: Optional[list[int]] = _f(None, lo=1, length=2, doc="null: 2/3 of the window")
    scales: list[float] = _f([1.0], lo=0, lo_open=True)
    flip: bool = _f(False)
    merge: Optional[str] = _f(None, choices=("mean", "product", "vote"), doc="null: the model's own")
    # official = mmseg 0.20's test arithmetic (the paper's numbers); fast = senformer's cheaper one
    protocol: str = _f("official", choices=("official", "fast"))


@dataclass
class CheckpointConfig:
    interval: int = _f(100, lo=0)
    keep_last: int = _f(3, lo=0, doc="0 keeps every checkpoint")


@dataclass
class LogConfig:
    interval: int = _f(10, lo=1)


@dataclass
class DDPConfig:
    find_unused_parameters: bool = _f(False)
    sync_bn: bool = _f(True)


@dataclass
class RunConfig:
    """The default run (``senformer-train`` with no arguments): the small CPU preset on ``shapes``.
    No pretrained backbone exists offline, so it trains from scratch with a higher LR and no backbone
    LR reduction; the dataset presets in configs/ carry the paper's settings."""
    name: str = _f("shapes_tiny")
    seed: int = _f(0, lo=0)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    amp: bool = _f(True, doc="bf16 autocast, on CUDA only")
    deterministic: bool = _f(False)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)


DEFAULTS = dataclasses.asdict(RunConfig())
_SECTIONS = {f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.default_factory)}


@functools.lru_cache(maxsize=None)
def _hints(cls):
    return typing.get_type_hints(cls)  # the annotations are strings (from __future__ import annotations)


def _check_range(key, value, meta):
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        raise ConfigError(f"{key} must be {'>' if meta.get('lo_open') else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} must be <= {hi}, got {value!r}")


def convert(key: str, value, hint, meta=None):
    """``value`` as type ``hint`` (int, float, bool, str, dict, list[...], Optional[...]) within the
    bounds in ``meta``; ConfigError naming ``key`` otherwise."""
    meta = meta or {}
    if typing.get_origin(hint) is typing.Union:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if typing.get_origin(hint) is list:
        (elem,) = typing.get_args(hint)
        n = meta.get("length")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * (n or 1)  # data.crop_size=512 means 512x512
        if not isinstance(value, (list, tuple)) or not value or (n and len(value) != n):
            want = f"a list of {n} numbers" if n else "a non-empty list of numbers"
            raise ConfigError(f"{key} must be {want}, got {value!r}")
        return [convert(f"{key}[{i}]", v, elem, meta) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        value = int(value)
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{key} must be one of {', '.join(meta['choices'])}, got {value!r}")
        return value
    _check_range(key, value, meta)
    return value


def _convert_section(prefix: str, cls, got) -> dict:
    if not isinstance(got, dict):
        raise ConfigError(f"config section {prefix!r} must be a mapping, got {got!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in got if k not in fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(f'{prefix}{k}' for k in unknown)}; "
                          f"known{' in ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(fields)}")
    hints, defaults = _hints(cls), dataclasses.asdict(cls())
    out = {}
    for name, f in fields.items():
        if dataclasses.is_dataclass(hints[name]):
            out[name] = _convert_section(f"{name}.", hints[name], got.get(name, {}))
        else:  # a config saved by an older version lacks newer keys: their defaults
            out[name] = convert(prefix + name, got.get(name, defaults[name]), hints[name], f.metadata)
    return out


def validate(cfg: dict) -> dict:
    """The config converted to its fields' types, every value checked; ConfigError names the first bad key.
    Catches misspelt keys (``optim.lrr``) instead of silently ignoring them."""
    out = _convert_section("", RunConfig, cfg)
    lo, hi = out["data"]["ratio_range"]
    if lo > hi:
        raise ConfigError(f"data.ratio_range must be [low, high] with low <= high, got {[lo, hi]}")
    from ..data import DATASETS
    if out["data"]["dataset"] not in DATASETS:
        raise ConfigError(f"data.dataset must be one of {', '.join(sorted(DATASETS))}, got {out['data']['dataset']!r}")
    from ..models.presets import PRESETS
    if out["model"]["preset"] not in (*PRESETS, "toy"):
        raise ConfigError(f"model.preset must be one of {', '.join(sorted(PRESETS))} or toy, "
                          f"got {out['model']['preset']!r}")
    return out


def to_dataclass(cfg: dict) -> RunConfig:
    """The validated ``cfg`` as a ``RunConfig`` (attribute access for code that prefers it)."""
    cfg = validate(cfg)
    return RunConfig(**{k: (_hints(RunConfig)[k](**v) if k in _SECTIONS else v) for k, v in cfg.items()})


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


def available_configs() -> list:
    return sorted({c.stem for d in config_dirs() if d.is_dir() for c in d.glob("*.yaml")})


def find_config(name_or_path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for d in config_dirs():
        for cand in (d / p, d / f"{p}.yaml"):
            if cand.is_file():
                return cand
    raise FileNotFoundError(f"config {name_or_path!r} not found (looked in ./configs and the package's configs/); "
                            f"available: {', '.join(available_configs()) or 'none'}")


def load_yaml(path, _seen=()) -> dict:
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config inheritance loop through {path}")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(cfg).__name__}")
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
        raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. optim.lr=2e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
    if isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def apply_overrides(cfg: dict, overrides=()) -> dict:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, value = item if isinstance(item, tuple) else parse_override(item)
        if key.split(".")[0] not in DEFAULTS:
            raise ConfigError(f"override {key!r}: unknown section {key.split('.')[0]!r}; known: {sorted(DEFAULTS)}")
        set_by_path(cfg, key, value)
    return cfg


def load_config(name_or_path=None, overrides=()) -> dict:
    """Defaults <- preset ``name_or_path`` <- ``overrides`` ("a.b=v" strings or (key, value) pairs), validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if name_or_path:
        path = find_config(name_or_path)
        loaded = load_yaml(path)
        cfg = deep_merge(cfg, loaded)
        if "name" not in loaded:
            cfg["name"] = path.stem
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown top-level config keys {unknown}; known: {sorted(DEFAULTS)}")
    return validate(apply_overrides(cfg, overrides))


def dump_config(cfg: dict, path):
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
