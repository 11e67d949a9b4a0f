import copy

import pytest
import torch

from senformer.engine.config import DEFAULTS, load_config
from senformer.engine.optim import PolyWarmup, build_optimizer, param_groups
from senformer.engine.trainer import train


class Named(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.backbone.absolute_pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 2))
        self.head = torch.nn.Linear(4, 4)
        self.head.cls_emb = torch.nn.Parameter(torch.zeros(5, 4))
        self.head.relative_position_bias_table = torch.nn.Parameter(torch.zeros(9, 2))


def test_param_groups_lr_mult_and_no_decay():
    groups = {(g["lr_mult"], g["weight_decay"]): set(g["names"]) for g in param_groups(Named(), 1e-4, 0.01, 0.1)}
    assert groups == {
        (0.1, 0.01): {"backbone.0.weight"},
        (0.1, 0.0): {"backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "backbone.absolute_pos_embed"},
        (1.0, 0.01): {"head.weight"},
        (1.0, 0.0): {"head.bias", "head.cls_emb", "head.relative_position_bias_table"},
    }


def test_poly_warmup_schedule():
    opt = build_optimizer(Named(), lr=1e-3, weight_decay=0.01, backbone_lr_mult=0.1)
    s = PolyWarmup(opt, 1e-3, total_iters=100, power=1.0, warmup_iters=10, warmup_ratio=1e-6)
    lrs = []
    for _ in range(100):
        lrs.append(max(s.get_last_lr()))
        s.step()
    assert lrs[0] == pytest.approx(1e-9)
    assert lrs[5] == pytest.approx(1e-3 * 0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert lrs[50] == pytest.approx(5e-4)
    assert s.get_last_lr()[-1] == 0.0
    assert min(s.get_last_lr()) == 0.0
    bb = [g["lr"] for g in opt.param_groups if g["lr_mult"] == 0.1]
    s2 = PolyWarmup(opt, 1e-3, 100, power=0.9)
    s2.load_state_dict({"last_iter": 30})
    assert max(s2.get_last_lr()) == pytest.approx(1e-3 * 0.7 ** 0.9) and bb


def test_config_overrides_and_errors():
    cfg = load_config(None, ["optim.lr=2e-4", "data.crop_size=[32, 48]"])
    assert cfg["optim"]["lr"] == 2e-4 and cfg["data"]["crop_size"] == [32, 48]
    assert DEFAULTS["optim"]["lr"] != 2e-4  # defaults are not mutated
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ValueError, match="unknown section 'optimz'"):
        load_config(None, ["optimz.lr=1"])
    with pytest.raises(FileNotFoundError, match="available: .*ade20k_r50"):
        load_config("no_such_preset")
    ade = load_config("ade20k_r50")
    assert ade["data"]["dataset"] == "ade20k" and ade["data"]["options"] == {}
    assert ade["schedule"]["iters"] == 160000 and ade["optim"]["backbone_lr_mult"] == 0.1


def toy_cfg(iters=8):
    cfg = load_config(None, [
        ("model.preset", "toy"), ("data.options", {"size": [40, 40]}), ("data.scale", [40, 40]),
        ("data.crop_size", [32, 32]), ("data.batch_size", 4), ("data.num_workers", 0),
        ("data.val_options", {"length": 3}), ("schedule.iters", iters), ("schedule.warmup_iters", 2),
        ("checkpoint.interval", 0), ("log.interval", 3), ("optim.lr", 3e-3), ("device", "cpu")])
    return cfg


def test_interrupted_and_resumed_run_matches_straight_run(tmp_path):
    cfg = toy_cfg(8)
    cfg["eval"]["interval"] = 3  # evaluating mid-run must not disturb the training stream either
    straight = train(copy.deepcopy(cfg), tmp_path / "a", progress=False, print_fn=lambda *_: None)
    first = train(copy.deepcopy(cfg), tmp_path / "b", stop_after=4, progress=False)
    assert first["metrics"] is None and first["step"] == 4
    # the second half loads its data in a worker process: samples depend on their seed, not on who loads them
    cfg2 = copy.deepcopy(cfg)
    cfg2["data"]["num_workers"] = 1
    second = train(cfg2, tmp_path / "b", resume=True, progress=False, print_fn=lambda *_: None)
    assert len(straight["losses"]) == 8 and len(first["losses"]) == 4 and len(second["losses"]) == 4
    assert first["losses"] + second["losses"] == straight["losses"]  # bit-identical, not just close
    for a, b in zip(straight["model"].state_dict().values(), second["model"].state_dict().values()):
        assert torch.equal(a, b)
    assert straight["metrics"]["mIoU"] == second["metrics"]["mIoU"]
    scalars = (tmp_path / "a" / "scalars.csv").read_text()
    assert scalars.count(",train/loss,") == 3 and "3,val/mIoU" in scalars and "6,val/mIoU" in scalars
    assert "final" in (tmp_path / "a" / "train.log").read_text()


def test_misspelt_config_keys_are_reported():
    with pytest.raises(ValueError, match="optim.lrr"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ValueError, match="data.options must be a mapping"):
        load_config(None, ["data.options=3"])


def test_typed_config_object_matches_the_dict():
    from senformer.engine.config import RunConfig, to_dataclass
    cfg = load_config("ade20k_swin_b", ["optim.lr=2e-4"])
    typed = to_dataclass(cfg)
    assert isinstance(typed, RunConfig) and typed.optim.lr == 2e-4 and typed.data.crop_size == [640, 640]
    assert typed.model.preset == "senformer_swin_b" and typed.eval.protocol == "official"
