"""AdamW with the paper's parameter groups and a poly schedule with linear warmup."""
from __future__ import annotations

import fnmatch

import torch

NO_DECAY_PATTERNS = ("*cls_emb*", "*relative_position_bias_table*", "*absolute_pos_embed*", "*pos_embed*")


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float = 0.1,
                 no_decay_patterns=NO_DECAY_PATTERNS):
    """Four groups: (backbone or not) x (decay or not). Backbone = names starting with ``backbone.``;
    no decay for 1-D parameters (norm weights, biases) and names matching ``no_decay_patterns``
    (class embeddings, position tables), as the paper's mmseg configs do."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = name.startswith("backbone.")
        decay = p.ndim > 1 and not any(fnmatch.fnmatch(name, pat) for pat in no_decay_patterns)
        key = (backbone, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_mult": backbone_lr_mult if backbone else 1.0,
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    out = [groups[k] for k in sorted(groups)]
    for g in out:
        g["lr"] = lr * g["lr_mult"]
    return out


def build_optimizer(model, lr=1e-4, weight_decay=1e-4, backbone_lr_mult=0.1, betas=(0.9, 0.999), eps=1e-8):
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    groups = param_groups(model, lr, weight_decay, backbone_lr_mult)
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


class PolyWarmup:
    """lr(t) = base * max((1 - t/T)^power, 0) (floored at ``min_lr``) times a linear warmup factor
    rising from ``warmup_ratio`` to 1 over ``warmup_iters`` (mmseg's poly + linear warmup).
    Each group's lr is its ``lr_mult`` times this. ``step()`` after every optimizer step."""

    def __init__(self, optimizer, base_lr, total_iters, power=1.0, min_lr=0.0, warmup_iters=0, warmup_ratio=1e-6):
        if total_iters <= 0:
            raise ValueError(f"total_iters must be positive, got {total_iters}")
        self.optimizer, self.base_lr, self.total = optimizer, float(base_lr), int(total_iters)
        self.power, self.min_lr = float(power), float(min_lr)
        self.warmup_iters, self.warmup_ratio = int(warmup_iters), float(warmup_ratio)
        self.last_iter = 0
        self._apply()

    def lr_at(self, t: int) -> float:
        frac = min(t, self.total) / self.total
        lr = (self.base_lr - self.min_lr) * (1 - frac) ** self.power + self.min_lr
        if t < self.warmup_iters:
            lr *= 1 - (1 - t / self.warmup_iters) * (1 - self.warmup_ratio)
        return lr

    def _apply(self):
        lr = self.lr_at(self.last_iter)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)

    def step(self):
        self.last_iter += 1
        self._apply()

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"last_iter": self.last_iter, "base_lr": self.base_lr, "total": self.total, "power": self.power,
                "min_lr": self.min_lr, "warmup_iters": self.warmup_iters, "warmup_ratio": self.warmup_ratio}

    def load_state_dict(self, st):
        self.last_iter = int(st["last_iter"])
        self._apply()
