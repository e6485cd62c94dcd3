"""AWQ weight-only quantization (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", arXiv:2306.00978).

Idea: the few input channels with large activations matter most, so before rounding, scale
those weight columns up by s (and the activations down by 1/s, folded into the RMSNorm or the
Linear before), with s = mean|x|^alpha and alpha searched per block to minimize the block's
output error; then shrink each group's range where clipping outliers lowers the output error.
Switch on: ``effinfer quantize --method awq --bits 4 --group-size 128``, or
``quantize_model_awq(model, calibration_batches(...), bits=4, group_size=128)``.

The model family names the scaled pairs (``CausalLM.smoothing_pairs``); for a Llama layer they are
(input_layernorm -> q/k/v), (v rows -> o_proj, only when v and o_proj's input have the same
width, i.e. no grouped KV heads, as AWQ does), (post_attention_layernorm -> gate/up) and
(up rows -> down_proj). Besides the paper's
s = mean|x|^alpha, the search also tries AutoAWQ's s = mean|x|^alpha / mean|w|^(1 - alpha)
(``duo_scaling``), which helped on both models measured here. The grid is RTN's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from effinfer.compress.calibration import LayerCalibration, run_layerwise
from effinfer.layers.linear import Linear
from effinfer.models.base import CausalLM, SmoothingPair
from effinfer.quant.integer import group_qparams, quantize_codes, quantize_rtn

CLIP_TOKENS = 512  # tokens the clipping search looks at (a subsample, as in AWQ)
CLIP_MAX_SHRINK = 0.5  # try group ranges from 100 % down to (1 - this) of the original
CLIP_ROWS_PER_BATCH = 256  # output rows evaluated at once in the clipping search (bounds memory)


def awq_pairs(model: CausalLM, layer: nn.Module) -> list[SmoothingPair]:
    """The model's smoothing pairs of ``layer`` that AWQ scales.

    A pair whose ``prev`` channel fans out to several inputs (v -> o_proj under grouped KV
    heads) is skipped, as AWQ does: one scale cannot suit every input it feeds.
    """
    return [pair for pair in model.smoothing_pairs(layer) if pair.fanout == 1]


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


# Fused shards AWQ leaves unclipped: the error of q and k acts through the softmax, which a
# per-group output error does not see.
_UNCLIPPED_SHARDS = ("q_proj", "k_proj")


def _clip_rows(model: CausalLM, linear: Linear) -> slice:
    """The output rows of ``linear`` that AWQ's clipping search may shrink (v only, of a fused q/k/v)."""
    start = 0
    for shard, rows in model.split_sizes(linear).items():
        if shard not in _UNCLIPPED_SHARDS:
            break
        start += rows
    return slice(start, linear.out_features)


def _quantize_layer(
    step: LayerCalibration,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip: bool,
    grid: int,
    duo_scaling: bool,
) -> None:
    linears = step.linears
    inputs = step.capture(linears)
    name_of = {id(linear): name for name, linear in linears.items()}
    # Every pair's scales are searched on the float layer (folding leaves its function
    # unchanged), then all are folded in, and each Linear's recorded input divided by them.
    pairs = awq_pairs(step.model, step.layer)
    found = []
    for pair in pairs:
        x = inputs[name_of[id(pair.linears[0])]]
        if pair.block_takes_layer_args:
            block = partial(step.map_rows, pair.block)
        else:
            block = pair.block
        found.append(
            search_scales(x, list(pair.linears), block, bits, group_size, symmetric, grid, duo_scaling)
        )
    for pair, s in zip(pairs, found):
        pair.fold(s)
        for name in {name_of[id(linear)] for linear in pair.linears}:
            inputs[name] = inputs[name] / s.to(inputs[name].dtype)
    for name, linear in linears.items():
        if clip:
            rows = _clip_rows(step.model, linear)
            bounds = search_clip(linear.weight.data[rows], inputs[name], bits, group_size, symmetric, grid)
            apply_clip(linear, bounds, group_size, rows)
        linear.set_quantized(quantize_rtn(linear.weight.data, bits, group_size, symmetric))


def quantize_model_awq(
    model: CausalLM,
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
