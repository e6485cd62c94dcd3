"""SmoothQuant W8A8: int8 weights and int8 activations (Xiao et al. 2022, "SmoothQuant: Accurate and
Efficient Post-Training Quantization for Large Language Models").

Idea: a few activation channels carry outliers ~100x the rest, so per-token int8 activations
lose the small channels. Dividing channel j of the activation by s_j = max|X_j|^a / max|W_j|^(1-a)
and multiplying column j of the weight by s_j keeps X @ W^T exact while moving the difficulty
from activations to weights; s is folded into the RMSNorm before the layer, so it costs nothing
at run time. Then weights are int8 per output channel and activations int8 per token, dynamic.
Switch on: ``effinfer quantize --method smoothquant --bits 8 [--alpha 0.5]`` (the baseline:
``--method w8a8-naive``), or ``quantize_model_smoothquant(model, calib_ids)`` here.

Smoothing follows the paper where a norm precedes the Linear (for Llama: input_layernorm -> q/k/v,
post_attention_layernorm -> gate/up; the model family lists its pairs, ``CausalLM.smoothing_pairs``). ``smooth_inner=True`` also smooths the two inner inputs
the way AWQ does (v rows -> o_proj columns, up rows -> down_proj columns), both exact because
attention and the gated MLP are linear in v and in up.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from effinfer.layers.linear import Linear
from effinfer.models.base import CausalLM, SmoothingPair
from effinfer.quant.integer import QuantizedWeight, group_qparams, quantize_codes, quantize_rtn

# Floors that keep a dead channel (all-zero activation or weight column) from giving s = 0 or inf.
_MIN_ABSMAX = 1e-5


@torch.no_grad()
def collect_input_absmax(
    model: nn.Module,
    calib_ids: torch.Tensor,
    linears: list[Linear],
    batch_size: int = 8,
    show_progress: bool = False,
) -> dict[Linear, torch.Tensor]:
    """Per-input-channel max |x| (float32 [in_features]) of each Linear's input over ``calib_ids`` [N, T]."""
    absmax: dict[Linear, torch.Tensor] = {}

    def record(module: Linear, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0).float()
        absmax[module] = torch.maximum(absmax[module], x) if module in absmax else x

    hooks = [linear.register_forward_pre_hook(record) for linear in linears]
    device = next(model.parameters()).device
    try:
        batches = range(0, calib_ids.shape[0], batch_size)
        for start in tqdm(batches, desc="smoothquant stats", unit="batch", disable=not show_progress):
            model.forward_dense(calib_ids[start : start + batch_size].to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return absmax


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), per input channel j (the paper's Eq. 4)."""
    a = act_absmax.float().clamp(min=_MIN_ABSMAX)
    w = weight_absmax.float().clamp(min=_MIN_ABSMAX)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=_MIN_ABSMAX)


def smooth_pair(pair: SmoothingPair, act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Fold s into ``pair``: its linears' input columns times s, ``prev``'s outputs over s; returns s.

    When one ``prev`` channel feeds several inputs (v -> o_proj under grouped KV heads), s is per
    ``prev`` channel: the statistics are maxed over the inputs it feeds, and s repeated over them.
    """
    weight_absmax = torch.stack([linear.weight.data.abs().amax(dim=0) for linear in pair.linears])
    s = smoothing_factors(
        pair.reduce(act_absmax.float()), pair.reduce(weight_absmax.amax(dim=0).float()), alpha
    )
    pair.fold(s)
    return s


@torch.no_grad()
def smooth_model(
    model: CausalLM,
    calib_ids: torch.Tensor,
    alpha: float = 0.5,
    smooth_inner: bool = False,
    show_progress: bool = False,
) -> None:
    """Apply SmoothQuant's equivalent transform in place; the float model's outputs do not change."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    pairs = []
    for layer in model.decoder_layers():
        layer_pairs = model.smoothing_pairs(layer)
        # Inner pairs (a Linear's rows -> the next Linear) first, as their statistics were taken.
        if smooth_inner:
            pairs += [p for p in layer_pairs if isinstance(p.prev, Linear)]
        pairs += [p for p in layer_pairs if not isinstance(p.prev, Linear)]
    # Statistics come from the original model in one pass; smoothing is exact, so later layers'
    # inputs are unchanged by the smoothing of earlier ones.
    absmax = collect_input_absmax(
        model, calib_ids, [p.linears[0] for p in pairs], show_progress=show_progress
    )
    for pair in pairs:
        smooth_pair(pair, absmax[pair.linears[0]], alpha)


@torch.no_grad()
def quantize_model_smoothquant(
    model: nn.Module,
    calib_ids: torch.Tensor,
    alpha: float = 0.5,
    smooth_inner: bool = False,
    act_quant: str = "int8",
    show_progress: bool = True,
) -> None:
    """SmoothQuant W8A8 in place: smooth, then int8 weights per output channel and int8 activations.

    ``act_quant``: ``"int8"`` (one dynamic scale per token, the default) or ``"int8-tensor"``
    (one per tensor, the paper's O2 setting: cheaper, and where smoothing matters most).
    """
    if act_quant not in ("int8", "int8-tensor"):
        raise ValueError(f"act_quant must be 'int8' or 'int8-tensor', got {act_quant!r}")
    smooth_model(model, calib_ids, alpha, smooth_inner, show_progress)
    linears = model.compressible_linears()
    for _, linear in tqdm(linears, desc="smoothquant", unit="layer", disable=not show_progress):
        linear.set_quantized(quantize_rtn(linear.weight.data, 8, None, True), act_quant=act_quant)


def quantize_per_tensor(linear: Linear) -> QuantizedWeight:
    """Symmetric int8 with one scale per checkpoint tensor (q, k, v, gate, up kept apart in fused layers)."""
    w = linear.weight.data
    scales = torch.empty(linear.out_features, 1, dtype=torch.float32, device=w.device)
    start = 0
    for rows in linear.shard_sizes:
        scale, _ = group_qparams(w[start : start + rows].reshape(1, -1), 8, symmetric=True)
        scales[start : start + rows] = scale
        start += rows
    zeros = torch.full_like(scales, 128, dtype=torch.int32)
    codes = quantize_codes(w, scales, zeros, 8).to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, 8, linear.in_features)


@torch.no_grad()
def quantize_model_naive_w8a8(model: nn.Module, per_tensor: bool = True) -> None:
    """The baseline W8A8 without smoothing, in place.

    ``per_tensor=True`` is the paper's "W8A8 naive" row (its Table 2): int8 weights with one scale
    per weight tensor and int8 activations with one dynamic scale per tensor (``"int8-tensor"``).
    ``per_tensor=False`` uses SmoothQuant's own granularity (weights per output channel,
    activations per token) without the smoothing, which isolates what the smoothing itself buys.
    """
    for _, linear in model.compressible_linears():
        if per_tensor:
            linear.set_quantized(quantize_per_tensor(linear), act_quant="int8-tensor")
        else:
            linear.set_quantized(quantize_rtn(linear.weight.data, 8, None, True), act_quant="int8")
