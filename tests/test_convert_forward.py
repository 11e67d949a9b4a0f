"""Converted official weights compute what the official modules compute (float64).

The official modules are re-implemented here from the released code's structure (SenFormer's
``TransformerLearner`` / ``DecoderBlock``, mmseg's ``PatchMerging``, ``WindowMSA``, ``UPerHead``,
``PPM``, ``FCNHead`` and mmcv's ``ConvModule``), working directly on the official weight layout,
independently of our model code.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from senformer.convert.mapping import official_to_ours
from senformer.convert.official_layout import _mmseg_relative_position_index, learner_block_shapes

DT = torch.float64


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _rand(shape, g, scale=1.0):
    return torch.randn(shape, generator=g, dtype=DT) * scale


def official_learner_weights(d, n_cls, blocks, g, prefix="decode_head.learners.0."):
    w = {}
    for j in range(blocks):
        for k, shape in learner_block_shapes(d).items():
            # LayerNorm weights around 1, linears ~ 1/sqrt(fan_in): keeps activations O(1) over blocks
            if k.startswith("norm"):
                w[f"{prefix}layers.{j}.{k}"] = (1.0 if k.endswith("weight") else 0.0) + _rand(shape, g, 0.1)
            else:
                w[f"{prefix}layers.{j}.{k}"] = _rand(shape, g, 1 / math.sqrt(shape[-1]))
    w[prefix + "queries"] = _rand((1, n_cls, d), g)
    for m in ("norm_features", "norm_embs"):
        w[f"{prefix}{m}.weight"] = 1.0 + _rand((d,), g, 0.1)
        w[f"{prefix}{m}.bias"] = _rand((d,), g, 0.1)
    return w


def _ln(x, w, p):
    return F.layer_norm(x, x.shape[-1:], w[p + ".weight"], w[p + ".bias"], eps=1e-5)


def _lin(x, w, p):
    return F.linear(x, w[p + ".weight"], w.get(p + ".bias"))


def official_learner_forward(w, feature, heads, applications, prefix="decode_head.learners.0."):
    """SenFormer's TransformerLearner.forward, step by step from the released head.

    ``applications``: which stored block runs at each step (``[0]*6`` for a weight-shared learner)."""
    b, c, h, wd = feature.shape
    hd = c // heads
    scale = hd ** -0.5
    x = _ln(feature.flatten(2).transpose(1, 2), w, prefix + "norm_features")  # b (h w) c
    cls = w[prefix + "queries"].expand(b, -1, -1)
    n = cls.shape[1]
    for j in applications:
        p = f"{prefix}layers.{j}."
        # CrossAttention: kv = Linear(d, 2d) reshaped (B, L, 2, heads, hd); q = to_q(norm1(cls))
        kv = _lin(x, w, p + "cross_attn.kv").reshape(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
        q = _lin(_ln(cls, w, p + "norm1"), w, p + "cross_attn.to_q").reshape(b, n, heads, hd).permute(0, 2, 1, 3)
        att = ((q @ kv[0].transpose(-2, -1)) * scale).softmax(-1)
        cls = cls + _lin((att @ kv[1]).transpose(1, 2).reshape(b, n, c), w, p + "cross_attn.proj")
        # timm Attention on norm2(cls)
        qkv = _lin(_ln(cls, w, p + "norm2"), w, p + "attn.qkv").reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        att = ((qkv[0] @ qkv[1].transpose(-2, -1)) * scale).softmax(-1)
        cls = cls + _lin((att @ qkv[2]).transpose(1, 2).reshape(b, n, c), w, p + "attn.proj")
        # Mlp: fc1, exact GELU, fc2
        cls = cls + _lin(F.gelu(_lin(_ln(cls, w, p + "norm3"), w, p + "mlp.fc1")), w, p + "mlp.fc2")
    cls = _ln(cls, w, prefix + "norm_embs")
    pred = x @ cls.transpose(-2, -1)  # b (h w) n
    return pred.transpose(1, 2).reshape(b, n, h, wd)


@pytest.mark.parametrize("sharing,stored", [("repeated", 1), ("repeated", 3), ("none", 3)])
def test_learner_matches_official_forward(sharing, stored):
    from senformer.models.learner import build_learners

    g = torch.Generator().manual_seed(7)
    d, heads, n_cls, applications = 64, 8, 19, 3
    w = official_learner_weights(d, n_cls, stored, g)
    if sharing == "repeated" and stored > 1:  # the released code saves the shared block several times
        for k in list(w):
            if ".layers.0." in k:
                for j in range(1, stored):
                    w[k.replace(".layers.0.", f".layers.{j}.")] = w[k].clone()
    steps = [0] * applications if sharing == "repeated" else list(range(applications))
    feature = torch.randn(2, d, 7, 9, generator=g, dtype=DT)  # odd sizes, L=63
    ref = official_learner_forward(w, feature, heads, steps)

    ours, unknown, _ = official_to_ours(w, keep_blocks=1 if sharing == "repeated" else None)
    assert not unknown
    prefix = "head.learners.0."
    learner = build_learners(1, n_cls, d, heads, applications, sharing)[0].to(DT)
    learner.load_state_dict({k[len(prefix):]: v for k, v in ours.items()}, strict=True)
    with torch.no_grad():
        out = learner(feature)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-10
    # the comparison can fail: a block applied in the wrong order changes the output
    if sharing == "none":
        alt = official_learner_forward(w, feature, heads, steps[::-1])
        assert rel_err(alt, ref) > 1e-3


def mmseg_patch_merging(x, hw, norm_w, norm_b, red_w):
    """mmseg PatchMerging.forward: nn.Unfold(2, stride 2) gathers (C, kh, kw), then LN and Linear."""
    b, l, c = x.shape
    h, wd = hw
    x = x.view(b, h, wd, c).permute(0, 3, 1, 2)
    if h % 2 or wd % 2:
        x = F.pad(x, (0, wd % 2, 0, h % 2))
    x = F.unfold(x, kernel_size=2, stride=2).transpose(1, 2)
    x = F.layer_norm(x, x.shape[-1:], norm_w, norm_b, eps=1e-5)
    return F.linear(x, red_w)


def test_patch_merging_permutation_on_a_real_forward():
    from timm.models.swin_transformer import PatchMerging

    g = torch.Generator().manual_seed(3)
    c = 6
    official = {
        "backbone.stages.0.downsample.norm.weight": 1 + _rand((4 * c,), g, 0.3),
        "backbone.stages.0.downsample.norm.bias": _rand((4 * c,), g, 0.3),
        "backbone.stages.0.downsample.reduction.weight": _rand((2 * c, 4 * c), g),
    }
    ours, unknown, _ = official_to_ours(official)
    assert not unknown and set(ours) == {"backbone.body.layers_1.downsample.norm.weight",
                                         "backbone.body.layers_1.downsample.norm.bias",
                                         "backbone.body.layers_1.downsample.reduction.weight"}
    merge = PatchMerging(c, 2 * c).to(DT)
    merge.load_state_dict({k.split("downsample.")[1]: v for k, v in ours.items()}, strict=True)
    x = torch.randn(2, 6, 10, c, generator=g, dtype=DT)  # timm works on (B, H, W, C)
    ref = mmseg_patch_merging(x.reshape(2, 60, c), (6, 10), *official.values()).reshape(2, 3, 5, 2 * c)
    with torch.no_grad():
        out = merge(x)
    assert rel_err(out, ref) < 1e-12
    # without the permutation the layer computes something else
    merge.reduction.weight.data.copy_(official["backbone.stages.0.downsample.reduction.weight"])
    merge.norm.weight.data.copy_(official["backbone.stages.0.downsample.norm.weight"])
    merge.norm.bias.data.copy_(official["backbone.stages.0.downsample.norm.bias"])
    with torch.no_grad():
        assert rel_err(merge(x), ref) > 1e-2


def mmseg_swin_block(x, w, p, heads, window):
    """mmseg SwinBlock (no shift, as FPNT's depth-1 SwinBlockSequence), on (B, H, W, C)."""
    b, h, wd, c = x.shape
    hd = c // heads
    y = F.layer_norm(x, (c,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps=1e-5)
    pr, pb = (window - wd % window) % window, (window - h % window) % window
    y = F.pad(y, (0, 0, 0, pr, 0, pb))
    hp, wp = y.shape[1:3]
    y = y.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, window ** 2, c)
    qkv = F.linear(y, w[p + "attn.w_msa.qkv.weight"], w[p + "attn.w_msa.qkv.bias"])
    qkv = qkv.reshape(y.shape[0], -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
    att = (qkv[0] * hd ** -0.5) @ qkv[1].transpose(-2, -1)
    table, index = w[p + "attn.w_msa.relative_position_bias_table"], w[p + "attn.w_msa.relative_position_index"]
    att = att + table[index.view(-1)].view(window ** 2, window ** 2, -1).permute(2, 0, 1).unsqueeze(0)
    y = (att.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(-1, window ** 2, c)
    y = F.linear(y, w[p + "attn.w_msa.proj.weight"], w[p + "attn.w_msa.proj.bias"])
    y = y.view(b, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    x = x + y[:, :h, :wd]
    z = F.layer_norm(x, (c,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps=1e-5)
    z = F.linear(F.gelu(F.linear(z, w[p + "ffn.layers.0.0.weight"], w[p + "ffn.layers.0.0.bias"])),
                 w[p + "ffn.layers.1.weight"], w[p + "ffn.layers.1.bias"])
    return x + z


def test_fpnt_swin_block_matches_mmseg_forward():
    from senformer.models.necks import SwinWindowBlock

    g = torch.Generator().manual_seed(5)
    c, heads, window = 32, 4, 7
    p = "neck.fpn_swins.2.swin_blocks.blocks.0."
    w = {p + "norm1.weight": 1 + _rand((c,), g, 0.2), p + "norm1.bias": _rand((c,), g, 0.2),
         p + "attn.w_msa.relative_position_bias_table": _rand(((2 * window - 1) ** 2, heads), g),
         p + "attn.w_msa.relative_position_index": _mmseg_relative_position_index(window),
         p + "attn.w_msa.qkv.weight": _rand((3 * c, c), g, c ** -0.5), p + "attn.w_msa.qkv.bias": _rand((3 * c,), g),
         p + "attn.w_msa.proj.weight": _rand((c, c), g, c ** -0.5), p + "attn.w_msa.proj.bias": _rand((c,), g),
         p + "norm2.weight": 1 + _rand((c,), g, 0.2), p + "norm2.bias": _rand((c,), g, 0.2),
         p + "ffn.layers.0.0.weight": _rand((4 * c, c), g, c ** -0.5), p + "ffn.layers.0.0.bias": _rand((4 * c,), g),
         p + "ffn.layers.1.weight": _rand((c, 4 * c), g, (4 * c) ** -0.5), p + "ffn.layers.1.bias": _rand((c,), g)}
    ours, unknown, dropped = official_to_ours(w)
    assert not unknown and dropped == [p + "attn.w_msa.relative_position_index"]
    block = SwinWindowBlock(c, heads, window).to(DT)
    block.load_state_dict({k[len("neck.fpn_outs.2."):]: v for k, v in ours.items()}, strict=True)
    x = torch.randn(2, 9, 16, c, generator=g, dtype=DT)  # not window multiples: padded windows
    ref = mmseg_swin_block(x, w, p, heads, window)
    with torch.no_grad():
        out = block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert rel_err(out, ref) < 1e-10


def test_fpnt_neck_and_head_match_official_pipeline():
    """Backbone features -> official FPNT (laterals, top-down nearest add, Swin block per level) ->
    one learner per level, against our neck + head on the converted weights."""
    from senformer.convert.official_layout import official_config, official_shapes
    from senformer.models.head import SenFormerHead
    from senformer.models.necks import build_neck

    g = torch.Generator().manual_seed(11)
    d, heads, n_cls, blocks = 32, 4, 5, 2
    cfg = official_config("senformer_r50", num_classes=n_cls, num_blocks=blocks, dim=d, neck_heads=heads,
                          head_heads=heads, aux=False)
    w = {}
    for k, shape in official_shapes(cfg).items():
        if not k.startswith(("neck.", "decode_head.learners.")):
            continue
        if k.endswith("relative_position_index"):
            w[k] = _mmseg_relative_position_index(7)
        elif ".norm" in k or k.endswith("relative_position_bias_table") or k.endswith("queries"):
            w[k] = (1.0 if "norm" in k and k.endswith("weight") else 0.0) + _rand(shape, g, 0.3)
        else:  # keep activations O(1): scale by the fan-in
            w[k] = _rand(shape, g, 1 / math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else 1))
    feats = [torch.randn(2, c, s, s + 1, generator=g, dtype=DT) for c, s in zip(cfg.in_channels, (16, 8, 4, 2))]

    lat = [F.conv2d(x, w[f"neck.lateral_convs.{i}.conv.weight"], w[f"neck.lateral_convs.{i}.conv.bias"])
           for i, x in enumerate(feats)]
    for i in range(3, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
    pyramid = [mmseg_swin_block(x.permute(0, 2, 3, 1), w, f"neck.fpn_swins.{i}.swin_blocks.blocks.0.", heads, 7)
               .permute(0, 3, 1, 2) for i, x in enumerate(lat)]
    ref = [official_learner_forward(w, p, heads, list(range(blocks)), f"decode_head.learners.{i}.")
           for i, p in enumerate(pyramid)]

    ours, unknown, _ = official_to_ours(w)
    assert not unknown
    neck = build_neck("fpnt", cfg.in_channels, d, heads, 7).to(DT)
    head = SenFormerHead(n_cls, d, heads, blocks, "none").to(DT)
    neck.load_state_dict({k[5:]: v for k, v in ours.items() if k.startswith("neck.")}, strict=True)
    head.load_state_dict({k[5:]: v for k, v in ours.items() if k.startswith("head.")}, strict=True)
    with torch.no_grad():
        out = head(neck(feats))
    assert len(out) == 4
    for o, r in zip(out, ref):
        assert o.shape == r.shape and rel_err(o, r) < 1e-10


def mmseg_resnet_v1c(w, x, depths):
    """mmseg ResNetV1c (style='pytorch', strides 1,2,2,2, no dilation), BN in eval mode -> C2..C5."""
    def bn(t, p):
        return F.batch_norm(t, w[p + ".running_mean"], w[p + ".running_var"], w[p + ".weight"], w[p + ".bias"],
                            False, 0.0, 1e-5)

    for conv, norm, stride in ((0, 1, 2), (3, 4, 1), (6, 7, 1)):
        x = F.relu(bn(F.conv2d(x, w[f"backbone.stem.{conv}.weight"], stride=stride, padding=1), f"backbone.stem.{norm}"))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for s, n in enumerate(depths):
        for b in range(n):
            p = f"backbone.layer{s + 1}.{b}."
            stride = 2 if s > 0 and b == 0 else 1
            y = F.relu(bn(F.conv2d(x, w[p + "conv1.weight"]), p + "bn1"))
            y = F.relu(bn(F.conv2d(y, w[p + "conv2.weight"], stride=stride, padding=1), p + "bn2"))
            y = bn(F.conv2d(y, w[p + "conv3.weight"]), p + "bn3")
            if b == 0:
                x = bn(F.conv2d(x, w[p + "downsample.0.weight"], stride=stride), p + "downsample.1")
            x = F.relu(x + y)
        outs.append(x)
    return outs


def test_resnet_v1c_backbone_matches_mmseg_forward():
    """The deep-stem renaming (stem.0..7 -> conv1.0..6, bn1) and the bottleneck layout, on a real forward."""
    from senformer.convert.official_layout import official_config, random_official_state_dict
    from senformer.models.backbones import TimmBackbone

    cfg = official_config("senformer_r50", aux=False)
    w = {k: v.to(DT) if v.is_floating_point() else v
         for k, v in random_official_state_dict(cfg, seed=9).items() if k.startswith("backbone.")}
    for k, v in w.items():  # conv weights ~ 1/sqrt(fan_in) keep activations O(1) through 50 layers
        if v.dim() == 4:
            w[k] = v / math.sqrt(v[0].numel())
    ours, unknown, _ = official_to_ours(w)
    assert not unknown
    net = TimmBackbone("resnet50c").to(DT).eval()
    net.load_state_dict({k[len("backbone."):]: v for k, v in ours.items()}, strict=True)
    x = torch.randn(1, 3, 35, 45, generator=torch.Generator().manual_seed(2), dtype=DT)  # odd sizes
    ref = mmseg_resnet_v1c(w, x, cfg.depths)
    with torch.no_grad():
        out = net(x)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and rel_err(o, r) < 1e-10
    # the two 32-channel stem BNs have the same shape: only the forward tells them apart
    sd = net.state_dict()
    net.load_state_dict({**sd, **{k.replace("conv1.1.", "conv1.4."): v for k, v in sd.items() if ".conv1.1." in k},
                         **{k.replace("conv1.4.", "conv1.1."): v for k, v in sd.items() if ".conv1.4." in k}})
    with torch.no_grad():
        assert rel_err(net(x)[0], ref[0]) > 1e-3


@pytest.mark.parametrize("window", [7, 12])
def test_timm_swin_reads_the_bias_table_as_mmseg_does(window):
    """The backbone's tables are copied unchanged: valid only if timm indexes them like mmseg."""
    from timm.models.swin_transformer import get_relative_position_index

    assert torch.equal(get_relative_position_index(window, window), _mmseg_relative_position_index(window))


def mmseg_conv_module(x, w, p, padding=0):
    """mmcv ConvModule with norm_cfg=SyncBN: conv (no bias, bias='auto'), BN (eval mode), ReLU."""
    x = F.conv2d(x, w[p + ".conv.weight"], padding=padding)
    x = F.batch_norm(x, w[p + ".bn.running_mean"], w[p + ".bn.running_var"], w[p + ".bn.weight"], w[p + ".bn.bias"],
                     False, 0.0, 1e-5)
    return F.relu(x)


def _up(x, size):
    # mmseg.ops.resize as UPerHead / PPM call it
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def mmseg_uper_head(w, inputs, pool_scales=(1, 2, 3, 6)):
    """mmseg 0.20 UPerHead.forward (uper_head.py) with PPM.forward (psp_head.py); eval mode, so
    ``cls_seg``'s dropout is the identity."""
    laterals = [mmseg_conv_module(inputs[i], w, f"decode_head.lateral_convs.{i}") for i in range(len(inputs) - 1)]
    x = inputs[-1]
    psp = [x] + [_up(mmseg_conv_module(F.adaptive_avg_pool2d(x, s), w, f"decode_head.psp_modules.{i}.1"), x.shape[2:])
                 for i, s in enumerate(pool_scales)]
    laterals.append(mmseg_conv_module(torch.cat(psp, dim=1), w, "decode_head.bottleneck", padding=1))
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + _up(laterals[i], laterals[i - 1].shape[2:])
    outs = [mmseg_conv_module(laterals[i], w, f"decode_head.fpn_convs.{i}", padding=1)
            for i in range(len(laterals) - 1)]
    outs.append(laterals[-1])
    outs = [outs[0]] + [_up(o, outs[0].shape[2:]) for o in outs[1:]]
    y = mmseg_conv_module(torch.cat(outs, dim=1), w, "decode_head.fpn_bottleneck", padding=1)
    return F.conv2d(y, w["decode_head.conv_seg.weight"], w["decode_head.conv_seg.bias"])


def mmseg_fcn_aux(w, c4):
    """mmseg FCNHead(num_convs=1, concat_input=False), eval mode."""
    y = mmseg_conv_module(c4, w, "auxiliary_head.convs.0", padding=1)
    return F.conv2d(y, w["auxiliary_head.conv_seg.weight"], w["auxiliary_head.conv_seg.bias"])


def official_upernet_weights(preset, seed, **changes):
    """A float64 mmseg UperNet state dict with activations kept O(1): conv weights ~ 1/sqrt(fan_in)."""
    from senformer.convert.official_layout import official_config, random_official_state_dict

    cfg = official_config(preset, **changes)
    w = {k: v.to(DT) if v.is_floating_point() else v for k, v in random_official_state_dict(cfg, seed=seed).items()}
    for k, v in w.items():
        if v.dim() == 4:
            w[k] = v / math.sqrt(v[0].numel())
    return cfg, w


def test_upernet_r50_matches_mmseg_forward():
    """A whole mmseg UperNet R50 (real widths) on a small odd-sized image: backbone, UPerHead and the
    auxiliary FCN head on the converted weights against mmseg's forward on the official tensors."""
    from senformer.convert import build_kwargs
    from senformer.convert.infer import infer_official
    from senformer.models.zoo import build_model

    cfg, w = official_upernet_weights("upernet_r50", seed=13, num_classes=19)
    ours, unknown, dropped = official_to_ours(w, arch="upernet")
    assert not unknown and not dropped  # decode_head.conv_seg is UperNet's classifier: kept
    model = build_model("upernet_r50", **build_kwargs(infer_official(w))).to(DT).eval()
    model.load_state_dict(ours, strict=True)
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(4), dtype=DT)  # C5 is 2x3
    feats = mmseg_resnet_v1c(w, x, cfg.depths)
    ref, ref_aux = mmseg_uper_head(w, feats), mmseg_fcn_aux(w, feats[2])
    with torch.no_grad():
        (out,) = model.learner_logits(x)
        aux = model.aux_head(model.backbone(x)[2])
    assert out.shape == ref.shape == (1, 19, 16, 20) and aux.shape == ref_aux.shape
    assert rel_err(out, ref) < 1e-10 and rel_err(aux, ref_aux) < 1e-10
    # the comparison can fail: the four PPM stages have equal shapes, only their pool scales differ
    assert rel_err(mmseg_uper_head(w, feats, pool_scales=(6, 3, 2, 1)), ref) > 1e-3


def test_upernet_head_on_swin_t_widths_matches_mmseg_forward():
    """UPerHead + FCN head for Swin-T's channels (96..768), on features (the Swin backbone mapping is
    shared with SenFormer and checked on its own)."""
    from senformer.models.aux_head import FCNHead
    from senformer.models.baselines import UPerHead

    cfg, w = official_upernet_weights("upernet_swin_t", seed=17, num_classes=11, channels=64, aux_channels=32)
    w = {k: v for k, v in w.items() if k.startswith(("decode_head.", "auxiliary_head."))}
    ours, unknown, _ = official_to_ours(w, arch="upernet")
    assert not unknown
    head = UPerHead(list(cfg.in_channels), 11, 64).to(DT).eval()
    aux_head = FCNHead(cfg.in_channels[2], 32, 11).to(DT).eval()
    head.load_state_dict({k[len("head."):]: v for k, v in ours.items() if k.startswith("head.")}, strict=True)
    aux_head.load_state_dict({k[len("aux_head."):]: v for k, v in ours.items() if k.startswith("aux_head.")},
                             strict=True)
    g = torch.Generator().manual_seed(6)
    feats = [torch.randn(2, c, h, wd, generator=g, dtype=DT)
             for c, (h, wd) in zip(cfg.in_channels, ((16, 20), (8, 10), (4, 5), (2, 3)))]
    with torch.no_grad():
        (out,) = head(feats)
        aux = aux_head(feats[2])
    assert rel_err(out, mmseg_uper_head(w, feats)) < 1e-10
    assert rel_err(aux, mmseg_fcn_aux(w, feats[2])) < 1e-10
