"""The training loop: AdamW + poly/warmup, grad clipping, bf16 autocast on GPU, DDP via torchrun,
atomic resumable checkpoints, tqdm progress, a log file and CSV scalars, evaluation at the end."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import distributed as du
from .builders import build_model_from_cfg, build_train_dataset, build_val_dataset, eval_kwargs
from .checkpoint import latest_checkpoint, load_state, load_weights, rng_state, save_checkpoint, set_rng_state
from .config import dump_config
from .evaluate import evaluate
from .optim import PolyWarmup, build_optimizer
from .sampler import ResumableSampler
from .sync_bn import convert_cpu_sync_batchnorm


class _LossModule(torch.nn.Module):
    """DDP hooks its gradient all-reduce on ``forward``; the Segmentor's entry point is ``loss``."""

    def __init__(self, model, ignore_index):
        super().__init__()
        self.model, self.ignore_index = model, ignore_index

    def forward(self, images, target):
        return self.model.loss(images, target, ignore_index=self.ignore_index)


def pick_device(name="auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no GPU")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name != "cpu":
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _logger(work_dir: Path, main: bool) -> logging.Logger:
    log = logging.getLogger(f"senformer.train.{work_dir}")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if main:
        fh = logging.FileHandler(work_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


class ScalarWriter:
    """CSV scalars (step, tag, value), plus TensorBoard when the tensorboard package is installed."""

    def __init__(self, work_dir: Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.f = open(work_dir / "scalars.csv", "a", newline="")
        self.w = csv.writer(self.f)
        if self.f.tell() == 0:
            self.w.writerow(["step", "tag", "value"])
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(work_dir / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def add(self, step, tag, value):
        if self.enabled:
            self.w.writerow([step, tag, f"{value:.6g}"])
            if self.tb is not None:
                self.tb.add_scalar(tag, value, step)

    def flush(self):
        if self.enabled:
            self.f.flush()

    def close(self):
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def train(cfg: dict, work_dir=None, resume=None, stop_after=None, progress=True, print_fn=print) -> dict:
    """Train per ``cfg`` (see ``config.DEFAULTS``). ``resume``: True (latest checkpoint in the work dir),
    a checkpoint path, or None. ``stop_after``: stop with a checkpoint after that step (preemptible runs).
    Returns {"losses": per-step mean loss, "metrics": final evaluation or None, "step", "work_dir"}."""
    device = pick_device(cfg.get("device", "auto"))
    du.init_distributed(device.type)
    rank, world, main = du.rank(), du.world_size(), du.is_main()
    work_dir = Path(work_dir or Path("work_dirs") / cfg["name"])
    ckpt_dir = work_dir / "checkpoints"
    if main:
        work_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, work_dir / "config.yaml")
    du.barrier()
    log = _logger(work_dir, main)
    seed_everything(int(cfg["seed"]))
    if cfg.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)

    d, o, s = cfg["data"], cfg["optim"], cfg["schedule"]
    train_set = build_train_dataset(cfg)
    num_classes = train_set.num_classes
    model = build_model_from_cfg(cfg, num_classes).to(device)
    if world > 1 and cfg["ddp"].get("sync_bn", True):
        # torch's SyncBatchNorm runs on GPUs only; CPU (gloo) runs get an all-reduce based equivalent
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            model = convert_cpu_sync_batchnorm(model)
    optimizer = build_optimizer(model, o["lr"], o["weight_decay"], o.get("backbone_lr_mult", 0.1), o.get("betas", (0.9, 0.999)))
    total = int(s["iters"])
    sched = PolyWarmup(optimizer, o["lr"], total, s.get("power", 1.0), s.get("min_lr", 0.0),
                       s.get("warmup_iters", 0), s.get("warmup_ratio", 1e-6))

    step = 0
    if resume:
        ckpt = latest_checkpoint(ckpt_dir) if resume is True else Path(resume)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint found in {ckpt_dir}")
        load_weights(model, ckpt)
        st = load_state(ckpt)
        optimizer.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step = int(st["step"])
        set_rng_state(st["rng"][rank] if rank < len(st["rng"]) else st["rng"][0])
        log.info(f"resumed from {ckpt} at step {step}")

    net = _LossModule(model, d["ignore_index"])
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg["ddp"].get("find_unused_parameters", False))
    sampler = ResumableSampler(len(train_set), int(d["batch_size"]), int(cfg["seed"]), rank, world, start_step=step)
    nw = int(d.get("num_workers", 0))
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=sampler.local_batch, sampler=sampler, num_workers=nw,
        pin_memory=device.type == "cuda", persistent_workers=nw > 0, drop_last=True,
        worker_init_fn=_worker_init if nw > 0 else None)
    amp = bool(cfg.get("amp", True)) and device.type == "cuda"
    grad_clip = o.get("grad_clip")
    writer = ScalarWriter(work_dir, main)
    log_every = max(1, int(cfg["log"].get("interval", 10)))
    ck_every = int(cfg["checkpoint"].get("interval", 0) or 0)
    keep = int(cfg["checkpoint"].get("keep_last", 3))
    ev_every = int(cfg["eval"].get("interval", 0) or 0)
    end = total if stop_after is None else min(total, int(stop_after))
    log.info(f"training {cfg['name']}: {total} iterations, global batch {d['batch_size']} on {world} "
             f"process(es), device {device}, amp={amp}, {sum(p.numel() for p in model.parameters()) / 1e6:.3g}M params")

    losses, pending = [], []
    model.train()
    it = iter(loader)
    bar = tqdm(total=total, initial=step, desc="train", disable=not (progress and main), dynamic_ncols=True)
    t_last, n_img = time.time(), 0

    def save(at):
        states = [rng_state()]
        if world > 1:
            states = [None] * world
            torch.distributed.all_gather_object(states, rng_state())
        if main:
            save_checkpoint(ckpt_dir, at, model, {"optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
                                                  "step": at, "rng": states, "config": json.dumps(cfg),
                                                  "classes": list(train_set.CLASSES)}, keep)
        du.barrier()

    def flush():
        if not pending:
            return
        vals = torch.stack([torch.stack(v) for v in pending]).float()
        vals = du.all_reduce_mean(vals.to(device)).cpu()
        for row in vals.tolist():
            losses.append(row[0])
        pending.clear()
        return vals[-1].tolist()

    keys = None
    while step < end:
        batch = next(it)
        x = batch["img"].to(device, non_blocking=True)
        y = batch["seg"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(x, y)
        loss = out["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
        optimizer.step()
        sched.step()
        step += 1
        n_img += x.shape[0] * world
        keys = keys or ["loss"] + [k for k in out if k != "loss" and torch.is_tensor(out[k]) and out[k].numel() == 1]
        pending.append([out[k].detach().float() for k in keys] + ([gnorm.detach().float()] if gnorm is not None else []))
        if step % log_every == 0 or step == end:
            last = flush()
            dt = time.time() - t_last
            ips = n_img / max(dt, 1e-9)
            t_last, n_img = time.time(), 0
            lr = sched.get_last_lr()[-1]
            if not all(math.isfinite(v) for v in last):
                raise FloatingPointError(f"step {step}: non-finite loss {dict(zip(keys, last))}")
            for k, v in zip(keys + ["grad_norm"], last):
                writer.add(step, f"train/{k}", v)
            writer.add(step, "train/lr", lr)
            writer.add(step, "train/img_per_s", ips)
            writer.flush()
            bar.set_postfix(loss=f"{last[0]:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
            log.info(f"step {step}/{total} " + " ".join(f"{k}={v:.4f}" for k, v in zip(keys, last))
                     + f" lr={lr:.3e} img/s={ips:.1f}")
        bar.update(1)
        if ck_every and step % ck_every == 0 and step != end:
            save(step)
        if ev_every and step % ev_every == 0 and step != total:
            m = evaluate(model, build_val_dataset(cfg), num_classes, device=device, amp=amp, progress=False,
                         **eval_kwargs(cfg))["ensemble"]
            writer.add(step, "val/mIoU", m["mIoU"])
            log.info(f"step {step} val mIoU={m['mIoU'] * 100:.2f} aAcc={m['aAcc'] * 100:.2f}")
            model.train()
    bar.close()
    flush()
    save(step)
    metrics = None
    if step >= total:
        val_set = build_val_dataset(cfg)
        metrics = evaluate(model, val_set, num_classes, device=device, amp=amp, progress=progress,
                           **eval_kwargs(cfg))["ensemble"]
        writer.add(step, "val/mIoU", metrics["mIoU"])
        msg = (f"final {cfg['name']} step {step}: mIoU={metrics['mIoU'] * 100:.2f} aAcc={metrics['aAcc'] * 100:.2f} "
               f"on {len(val_set)} {d.get('val_split', 'val')} images")
        log.info(msg)
        if main:
            print_fn(msg)
            (work_dir / "metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=1))
    writer.close()
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)
    return {"losses": losses, "metrics": metrics, "step": step, "work_dir": str(work_dir), "model": model}


def _worker_init(_):
    torch.set_num_threads(1)
