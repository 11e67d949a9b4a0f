"""senformer's Swin backbones compute mmseg 0.20's Swin (the official SenFormer backbone) at every size.

The reference here is re-implemented from mmseg 0.20's ``WindowMSA``, ``ShiftWindowMSA``,
``SwinBlock``, ``PatchEmbed`` (corner padding), ``PatchMerging`` (``nn.Unfold``) and
``SwinTransformer.forward``, step by step on ``(B, L, C)`` token lists as mmseg works, and reads only
the parameters of senformer's modules: window, shift and heads come from the architecture, not from
the modules under test. Everything in float64 with random weights.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from senformer.models.backbones import TimmBackbone
from senformer.models.swin_mmseg import MmsegSwinBlock, shifted_window_mask

DT = torch.float64

# name, timm model, embed dim, heads per stage, window, the paper's crop
ARCHS = {
    "swin_t": ("swin_tiny_patch4_window7_224", 96, (3, 6, 12, 24), 7, 512),
    "swin_s": ("swin_small_patch4_window7_224", 96, (3, 6, 12, 24), 7, 512),
    "swin_b": ("swin_base_patch4_window12_384", 128, (4, 8, 16, 32), 12, 640),
    "swin_l": ("swin_large_patch4_window12_384", 192, (6, 12, 24, 48), 12, 640),
}


def rel_err(a, b):
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def randomize_(module, seed):
    """Random, non-trivial weights: LayerNorms around 1, linears/convs ~ 1/sqrt(fan_in), O(1) bias tables."""
    g = torch.Generator().manual_seed(seed)
    done = set()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g, dtype=DT))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g, dtype=DT))
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=DT) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=DT))
            elif hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.copy_(torch.randn(m.relative_position_bias_table.shape,
                                                                 generator=g, dtype=DT))
            else:
                continue
            done.update(id(p) for p in m.parameters(recurse=False))
    assert all(id(p) in done for p in module.parameters()), "a parameter kept its initial value"
    return module


# ---------------------------------------------------------------- the mmseg 0.20 reference


def mmseg_relative_position_index(window):
    # WindowMSA.__init__: double_step_seq(2*Ww-1, Wh, 1, Ww), added to its transpose, flipped along dim 1
    seq = (torch.arange(0, (2 * window - 1) * window, 2 * window - 1)[:, None] + torch.arange(window)[None, :])
    seq = seq.reshape(1, -1)
    return (seq + seq.T).flip(1)


def mmseg_window_partition(x, window):
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window, window, c)


def mmseg_window_reverse(windows, h, w, window):
    b = int(windows.shape[0] / (h * w / window / window))
    x = windows.view(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def mmseg_attn_mask(hp, wp, window, shift):
    # ShiftWindowMSA.forward: nine regions of the padded map, by slices, as mmseg labels them
    img_mask = torch.zeros((1, hp, wp, 1), dtype=DT)
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    cnt = 0
    for hs in slices:
        for ws in slices:
            img_mask[:, hs, ws, :] = cnt
            cnt += 1
    mask_windows = mmseg_window_partition(img_mask, window).view(-1, window * window)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def mmseg_window_msa(x, attn, heads, window, mask):
    """WindowMSA.forward on (num_windows*B, N, C) with the weights of timm's WindowAttention ``attn``."""
    b, n, c = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[mmseg_relative_position_index(window).view(-1)]
    a = a + bias.view(window * window, window * window, -1).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        a = a.view(b // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        a = a.view(-1, heads, n, n)
    x = (a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return F.linear(x, attn.proj.weight, attn.proj.bias)


def mmseg_shift_window_msa(query, hw, attn, heads, window, shift):
    """ShiftWindowMSA.forward: pad to window multiples, THEN roll; mask on the padded map."""
    b, length, c = query.shape
    h, w = hw
    query = query.view(b, h, w, c)
    pad_r = (window - w % window) % window
    pad_b = (window - h % window) % window
    query = F.pad(query, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = query.shape[1], query.shape[2]
    if shift > 0:
        shifted = torch.roll(query, shifts=(-shift, -shift), dims=(1, 2))
        mask = mmseg_attn_mask(hp, wp, window, shift)
    else:
        shifted, mask = query, None
    windows = mmseg_window_partition(shifted, window).view(-1, window ** 2, c)
    windows = mmseg_window_msa(windows, attn, heads, window, mask).view(-1, window, window, c)
    shifted = mmseg_window_reverse(windows, hp, wp, window)
    x = torch.roll(shifted, shifts=(shift, shift), dims=(1, 2)) if shift > 0 else shifted
    return x[:, :h, :w, :].reshape(b, h * w, c)


def _ln(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, eps=1e-5)


def mmseg_swin_block(x, hw, blk, heads, window, shift):
    """SwinBlock._inner_forward: pre-norm shifted-window attention + residual, pre-norm FFN + residual."""
    x = mmseg_shift_window_msa(_ln(x, blk.norm1), hw, blk.attn, heads, window, shift) + x
    ffn = F.linear(F.gelu(F.linear(_ln(x, blk.norm2), blk.mlp.fc1.weight, blk.mlp.fc1.bias)),
                   blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + ffn


def mmseg_patch_merging(x, hw, merge):
    """PatchMerging.forward: corner-pad odd sizes, nn.Unfold(2, 2) -> (C, kh, kw) order, LN, Linear.

    timm (like Microsoft's Swin) concatenates the 2x2 neighbours as (0,0), (1,0), (0,1), (1,1), i.e.
    neighbour k = 2*dw + dh, channel k*C + c; unfold puts it at c*4 + 2*dh + dw: reorder the weights."""
    b, length, c = x.shape
    h, w = hw
    x = x.view(b, h, w, c).permute(0, 3, 1, 2)
    x = F.pad(x, [0, w % 2, 0, h % 2])  # AdaptivePadding(corner) for kernel = stride = 2
    h, w = x.shape[-2:]
    x = F.unfold(x, kernel_size=2, stride=2).transpose(1, 2)
    perm = torch.tensor([(2 * dw + dh) * c + ch for ch in range(c) for dh in range(2) for dw in range(2)])
    x = F.layer_norm(x, x.shape[-1:], merge.norm.weight[perm], merge.norm.bias[perm], eps=1e-5)
    return F.linear(x, merge.reduction.weight[:, perm]), (h // 2, w // 2)


def mmseg_swin_forward(bb, img, heads, window, patch=4):
    """SwinTransformer.forward (PatchEmbed with corner padding, stages, out norms) on ``bb``'s weights."""
    h, w = img.shape[-2:]
    img = F.pad(img, [0, math.ceil(w / patch) * patch - w, 0, math.ceil(h / patch) * patch - h])
    pe = bb.body.patch_embed
    x = F.conv2d(img, pe.proj.weight, pe.proj.bias, stride=patch)
    hw = tuple(x.shape[-2:])
    x = _ln(x.flatten(2).transpose(1, 2), pe.norm)
    outs = []
    for i in range(4):
        stage = getattr(bb.body, f"layers_{i}")
        if i > 0:  # mmseg downsamples at the end of stage i-1, after taking its output
            x, hw = mmseg_patch_merging(x, hw, stage.downsample)
        for j, blk in enumerate(stage.blocks):
            x = mmseg_swin_block(x, hw, blk, heads[i], window, window // 2 if j % 2 else 0)
        outs.append(_ln(x, bb.out_norms[i]).view(x.shape[0], *hw, -1).permute(0, 3, 1, 2))
    return outs


# ---------------------------------------------------------------- helpers on senformer's model


_BACKBONES = {}


def backbone(arch, **kw):
    """senformer's backbone at the paper's crop (built once per test module)."""
    key = (arch, tuple(sorted(kw.items())))
    if key not in _BACKBONES:
        name, _, _, window, crop = ARCHS[arch]
        _BACKBONES[key] = TimmBackbone(name, img_size=crop, window_size=window, **kw).eval()
    return _BACKBONES[key]


def timm_order(block, x):
    """The same block with timm's own (roll, then pad) order: what the tests must tell apart."""
    from timm.models.swin_transformer import SwinTransformerBlock

    block.__class__ = SwinTransformerBlock
    try:
        return block(x)
    finally:
        block.__class__ = MmsegSwinBlock


def check_block(blk, hw, heads, window, shift, seed, tol=1e-10):
    blk = randomize_(copy.deepcopy(blk).to(DT), seed)
    assert isinstance(blk, MmsegSwinBlock)
    c = blk.norm1.weight.shape[0]
    x = torch.randn(1, *hw, c, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    with torch.no_grad():
        ref = mmseg_swin_block(x.reshape(1, -1, c), hw, blk, heads, window, shift).view(1, *hw, c)
        out = blk(x)
    err = rel_err(out, ref)
    assert out.shape == ref.shape and err < tol, f"{hw} shift {shift}: rel err {err:.3g}"
    return blk, x, ref, err


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("hw", [(128, 128), (37, 53), (5, 4), (7, 3)])
def test_shifted_block_matches_mmseg(hw):
    """A shifted block of Swin-T's stage 1 (window 7) on maps that are not window multiples, one
    smaller than the window: mmseg pads it to one full window and still shifts and masks."""
    _, _, heads, window, _ = ARCHS["swin_t"]
    blk = backbone("swin_t").body.layers_0.blocks[1]
    assert tuple(blk.window_size) == (window, window) and tuple(blk.shift_size) == (3, 3)
    blk, x, ref, _ = check_block(blk, hw, heads[0], window, 3, seed=sum(hw))
    # the test can fail: timm's roll-then-pad order computes something else on these maps
    with torch.no_grad():
        assert rel_err(timm_order(blk, x), ref) > 1e-4


def test_orders_agree_on_window_multiples():
    """On a window-multiple map (126 = 18 * 7) timm's order and mmseg's coincide: the reference and the
    block differ from timm only by the padding order, nothing else."""
    _, _, heads, window, _ = ARCHS["swin_t"]
    blk, x, ref, _ = check_block(backbone("swin_t").body.layers_0.blocks[1], (126, 126), heads[0], window, 3, seed=4)
    with torch.no_grad():
        assert rel_err(timm_order(blk, x), ref) < 1e-10


@pytest.mark.parametrize("arch", list(ARCHS))
def test_blocks_at_the_paper_sizes(arch):
    """Every stage of Swin-T/S (crop 512, window 7: maps 128, 64, 32, 16) and Swin-B/L (crop 640,
    window 12: maps 160, 80, 40, 20): an unshifted and a shifted block of the real width and heads.
    Stages are cut to two blocks for B/L (the block function does not depend on the depth)."""
    _, dim, heads, window, crop = ARCHS[arch]
    bb = backbone(arch, depths=(2, 2, 2, 2)) if arch in ("swin_b", "swin_l") else backbone(arch)
    for i in range(4):
        stage = getattr(bb.body, f"layers_{i}")
        side = crop // 4 >> i
        assert stage.blocks[0].norm1.weight.shape[0] == dim << i
        # the last pair of the stage: in Swin-T/S's 6- and 18-block stages these are not blocks 0/1
        for j in (len(stage.blocks) - 2, len(stage.blocks) - 1):
            shift = window // 2 if j % 2 else 0
            blk, x, ref, err = check_block(stage.blocks[j], (side, side), heads[i], window, shift, seed=10 * i + j)
            print(f"{arch} stage {i} ({side}x{side}) block {j} shift {shift}: rel err {err:.2e}")
            if shift and arch in ("swin_t", "swin_b"):
                # no stage map of these crops is a window multiple: timm's order differs in each shifted
                # block (a property of map and window sizes, which S and L share with T and B)
                with torch.no_grad():
                    assert rel_err(timm_order(blk, x), ref) > 1e-4


def test_whole_swin_t_matches_mmseg_end_to_end():
    """Swin-T on 198x263 (corner padding to 200x264; stage maps 50x66, 25x33, 13x17, 7x9: odd sizes for
    the patch merging, no window multiples): all four normed outputs against mmseg's forward."""
    _, _, heads, window, _ = ARCHS["swin_t"]
    bb = randomize_(copy.deepcopy(backbone("swin_t")).to(DT), seed=21)
    x = torch.randn(1, 3, 198, 263, generator=torch.Generator().manual_seed(22), dtype=DT)
    with torch.no_grad():
        ref = mmseg_swin_forward(bb, x, heads, window)
        out = bb(x)
    assert [tuple(o.shape[-2:]) for o in out] == [(50, 66), (25, 33), (13, 17), (7, 9)]
    for i, (o, r) in enumerate(zip(out, ref)):
        err = rel_err(o, r)
        print(f"swin_t 198x263 stage {i}: rel err {err:.2e}")
        assert o.shape == r.shape and err < 1e-10


def test_mask_matches_mmseg_slices():
    """The loop-free mask equals mmseg's nine-slice mask, including a map of one window."""
    for hp, wp, window in ((14, 21, 7), (7, 7, 7), (24, 36, 12), (12, 12, 12)):
        mask = shifted_window_mask(hp, wp, (window, window), (window // 2, window // 2), dtype=DT)
        assert torch.equal(mask, mmseg_attn_mask(hp, wp, window, window // 2))


def test_small_stage_keeps_window_and_shift():
    """mmseg never shrinks the window of a stage whose map is smaller than it; timm would at img_size 64."""
    bb = TimmBackbone("swin_tiny_patch4_window7_224", img_size=64, window_size=7)
    for i in range(4):
        blocks = getattr(bb.body, f"layers_{i}").blocks
        assert all(tuple(b.attn.window_size) == (7, 7) for b in blocks)
        assert all(tuple(b.shift_size) == ((3, 3) if j % 2 else (0, 0)) for j, b in enumerate(blocks))
        assert all(b.attn.relative_position_bias_table.shape[0] == 13 * 13 for b in blocks)


def test_drop_path_schedule_matches_mmseg():
    """mmseg: dpr = linspace(0, drop_path_rate, sum(depths)), one rate per block, on the attention and
    the FFN branch alike. senformer's Swin-S at the presets' 0.3 must use the same rates."""
    bb = TimmBackbone("swin_small_patch4_window7_224", img_size=512, window_size=7, drop_path_rate=0.3)
    blocks = [b for i in range(4) for b in getattr(bb.body, f"layers_{i}").blocks]
    expected = [x.item() for x in torch.linspace(0, 0.3, 24)]
    assert len(blocks) == 24
    for blk, rate in zip(blocks, expected):
        for branch in (blk.drop_path1, blk.drop_path2):
            assert getattr(branch, "drop_prob", 0.0) == pytest.approx(rate, abs=1e-12)


def test_timm_weights_with_smaller_windows_load_resized(tmp_path):
    """A timm checkpoint whose small stages had shrunk windows loads with the tables resized bicubically,
    as mmseg's init_weights resizes a pretrained table of another window size."""
    import timm

    src = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64)
    table = src.layers[3].blocks[0].attn.relative_position_bias_table  # window shrunk to 2: 3x3 table
    assert table.shape == (9, 24)
    torch.save(src.state_dict(), tmp_path / "swin.pth")
    bb = TimmBackbone("swin_tiny_patch4_window7_224", img_size=64, pretrained=str(tmp_path / "swin.pth"))
    grid = table.detach().permute(1, 0).reshape(1, 24, 3, 3)
    want = F.interpolate(grid, size=(13, 13), mode="bicubic").reshape(24, 169).permute(1, 0)
    assert torch.allclose(bb.body.layers_3.blocks[0].attn.relative_position_bias_table, want)
    assert torch.equal(bb.body.layers_0.blocks[1].attn.relative_position_bias_table,
                       src.layers[0].blocks[1].attn.relative_position_bias_table)
