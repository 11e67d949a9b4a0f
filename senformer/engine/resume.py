"""``--resume``: continue a run with the configuration saved in its checkpoint.

Flags given with ``--resume`` may only change what does not alter the training computation
(``RESUMABLE``); anything else is refused, so a resumed run is the run that was started."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ConfigError
from .checkpoint import latest_checkpoint, run_info
from .config import apply_overrides, load_config, validate
from .runs import resolve_checkpoint

# keys a resumed run may change: the schedule's length, where the data lives, how fast it loads,
# the device, and when to evaluate / checkpoint / log
RESUMABLE = ("schedule.iters", "data.root", "data.num_workers", "device", "eval.", "checkpoint.", "log.")


def _flatten(cfg: dict, prefix="") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, cfg: dict) -> list:
    """``["schedule.iters: 40 -> 60", ...]``: the keys whose values differ (both configs validated)."""
    a, b = _flatten(saved), _flatten(cfg)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _allowed(change: str) -> bool:
    key = change.split(":", 1)[0]
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def saved_config(ckpt: Path) -> dict:
    config, _ = run_info(ckpt)
    if config is None:
        raise CheckpointError(f"checkpoint {ckpt} carries no run config, so it cannot be resumed from the command "
                              f"line; load it with senformer.engine.trainer.train(cfg, resume=path)")
    return validate(config)


def resume_run(config=None, resume=True, work_dir=None, overrides=()):
    """(cfg, checkpoint, work dir) to continue. ``resume``: True (the latest checkpoint of ``work_dir``, by
    default ``work_dirs/<name of config>``) or a path (a work dir or checkpoint). ``overrides`` (key, value)
    may change only the ``RESUMABLE`` keys; a ``config`` must name the run's own preset."""
    named = load_config(config)["name"] if config is not None or work_dir is None else None
    if resume is True:
        work_dir = Path(work_dir or Path("work_dirs") / named)
        ckpt = latest_checkpoint(work_dir / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {work_dir / 'checkpoints'} (give the run's folder "
                                    f"with --work-dir, or a checkpoint with --resume PATH)")
    else:
        ckpt = resolve_checkpoint(resume)
        if work_dir is None:  # <work_dir>/checkpoints/iter_N
            work_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    saved = saved_config(ckpt)
    if config is not None and named != saved["name"]:
        raise ConfigError(f"--resume: {ckpt} belongs to run {saved['name']!r}, not to config {config!r}")
    cfg = validate(apply_overrides(saved, overrides))
    refused = [c for c in config_changes(saved, cfg) if not _allowed(c)]
    if refused:
        raise ConfigError(f"--resume continues the run saved in {ckpt} with its own config; these flags would change "
                          f"it: {'; '.join(refused)}. Only {', '.join(r.rstrip('.') for r in RESUMABLE)} may change "
                          f"on resume; start a new run (another --work-dir) for the rest")
    return cfg, ckpt, Path(work_dir)
