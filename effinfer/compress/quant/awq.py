"""AWQ weight-only quantization (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", arXiv:2306.00978).

Idea: the few input channels with large activations matter most, so before rounding, scale
those weight columns up by s (and the activations down by 1/s, folded into the RMSNorm or the
Linear before), with s = mean|x|^alpha and alpha searched per block to minimize the block's
output error; then shrink each group's range where clipping outliers lowers the output error.
Switch on: ``effinfer quantize --method awq --bits 4 --group-size 128``, or
``quantize_model_awq(model, calibration_batches(...), bits=4, group_size=128)``.

For a Llama layer the scaled pairs are (input_layernorm -> q/k/v), (v rows -> o_proj, only
when v and o_proj's input have the same width, i.e. no grouped KV heads, as AWQ does),
(post_attention_layernorm -> gate/up) and (up rows -> down_proj). Besides the paper's
s = mean|x|^alpha, the search also tries AutoAWQ's s = mean|x|^alpha / mean|w|^(1 - alpha)
(``duo_scaling``), which helped on both models measured here. The grid is RTN's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from effinfer.compress.calibration import LayerCalibration, run_layerwise
from effinfer.layers.linear import Linear
from effinfer.layers.norm import RMSNorm
from effinfer.quant.integer import group_qparams, quantize_codes, quantize_rtn

CLIP_TOKENS = 512  # tokens the clipping search looks at (a subsample, as in AWQ)
CLIP_MAX_SHRINK = 0.5  # try group ranges from 100 % down to (1 - this) of the original
CLIP_ROWS_PER_BATCH = 256  # output rows evaluated at once in the clipping search (bounds memory)


@dataclass
class ScalingPair:
    """Weights whose input channels can be scaled by s while ``prev`` absorbs 1/s exactly."""

    name: str
    prev: nn.Module  # RMSNorm, or the Linear producing the input (only ``prev_rows`` of its outputs)
    prev_rows: slice | None
    linears: list[Linear]
    block: str  # what the search measures: "attn", "o_proj", "mlp" or "down_proj"


def scaling_pairs(layer: nn.Module) -> list[ScalingPair]:
    """AWQ's four scaling pairs of a Llama decoder layer (three under grouped KV heads)."""
    attn, mlp = layer.self_attn, layer.mlp
    q_size, kv_size, v_size = attn._split
    pairs = [ScalingPair("qkv", layer.input_layernorm, None, [attn.qkv_proj], "attn")]
    # Scaling a v channel scales the same channel of the attention output (attention is linear
    # in v); with grouped KV heads one v channel feeds several o_proj inputs, so AWQ skips it.
    if v_size == attn.o_proj.in_features:
        v_rows = slice(q_size + kv_size, q_size + kv_size + v_size)
        pairs.append(ScalingPair("o", attn.qkv_proj, v_rows, [attn.o_proj], "o_proj"))
    pairs.append(ScalingPair("gate_up", layer.post_attention_layernorm, None, [mlp.gate_up_proj], "mlp"))
    inter = mlp.down_proj.in_features
    pairs.append(ScalingPair("down", mlp.gate_up_proj, slice(inter, 2 * inter), [mlp.down_proj], "down_proj"))
    return pairs


def fold_scales(pair: ScalingPair, scales: torch.Tensor) -> None:
    """W[:, c] *= s[c] for the pair's Linears and the producer of channel c divided by s[c].

    The float model computes exactly the same function afterwards (up to rounding).
    """
    s = scales.float()
    for linear in pair.linears:
        linear.weight.data = (linear.weight.data.float() * s).to(linear.weight.dtype)
    if isinstance(pair.prev, RMSNorm):
        pair.prev.weight.data = (pair.prev.weight.data.float() / s).to(pair.prev.weight.dtype)
        return
    rows = pair.prev_rows
    weight = pair.prev.weight.data
    weight[rows] = (weight[rows].float() / s[:, None]).to(weight.dtype)
    if pair.prev.bias is not None:
        bias = pair.prev.bias.data
        bias[rows] = (bias[rows].float() / s).to(bias.dtype)


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[rows, in] -> [rows, num_groups, group], zero-padding a short last group.

    Zero padding changes no group's parameters: RTN's range always includes 0.
    """
    rows, cols = w.shape
    pad = -cols % group
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(rows, -1, group)


def pseudo_quantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """RTN quantize-dequantize in float32: equal to ``quantize_rtn(...).dequantize()``, vectorized."""
    rows, cols = w.shape
    group = min(group_size or cols, cols)
    g = _grouped(w.float(), group)
    flat = g.reshape(-1, group)
    scale, zero = group_qparams(flat, bits, symmetric)
    q = quantize_codes(flat, scale, zero, bits)
    return ((q - zero[:, None]) * scale[:, None]).view(g.shape).reshape(rows, -1)[:, :cols]


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).pow(2).mean().item()


def _weight_mean(linears: list[Linear], group_size: int | None) -> torch.Tensor:
    """Per input channel, the mean of |w| relative to its group's max |w| (AutoAWQ's ``w_mean``)."""
    w = torch.cat([linear.weight.data.float() for linear in linears])
    cols = w.shape[1]
    g = _grouped(w.abs(), min(group_size or cols, cols))
    relative = g / (g.amax(dim=-1, keepdim=True) + 1e-6)
    return relative.reshape(w.shape[0], -1)[:, :cols].mean(dim=0)


def search_scales(
    x: torch.Tensor,
    linears: list[Linear],
    block: Callable[[torch.Tensor], torch.Tensor],
    bits: int,
    group_size: int | None,
    symmetric: bool,
    grid: int = 20,
    duo_scaling: bool = True,
) -> torch.Tensor:
    """The per-input-channel scales s = mean|x|^alpha (alpha in {0, 1/grid, ...}) that minimize
    the MSE of ``block(x)`` when the ``linears`` hold Q(W diag(s)) diag(s)^-1 instead of W.

    ``duo_scaling`` also tries s = mean|x|^alpha / mean|w|^(1 - alpha) (AutoAWQ's default), and
    keeps whichever candidate is best. alpha = 0 of the first family is plain RTN, so the
    result is never worse than RTN on the calibration tokens.
    """
    x_mean = x.abs().float().mean(dim=0)
    candidates = [x_mean.pow(step / grid) for step in range(grid)]
    if duo_scaling:
        w_mean = _weight_mean(linears, group_size)
        candidates += [x_mean.pow(step / grid) / (w_mean.pow(1 - step / grid) + 1e-4) for step in range(grid)]
    target = block(x)
    originals = [linear.weight.data for linear in linears]
    best_loss, best_scales = float("inf"), torch.ones_like(x_mean)
    try:
        for s in candidates:
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()  # centre the range around 1
            for linear, w in zip(linears, originals):
                fake = pseudo_quantize(w.float() * s, bits, group_size, symmetric) / s
                linear.weight.data = fake.to(w.dtype)
            loss = _mse(block(x), target)
            if loss < best_loss:
                best_loss, best_scales = loss, s
    finally:
        for linear, w in zip(linears, originals):
            linear.weight.data = w
    return best_scales


def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    grid: int = 20,
) -> torch.Tensor:
    """Per (row, group) clipping bound [rows, num_groups]: the shrunken max |w| minimizing that
    group's share of the output error, sum_k x_k (w_k - Q(clamp(w_k)))."""
    rows, cols = w.shape
    group = min(group_size or cols, cols)
    step = max(1, x.shape[0] // CLIP_TOKENS)
    xg = _grouped(x[::step][:CLIP_TOKENS].float(), group)  # [tokens, groups, group]
    wg = _grouped(w.float(), group)  # [rows, groups, group]
    bounds = []
    for start in range(0, rows, CLIP_ROWS_PER_BATCH):
        wb = wg[start : start + CLIP_ROWS_PER_BATCH]
        target = torch.einsum("tgk,rgk->rtg", xg, wb)
        org_max = wb.abs().amax(dim=-1, keepdim=True)  # [rows, groups, 1]
        best_err = torch.full(org_max.shape[:2], float("inf"), device=w.device)
        best_max = org_max[..., 0].clone()
        for i in range(int(CLIP_MAX_SHRINK * grid)):
            max_val = org_max * (1 - i / grid)
            clipped = torch.clamp(wb, -max_val, max_val)
            flat = clipped.reshape(-1, group)
            scale, zero = group_qparams(flat, bits, symmetric)
            q = ((quantize_codes(flat, scale, zero, bits) - zero[:, None]) * scale[:, None]).view(wb.shape)
            err = (torch.einsum("tgk,rgk->rtg", xg, q) - target).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val[..., 0], best_max)
        bounds.append(best_max)
    return torch.cat(bounds)


def apply_clip(linear: Linear, bounds: torch.Tensor, group_size: int | None, rows: slice | None = None):
    """Clamp each (row, group) of the weight (or of ``rows`` of it) to +-bound."""
    w = linear.weight.data
    rows = rows or slice(0, w.shape[0])
    group = min(group_size or w.shape[1], w.shape[1])
    groups = torch.arange(w.shape[1], device=w.device) // group
    bound = bounds[:, groups].to(w.dtype)
    w[rows] = torch.clamp(w[rows], -bound, bound)


def _clip_rows(linear: Linear, layer: nn.Module) -> slice:
    # AWQ leaves q and k unclipped: their error acts through the softmax, which a per-group
    # output error does not see. Clip only the v rows of the fused q/k/v.
    if linear is layer.self_attn.qkv_proj:
        q_size, kv_size, v_size = layer.self_attn._split
        return slice(q_size + kv_size, q_size + kv_size + v_size)
    return slice(0, linear.out_features)


def _quantize_layer(
    step: LayerCalibration,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip: bool,
    grid: int,
    duo_scaling: bool,
) -> None:
    layer = step.layer
    attn, mlp = layer.self_attn, layer.mlp
    linears = {
        "qkv": attn.qkv_proj,
        "o": attn.o_proj,
        "gate_up": mlp.gate_up_proj,
        "down": mlp.down_proj,
    }
    inputs = step.capture(linears)
    blocks = {
        "attn": lambda x: step.map_rows(attn, x),
        "o_proj": attn.o_proj,
        "mlp": mlp,
        "down_proj": mlp.down_proj,
    }
    # Every pair's scales are searched on the float layer (folding leaves its function
    # unchanged), then all are folded in, and each Linear's recorded input divided by them.
    pairs = scaling_pairs(layer)
    found = [
        search_scales(
            inputs[p.name], p.linears, blocks[p.block], bits, group_size, symmetric, grid, duo_scaling
        )
        for p in pairs
    ]
    for pair, s in zip(pairs, found):
        fold_scales(pair, s)
        inputs[pair.name] = inputs[pair.name] / s.to(inputs[pair.name].dtype)
    for name, linear in linears.items():
        if clip:
            rows = _clip_rows(linear, layer)
            bounds = search_clip(linear.weight.data[rows], inputs[name], bits, group_size, symmetric, grid)
            apply_clip(linear, bounds, group_size, rows)
        linear.set_quantized(quantize_rtn(linear.weight.data, bits, group_size, symmetric))


def quantize_model_awq(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool = False,
    clip: bool = True,
    grid: int = 20,
    show_progress: bool = True,
    duo_scaling: bool = True,
) -> None:
    """AWQ-quantize every decoder Linear of ``model`` in place (embeddings and lm_head stay float).

    The RMSNorm weights (and v / up rows) change too: they absorb the 1/s of the scales.
    ``calib_ids`` [rows, seq_len] comes from ``calibration.calibration_batches``.
    """
    run_layerwise(
        model,
        calib_ids,
        lambda step: _quantize_layer(step, bits, group_size, symmetric, clip, grid, duo_scaling),
        desc="awq",
        show_progress=show_progress,
    )
