"""Independent references for the tests of DG's discriminator: guided-diffusion's ``EncoderUNetModel`` (with DG's
class embedding and ×999 time) as a parameter layout plus a functional float64 forward, and DG's ``vpsde`` /
``get_log_ratio`` transcribed from alsdudrla10/DG ``classifier_lib.py``.

The layout is written from the architecture's description (ADM encoder: per level ``num_res_blocks`` residual
blocks, attention after each where the feature map side is listed, a residual downsampling block between levels; a
middle res–attention–res; GroupNorm–SiLU–attention pooling), not from the package's module.
"""

from __future__ import annotations

import collections
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

Layout = List[Tuple]


def layout(cfg: dict) -> Tuple[Layout, int, int]:
    """(blocks in order, channels and side of the feature map); a block is ``(kind, name, *shape)``."""
    mc, mult = cfg["model_channels"], cfg["channel_mult"]
    ch, side = int(mult[0] * mc), cfg["sample_size"]
    blocks: Layout = [("conv", "input_blocks.0.0", cfg["in_channels"], ch)]
    index = 1
    for level, m in enumerate(mult):
        for _ in range(cfg["num_res_blocks"]):
            out = int(m * mc)
            blocks.append(("res", f"input_blocks.{index}.0", ch, out, False))
            ch = out
            if side in cfg["attention_resolutions"]:
                blocks.append(("attn", f"input_blocks.{index}.1", ch))
            index += 1
        if level < len(mult) - 1:
            blocks.append(("res", f"input_blocks.{index}.0", ch, ch, True))
            index += 1
            side //= 2
    blocks += [("res", "middle_block.0", ch, ch, False), ("attn", "middle_block.1", ch),
               ("res", "middle_block.2", ch, ch, False)]
    return blocks, ch, side


def init_params(cfg: dict, seed: int = 0, dtype=torch.float64) -> Dict[str, torch.Tensor]:
    """Random parameters under guided-diffusion's names (nothing zero, so every path contributes)."""
    g = torch.Generator().manual_seed(seed)
    params = collections.OrderedDict()

    def rand(name, *shape, fan_in=None, around=0.0):
        scale = 1 / math.sqrt(fan_in) if fan_in else 0.1
        params[name] = around + scale * torch.randn(*shape, generator=g, dtype=dtype)

    def norm(prefix, c):
        rand(f"{prefix}.weight", c, around=1.0)
        rand(f"{prefix}.bias", c)

    def conv(prefix, cout, cin, k, dims=2):
        rand(f"{prefix}.weight", cout, cin, *([k] * dims), fan_in=cin * k**dims)
        rand(f"{prefix}.bias", cout)

    mc, emb = cfg["model_channels"], 4 * cfg["model_channels"]
    conv("time_embed.0", emb, mc, 1, dims=0)
    conv("time_embed.2", emb, emb, 1, dims=0)
    if cfg.get("num_class_embeds"):
        rand("label_emb.weight", cfg["num_class_embeds"], emb, around=0.0)
    blocks, ch, side = layout(cfg)
    for kind, name, *shape in blocks:
        if kind == "conv":
            conv(name, shape[1], shape[0], 3)
        elif kind == "res":
            cin, cout, _ = shape
            norm(f"{name}.in_layers.0", cin)
            conv(f"{name}.in_layers.2", cout, cin, 3)
            conv(f"{name}.emb_layers.1", 2 * cout if cfg["use_scale_shift_norm"] else cout, emb, 1, dims=0)
            norm(f"{name}.out_layers.0", cout)
            conv(f"{name}.out_layers.3", cout, cout, 3)
            if cin != cout:
                conv(f"{name}.skip_connection", cout, cin, 1)
        else:
            (c,) = shape
            norm(f"{name}.norm", c)
            conv(f"{name}.qkv", 3 * c, c, 1, dims=1)
            conv(f"{name}.proj_out", c, c, 1, dims=1)
    norm("out.0", ch)
    rand("out.2.positional_embedding", ch, side * side + 1, fan_in=ch)
    conv("out.2.qkv_proj", 3 * ch, ch, 1, dims=1)
    conv("out.2.c_proj", cfg["out_channels"], ch, 1, dims=1)
    return params


def _attention(q, k, v):
    """softmax over keys of qᵀk/√c, applied to v; q, k, v of shape (N, c, T)."""
    w = torch.softmax(torch.einsum("nct,ncs->nts", q, k) / math.sqrt(q.shape[1]), dim=-1)
    return torch.einsum("nts,ncs->nct", w, v)


def encoder_forward(p: Dict[str, torch.Tensor], cfg: dict, x: torch.Tensor, t: torch.Tensor,
                    labels: Optional[torch.Tensor] = None, features: bool = False) -> torch.Tensor:
    """guided-diffusion's EncoderUNetModel.forward (DG's copy: time ×999, label embedding, ``feature=True``)."""
    gn = lambda h, name: F.group_norm(h, 32, p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)  # noqa: E731
    lin = lambda h, name: h @ p[f"{name}.weight"].T + p[f"{name}.bias"]  # noqa: E731
    conv2 = lambda h, name, **kw: F.conv2d(h, p[f"{name}.weight"], p[f"{name}.bias"], **kw)  # noqa: E731
    conv1 = lambda h, name: F.conv1d(h, p[f"{name}.weight"], p[f"{name}.bias"])  # noqa: E731

    mc = cfg["model_channels"]
    half = mc // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=x.dtype) / half)
    args = (t.to(x.dtype) * cfg["time_scale"])[:, None] * freqs[None]
    emb = lin(F.silu(lin(torch.cat([args.cos(), args.sin()], dim=1), "time_embed.0")), "time_embed.2")
    if cfg.get("num_class_embeds"):
        index = labels.argmax(1) if labels.ndim == 2 else labels
        emb = emb + p["label_emb.weight"][index]

    def res(h, name, down):
        skip = h
        a = F.silu(gn(h, f"{name}.in_layers.0"))
        if down:
            a, skip = F.avg_pool2d(a, 2), F.avg_pool2d(skip, 2)
        a = conv2(a, f"{name}.in_layers.2", padding=1)
        e = lin(F.silu(emb), f"{name}.emb_layers.1")[:, :, None, None]
        if cfg["use_scale_shift_norm"]:
            scale, shift = e.chunk(2, dim=1)
            a = gn(a, f"{name}.out_layers.0") * (1 + scale) + shift
        else:
            a = gn(a + e, f"{name}.out_layers.0")
        a = conv2(F.silu(a), f"{name}.out_layers.3", padding=1)
        if f"{name}.skip_connection.weight" in p:
            skip = conv2(skip, f"{name}.skip_connection")
        return skip + a

    def attn(h, name):
        b, c, hh, ww = h.shape
        flat = h.reshape(b, c, -1)
        qkv = conv1(gn(flat, f"{name}.norm"), f"{name}.qkv")
        heads = c // cfg["num_head_channels"]
        q, k, v = qkv.reshape(b * heads, 3 * cfg["num_head_channels"], -1).chunk(3, dim=1)  # heads, then q/k/v
        a = _attention(q, k, v).reshape(b, c, -1)
        return (flat + conv1(a, f"{name}.proj_out")).reshape(b, c, hh, ww)

    h = x
    blocks, ch, _ = layout(cfg)
    for kind, name, *shape in blocks:
        h = conv2(h, name, padding=1) if kind == "conv" else res(h, name, shape[2]) if kind == "res" else attn(h, name)
    if features:
        return h
    b, c = h.shape[:2]
    h = F.silu(gn(h, "out.0")).reshape(b, c, -1)
    h = torch.cat([h.mean(dim=2, keepdim=True), h], dim=2) + p["out.2.positional_embedding"][None]
    qkv = conv1(h, "out.2.qkv_proj")
    heads = c // cfg["num_head_channels"]
    q, k, v = (z.reshape(b * heads, cfg["num_head_channels"], -1) for z in qkv.chunk(3, dim=1))  # q/k/v, then heads
    a = _attention(q, k, v).reshape(b, c, -1)
    return conv1(a, "out.2.c_proj")[:, :, 0]


# ---------------------------------------------------------------------------------------------------------------------
# DG classifier_lib.py


def dg_vpsde(sigma: torch.Tensor, beta_0: float = 0.1, beta_1: float = 20.0):
    """``vpsde.transform_unnormalized_wve_to_normalized_vp``: (mean_vp_tau, tau) of EDM's σ."""
    tau = (-beta_0 + torch.sqrt(beta_0**2 + 2.0 * (beta_1 - beta_0) * torch.log(1.0 + sigma**2))) / (beta_1 - beta_0)
    log_mean_coeff = -0.25 * tau**2 * (beta_1 - beta_0) - 0.5 * tau * beta_0
    return torch.exp(log_mean_coeff), tau


def dg_log_ratio_and_gradient(classifier: Tuple[dict, dict], head: Tuple[dict, dict], x: torch.Tensor,
                              sigma: torch.Tensor, labels=None, gradient: bool = True):
    """DG's ``get_log_ratio`` at the VP input mean_vp·x and time τ, and its gradient w.r.t. the EDM-scale x
    (``get_grad_log_ratio`` without its −σ² factor: mean_vp·∇_{x_vp}); None for the gradient without ``gradient``."""
    mean, tau = dg_vpsde(sigma)
    x_vp = (mean[:, None, None, None] * x).detach().requires_grad_(gradient)
    with torch.set_grad_enabled(gradient):
        feats = encoder_forward(*classifier, x_vp, tau, features=True)
        prediction = torch.sigmoid(encoder_forward(*head, feats, tau, labels)).view(-1)
        prediction = torch.clip(prediction, 1e-5, 1.0 - 1e-5)
        log_ratio = torch.log(prediction / (1.0 - prediction))
        if not gradient:
            return log_ratio, None
        (grad,) = torch.autograd.grad(log_ratio.sum(), x_vp)
    return log_ratio.detach(), grad * mean[:, None, None, None]
