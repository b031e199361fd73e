"""The authors' DynamicCNN / DynamicSwin checkpoint layouts (spatial.md) load and give their formulas' logits.

Each reference below is written from the spec's equations in plain torch, directly on a state dict
in the authors' layout (the original ConvNeXt / Swin names plus `score_predictor`, `fast_path`,
`fastmlp`), sharing no code with the package. Random weights, large enough that every part matters.
"""
import pytest
import torch
import torch.nn.functional as F

import dynamicvit
from dynamicvit.errors import CheckpointError

CLASSES = 10
LOCS = (1, 2, 3)


class Weights:
    """Random tensors for a state dict in the authors' layout."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.sd = {}

    def rand(self, *shape, scale=0.1):
        return torch.randn(*shape, generator=self.gen) * scale

    def norm(self, prefix, c):
        self.sd[prefix + ".weight"] = 1 + self.rand(c)
        self.sd[prefix + ".bias"] = self.rand(c)

    def layer(self, prefix, *shape, scale=0.1, bias=True):
        self.sd[prefix + ".weight"] = self.rand(*shape, scale=scale)
        if bias:
            self.sd[prefix + ".bias"] = self.rand(shape[0], scale=scale)

    def predictor(self, prefix, c, conv: bool):
        k = (1, 1) if conv else ()
        self.norm(prefix + ".in_conv.0", c)
        self.layer(prefix + ".in_conv.1", c, c, *k, scale=0.3)
        self.layer(prefix + ".out_conv.0", c // 2, c, *k, scale=0.3)
        self.layer(prefix + ".out_conv.2", c // 4, c // 2, *k, scale=0.3)
        self.layer(prefix + ".out_conv.4", 2, c // 4, *k, scale=0.3)


def predictor_scores(sd, prefix, tokens, eps):
    """The prediction module on tokens (B, N, C): log p(keep), (B, N). The 1x1-conv form of DynamicCNN
    is the same map per position, so conv weights (out, in, 1, 1) are applied as matrices."""
    w = lambda name: sd[f"{prefix}.{name}.weight"].flatten(1)  # noqa: E731
    b = lambda name: sd[f"{prefix}.{name}.bias"]  # noqa: E731
    C = tokens.shape[-1]
    h = F.layer_norm(tokens, (C,), sd[f"{prefix}.in_conv.0.weight"], sd[f"{prefix}.in_conv.0.bias"], eps)
    h = F.gelu(h @ w("in_conv.1").T + b("in_conv.1"))
    glob = h[..., C // 2 :].mean(dim=1, keepdim=True).expand(-1, h.shape[1], -1)
    z = torch.cat([h[..., : C // 2], glob], dim=-1)
    z = F.gelu(z @ w("out_conv.0").T + b("out_conv.0"))
    z = F.gelu(z @ w("out_conv.2").T + b("out_conv.2"))
    z = z @ w("out_conv.4").T + b("out_conv.4")
    return F.log_softmax(z, dim=-1)[..., 0]


def adaptive_ffn(t, keep_count, score, ffn, fast):
    """Top positions by score (argsort, descending) through `ffn`, the rest through `fast`, per image."""
    out = torch.zeros_like(t)
    for b in range(t.shape[0]):
        order = torch.argsort(score[b], descending=True)
        keep, rest = order[:keep_count], order[keep_count:]
        out[b, keep] = ffn(t[b, keep])
        out[b, rest] = fast(t[b, rest])
    return out


# -- ConvNeXt (DynamicCNN) -------------------------------------------------------------------------

CNX_DEPTHS, CNX_DIMS = (1, 1, 4, 1), (16, 32, 64, 128)


def convnext_checkpoint(seed=0, dynamic=True):
    w = Weights(seed)
    d = CNX_DIMS
    w.layer("downsample_layers.0.0", d[0], 3, 4, 4, scale=0.2)
    w.norm("downsample_layers.0.1", d[0])
    for i in range(1, 4):
        w.norm(f"downsample_layers.{i}.0", d[i - 1])
        w.layer(f"downsample_layers.{i}.1", d[i], d[i - 1], 2, 2, scale=0.1)
    for i, depth in enumerate(CNX_DEPTHS):
        C = d[i]
        for j in range(depth):
            p = f"stages.{i}.{j}."
            w.layer(p + "dwconv", C, 1, 7, 7, scale=0.1)
            w.norm(p + "norm", C)
            w.layer(p + "pwconv1", 4 * C, C)
            w.layer(p + "pwconv2", C, 4 * C)
            w.sd[p + "gamma"] = 0.2 + 0.4 * torch.rand(C, generator=w.gen)
            if dynamic and i == 2 and j >= LOCS[0]:
                w.norm(p + "fast_path.0", C)
                w.layer(p + "fast_path.1", C, C, scale=0.2)
                w.sd[p + "fast_path_gamma"] = 0.2 + 0.4 * torch.rand(C, generator=w.gen)
    if dynamic:
        for s in range(len(LOCS)):
            w.predictor(f"score_predictor.{s}", d[2], conv=True)
    w.norm("norm", d[3])
    w.layer("head", CLASSES, d[3])
    return w.sd


def convnext_reference(sd, x, ratios, decisions=None):
    """DynamicCNN from the spec: eval (top-k gather/scatter) or, given decisions, the two-stream
    training equations with the streams carried over between predictors (the authors' release).
    Without predictor weights (the original ConvNeXt release) every block is dense.
    Returns (logits, final normalized map as (B, N4, C4))."""
    dynamic = "score_predictor.0.in_conv.0.weight" in sd
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-6)  # noqa: E731
    ln_cf = lambda t, p: ln(t.permute(0, 2, 3, 1), p).permute(0, 3, 1, 2)  # noqa: E731
    for i in range(4):
        d = f"downsample_layers.{i}."
        if i == 0:
            x = ln_cf(F.conv2d(x, sd[d + "0.weight"], sd[d + "0.bias"], stride=4), d + "1")
        else:
            x = F.conv2d(ln_cf(x, d + "0"), sd[d + "1.weight"], sd[d + "1.bias"], stride=2)
        B, C, H, W = x.shape
        x1 = x2 = m = None
        for j in range(CNX_DEPTHS[i]):
            p = f"stages.{i}.{j}."
            dw = lambda t: F.conv2d(t, sd[p + "dwconv.weight"], sd[p + "dwconv.bias"], padding=3, groups=C)  # noqa: E731
            ffn = lambda t: sd[p + "gamma"] * F.linear(  # noqa: E731
                F.gelu(F.linear(ln(t, p + "norm"), sd[p + "pwconv1.weight"], sd[p + "pwconv1.bias"])),
                sd[p + "pwconv2.weight"], sd[p + "pwconv2.bias"],
            )
            fast = lambda t: sd[p + "fast_path_gamma"] * F.linear(  # noqa: E731
                ln(t, p + "fast_path.0"), sd[p + "fast_path.1.weight"], sd[p + "fast_path.1.bias"]
            )
            cl = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731
            cf = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731
            adaptive = dynamic and i == 2 and j >= LOCS[0]
            if dynamic and i == 2 and j in LOCS:
                s = LOCS.index(j)
                if decisions is None:
                    score = predictor_scores(sd, f"score_predictor.{s}", cl(x).reshape(B, H * W, C), 1e-6)
                    keep_count = int(H * W * ratios[s])
                else:
                    if x1 is None:
                        x1 = x2 = x
                    m = decisions[s].reshape(B, 1, H, W)
            if not adaptive:
                x = x + cf(ffn(cl(dw(x))))
            elif decisions is None:
                t = cl(dw(x)).reshape(B, H * W, C)
                x = x + cf(adaptive_ffn(t, keep_count, score, ffn, fast).reshape(B, H, W, C))
            else:
                y = dw(x1 * m + x2 * (1 - m))
                a, b = y * m + x1 * (1 - m), y * (1 - m) + x2 * m
                x1, x2 = x1 + cf(ffn(cl(a))), x2 + cf(fast(cl(b)))
        if m is not None:
            x = x1 * m + x2 * (1 - m)
    features = ln(x.permute(0, 2, 3, 1), "norm").flatten(1, 2)
    return F.linear(ln(x.mean((-2, -1)), "norm"), sd["head.weight"], sd["head.bias"]), features


def convnext_model(**kw):
    return dynamicvit.create_model(
        "convnext_tiny", depths=CNX_DEPTHS, dims=CNX_DIMS, img_size=96, num_classes=CLASSES, prune_locs=LOCS, **kw
    )


# -- Swin (DynamicSwin) ----------------------------------------------------------------------------

SWIN_DEPTHS, SWIN_DIM, SWIN_HEADS, WINDOW = (1, 1, 4, 1), 16, (1, 2, 4, 8), 3


def relative_index(ws):
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, L)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (L, L, 2)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def partition(t, ws):
    """(B, H, W, C) -> (B * nW, ws * ws, C), batch outermost."""
    B, H, W, C = t.shape
    return t.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


def shift_mask(H, W, ws, shift):
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = partition(img, ws).squeeze(-1)  # (nW, L)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))  # (nW, L, L)


def window_geometry(H, W, j):
    ws, shift = WINDOW, (0 if j % 2 == 0 else WINDOW // 2)
    if min(H, W) <= ws:
        ws, shift = min(H, W), 0
    return ws, shift


def swin_checkpoint(seed=0):
    w = Weights(seed)
    C = SWIN_DIM
    w.layer("patch_embed.proj", C, 3, 4, 4, scale=0.2)
    w.norm("patch_embed.norm", C)
    H = 96 // 4
    for i, depth in enumerate(SWIN_DEPTHS):
        nh = SWIN_HEADS[i]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            ws, shift = window_geometry(H, H, j)
            w.norm(p + "norm1", C)
            w.layer(p + "attn.qkv", 3 * C, C, scale=0.2)
            w.layer(p + "attn.proj", C, C)
            w.sd[p + "attn.relative_position_bias_table"] = w.rand((2 * ws - 1) ** 2, nh, scale=0.5)
            w.sd[p + "attn.relative_position_index"] = relative_index(ws)  # a buffer in the release
            if shift:
                w.sd[p + "attn_mask"] = shift_mask(H, H, ws, shift)
            w.norm(p + "norm2", C)
            w.layer(p + "mlp.fc1", 4 * C, C)
            w.layer(p + "mlp.fc2", C, 4 * C)
            if i == 2 and j >= LOCS[0]:
                w.norm(p + "fastmlp.fc1.0", C)
                w.layer(p + "fastmlp.fc1.1", C, C, scale=0.2)
        if i == 2:
            for s in range(len(LOCS)):
                w.predictor(f"layers.2.score_predictor.{s}", C, conv=False)
        if i < 3:  # the original release merges patches at the end of a stage
            w.norm(f"layers.{i}.downsample.norm", 4 * C)
            w.layer(f"layers.{i}.downsample.reduction", 2 * C, 4 * C, bias=False)
            C, H = 2 * C, H // 2
    w.norm("norm", C)
    w.layer("head", CLASSES, C)
    return w.sd


def swin_reference(sd, x, ratios):
    """DynamicSwin eval from the spec: (shifted) window attention on the whole map, the MLP on the
    top int(N * r_s) positions of the latest predictor, `fastmlp` on the rest. Without predictor
    weights (the original Swin release) every block is dense."""
    dynamic = "layers.2.score_predictor.0.in_conv.0.weight" in sd
    ln = lambda t, p, eps=1e-5: F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)  # noqa: E731
    lin = lambda t, p: F.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))  # noqa: E731
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    B, C, H, W = x.shape
    x = ln(x.flatten(2).transpose(1, 2), "patch_embed.norm")  # (B, N, C)
    for i, depth in enumerate(SWIN_DEPTHS):
        nh = SWIN_HEADS[i]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            ws, shift = window_geometry(H, W, j)
            if dynamic and i == 2 and j in LOCS:
                s = LOCS.index(j)
                score = predictor_scores(sd, f"layers.2.score_predictor.{s}", x, 1e-5)
                keep_count = int(H * W * ratios[s])
            h = ln(x, p + "norm1").view(B, H, W, C)
            if shift:
                h = torch.roll(h, (-shift, -shift), (1, 2))
            win = partition(h, ws)  # (B * nW, L, C)
            L = ws * ws
            qkv = lin(win, p + "attn.qkv").reshape(-1, L, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0] * (C // nh) ** -0.5, qkv[1], qkv[2]
            a = q @ k.transpose(-2, -1)  # (B * nW, nh, L, L)
            table = sd[p + "attn.relative_position_bias_table"]
            a = a + table[relative_index(ws).reshape(-1)].view(L, L, nh).permute(2, 0, 1)
            if shift:
                mask = shift_mask(H, W, ws, shift)
                a = (a.view(B, -1, nh, L, L) + mask[None, :, None]).view(-1, nh, L, L)
            o = lin((a.softmax(-1) @ v).transpose(1, 2).reshape(-1, L, C), p + "attn.proj")
            o = o.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
            if shift:
                o = torch.roll(o, (shift, shift), (1, 2))
            x = x + o.reshape(B, H * W, C)
            mlp = lambda t: lin(F.gelu(lin(ln(t, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")  # noqa: E731
            if dynamic and i == 2 and j >= LOCS[0]:
                fast = lambda t: lin(ln(t, p + "fastmlp.fc1.0"), p + "fastmlp.fc1.1")  # noqa: E731
                x = x + adaptive_ffn(x, keep_count, score, mlp, fast)
            else:
                x = x + mlp(x)
        if i < 3:
            m = x.view(B, H, W, C)
            m = torch.cat([m[:, 0::2, 0::2], m[:, 1::2, 0::2], m[:, 0::2, 1::2], m[:, 1::2, 1::2]], dim=-1)
            x = lin(ln(m.reshape(B, -1, 4 * C), f"layers.{i}.downsample.norm"), f"layers.{i}.downsample.reduction")
            C, H, W = 2 * C, H // 2, W // 2
    return lin(ln(x, "norm").mean(1), "head")


def swin_model(**kw):
    return dynamicvit.create_model(
        "swin_tiny_patch4_window7_224", depths=SWIN_DEPTHS, embed_dim=SWIN_DIM, num_heads=SWIN_HEADS, window_size=WINDOW,
        img_size=96, num_classes=CLASSES, drop_path_rate=0.0, prune_locs=LOCS, **kw
    )


# -- tests -----------------------------------------------------------------------------------------


def images(batch=2, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, 96, 96)


@pytest.mark.parametrize("keep_ratio", [0.7, 0.9])
def test_dynamiccnn_checkpoint_gives_the_reference_eval_logits(tmp_path, keep_ratio):
    sd = convnext_checkpoint()
    torch.save({"model": sd}, tmp_path / "dycnn.pth")
    model = convnext_model(keep_ratio=keep_ratio, checkpoint_path=tmp_path / "dycnn.pth").eval()
    x = images()
    with torch.no_grad():
        ref, _ = convnext_reference(sd, x, model.stage_ratios)
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
        # The fast paths and predictors matter: all positions on the FFN gives other logits.
        ref_dense, _ = convnext_reference(sd, x, (1.0, 1.0, 1.0))
    assert (ref - ref_dense).abs().max() > 1e-2


def test_dynamiccnn_training_equations_match_the_reference_with_carried_streams(tmp_path):
    sd = convnext_checkpoint(seed=4)
    torch.save({"model": sd}, tmp_path / "dycnn.pth")
    model = convnext_model(checkpoint_path=tmp_path / "dycnn.pth", restart_streams=False).train()
    x = images()
    torch.manual_seed(5)
    decisions = [(torch.rand(2, 36) < r).float() for r in (0.7, 0.5, 0.3)]
    with torch.no_grad():
        out = model.forward_masked(x, decisions=decisions)
        ref_logits, ref_features = convnext_reference(sd, x, model.stage_ratios, decisions=decisions)
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.tokens, ref_features, atol=1e-4, rtol=1e-4)


def test_dynamicswin_checkpoint_gives_the_reference_eval_logits(tmp_path):
    sd = swin_checkpoint()
    torch.save({"model": sd}, tmp_path / "dyswin.pth")
    model = swin_model(checkpoint_path=tmp_path / "dyswin.pth").eval()
    x = images()
    with torch.no_grad():
        ref = swin_reference(sd, x, model.stage_ratios)
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
        assert (ref - swin_reference(sd, x, (1.0, 1.0, 1.0))).abs().max() > 1e-2


def test_original_release_dense_weights_load_as_teachers(tmp_path):
    """The original ConvNeXt / Swin layouts (no predictors, no fast paths) load into the backbone."""
    sd = convnext_checkpoint(dynamic=False)
    torch.save({"model": sd}, tmp_path / "convnext.pth")
    model = convnext_model(checkpoint_path=tmp_path / "convnext.pth", stage_ratios=(1, 1, 1)).eval()
    swin_sd = {k: v for k, v in swin_checkpoint().items() if "score_predictor" not in k and "fastmlp" not in k}
    torch.save({"model": swin_sd}, tmp_path / "swin.pth")
    swin = swin_model(checkpoint_path=tmp_path / "swin.pth", stage_ratios=(1, 1, 1)).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), convnext_reference(sd, x, (1.0, 1.0, 1.0))[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(swin(x), swin_reference(swin_sd, x, (1.0, 1.0, 1.0)), atol=1e-4, rtol=1e-4)


def test_a_mismatched_checkpoint_names_the_keys(tmp_path):
    sd = convnext_checkpoint()
    del sd["stages.2.3.fast_path_gamma"]
    sd["stages.2.3.fast_path.2.weight"] = torch.zeros(3)
    sd["score_predictor.1.in_conv.1.weight"] = torch.zeros(8, 8, 1, 1)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        convnext_model(checkpoint_path=tmp_path / "bad.pth")
    msg = str(err.value)
    assert "missing keys (1): fast_paths.3.gamma" in msg
    assert "unexpected keys (1): stages.2.3.fast_path.2.weight" in msg
    assert "shape mismatch predictors.1.in_conv.1.weight: checkpoint (8, 8) vs model (64, 64)" in msg

    swin_sd = swin_checkpoint()
    del swin_sd["layers.2.blocks.2.fastmlp.fc1.1.bias"]
    torch.save({"model": swin_sd}, tmp_path / "bad_swin.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): fast_paths.2.fc.bias"):
        swin_model(checkpoint_path=tmp_path / "bad_swin.pth")
