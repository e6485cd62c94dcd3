"""SmoothQuant W8A8: int8 weights and int8 activations (Xiao et al. 2022, "SmoothQuant: Accurate and
Efficient Post-Training Quantization for Large Language Models").

Idea: a few activation channels carry outliers ~100x the rest, so per-token int8 activations
lose the small channels. Dividing channel j of the activation by s_j = max|X_j|^a / max|W_j|^(1-a)
and multiplying column j of the weight by s_j keeps X @ W^T exact while moving the difficulty
from activations to weights; s is folded into the RMSNorm before the layer, so it costs nothing
at run time. Then weights are int8 per output channel and activations int8 per token, dynamic.
Switch on: ``effinfer quantize --method smoothquant --bits 8 [--alpha 0.5]`` (the baseline:
``--method w8a8-naive``), or ``quantize_model_smoothquant(model, calib_ids)`` here.

Smoothing follows the paper where an RMSNorm precedes the Linear (input_layernorm -> q/k/v,
post_attention_layernorm -> gate/up). ``smooth_inner=True`` also smooths the two inner inputs
the way AWQ does (v rows -> o_proj columns, up rows -> down_proj columns), both exact because
attention and the gated MLP are linear in v and in up.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from effinfer.layers.linear import Linear, quantizable_linears
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


def _scale_columns(linear: Linear, s: torch.Tensor) -> None:
    w = linear.weight.data
    w.copy_((w.float() * s[None, :]).to(w.dtype))


def _scale_rows(linear: Linear, rows: slice, divisor: torch.Tensor) -> None:
    """Divide output rows ``rows`` (and their bias) of ``linear`` by ``divisor``."""
    w = linear.weight.data
    w[rows] = (w[rows].float() / divisor[:, None]).to(w.dtype)
    if linear.bias is not None:
        b = linear.bias.data
        b[rows] = (b[rows].float() / divisor).to(b.dtype)


def smooth_norm_linear(
    norm: nn.Module, linear: Linear, act_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Fold 1/s into the RMSNorm's weight and s into the Linear's input columns; returns s."""
    s = smoothing_factors(act_absmax, linear.weight.data.abs().amax(dim=0), alpha)
    norm.weight.data.copy_((norm.weight.data.float() / s).to(norm.weight.dtype))
    _scale_columns(linear, s)
    return s


def smooth_v_o(attn: nn.Module, o_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Move o_proj's input outliers into v: o_proj's input channel (head h, dim d) is v's (kv(h), d).

    With grouped KV heads one v channel feeds ``group`` query heads, so s is per KV channel
    (statistics are maxed over the group) and repeated over the group's o_proj columns.
    """
    kv_heads, head_dim = attn.num_kv_heads, attn.head_dim
    group = attn.num_heads // kv_heads
    o_proj, qkv = attn.o_proj, attn.qkv_proj

    def per_kv_channel(v: torch.Tensor) -> torch.Tensor:
        return v.float().view(kv_heads, group, head_dim).amax(dim=1).reshape(-1)

    s_kv = smoothing_factors(
        per_kv_channel(o_absmax), per_kv_channel(o_proj.weight.data.abs().amax(dim=0)), alpha
    )
    q_size, kv_size = attn.num_heads * head_dim, kv_heads * head_dim
    _scale_rows(qkv, slice(q_size + kv_size, q_size + 2 * kv_size), s_kv)
    s_full = s_kv.view(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim).reshape(-1)
    _scale_columns(o_proj, s_full)
    return s_kv


def smooth_up_down(mlp: nn.Module, down_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Move down_proj's input outliers into the up rows: act(gate) * up is linear in up."""
    down, gate_up = mlp.down_proj, mlp.gate_up_proj
    inter = down.in_features
    s = smoothing_factors(down_absmax, down.weight.data.abs().amax(dim=0), alpha)
    _scale_rows(gate_up, slice(inter, 2 * inter), s)
    _scale_columns(down, s)
    return s


@torch.no_grad()
def smooth_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    alpha: float = 0.5,
    smooth_inner: bool = False,
    show_progress: bool = False,
) -> None:
    """Apply SmoothQuant's equivalent transform in place; the float model's outputs do not change."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    layers = list(model.model.layers)
    targets = [m for layer in layers for m in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj)]
    if smooth_inner:
        targets += [m for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    # Statistics come from the original model in one pass; smoothing is exact, so later layers'
    # inputs are unchanged by the smoothing of earlier ones.
    absmax = collect_input_absmax(model, calib_ids, targets, show_progress=show_progress)
    for layer in layers:
        if smooth_inner:
            smooth_v_o(layer.self_attn, absmax[layer.self_attn.o_proj], alpha)
            smooth_up_down(layer.mlp, absmax[layer.mlp.down_proj], alpha)
        smooth_norm_linear(
            layer.input_layernorm, layer.self_attn.qkv_proj, absmax[layer.self_attn.qkv_proj], alpha
        )
        smooth_norm_linear(
            layer.post_attention_layernorm, layer.mlp.gate_up_proj, absmax[layer.mlp.gate_up_proj], alpha
        )


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
    linears = quantizable_linears(model)
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
    for _, linear in quantizable_linears(model):
        if per_tensor:
            linear.set_quantized(quantize_per_tensor(linear), act_quant="int8-tensor")
        else:
            linear.set_quantized(quantize_rtn(linear.weight.data, 8, None, True), act_quant="int8")
