"""GPTQ weight-only quantization (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", arXiv:2210.17323).

Idea: quantize a Linear's weight one input column at a time and, after each column, move its
rounding error onto the columns not yet quantized, weighted by the inverse Hessian
H = 2/n sum x x^T of the layer's calibration inputs, so the layer's *output* error stays small
(Optimal Brain Quantization, made fast with a Cholesky factor and lazy block updates).
Switch on: ``effinfer quantize --method gptq --bits 4 --group-size 128 [--act-order]``, or
``quantize_model_gptq(model, calibration_batches(...), bits=4, group_size=128)``.

The grid is RTN's (``rtn.group_qparams`` / ``quantize_codes``): a group's scale and zero are set
when its first column is reached, from the weights as updated by then. (The authors' code reads
them from a copy that misses the updates made earlier inside the same lazy block; here blocks
hold whole groups, so the result is exactly the column-by-column algorithm of the paper.)
"""

from __future__ import annotations

import logging

import torch

from effinfer.compress.calibration import LayerCalibration, run_layerwise
from effinfer.quant.integer import QuantizedWeight, group_qparams, quantize_codes

logger = logging.getLogger(__name__)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, so that H^-1 = U^T U.

    Row q of U, scaled by 1/U[q, q], is the OBS update of the columns after q once columns
    < q are fixed (the paper's section 4, step 3). If the damped Hessian is still not positive
    definite (too few calibration tokens), dampening is raised tenfold until it is.
    """
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean()
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0:
                return upper
        logger.warning("GPTQ: Hessian not positive definite with damp=%g; raising it", damp)
        damp = damp * 10 if damp > 0 else 1e-4
    raise RuntimeError("GPTQ: the Hessian stays singular after dampening; use more calibration data")


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool = False,
) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] minimizing ||X W^T - X Q^T|| for inputs with Hessian [in, in].

    ``act_order`` quantizes columns by decreasing Hessian diagonal (the most active inputs
    first, while the most columns are left to absorb their error); groups then follow that
    order and ``g_idx`` says which group each column belongs to. ``static_groups`` keeps the
    natural grouping under act-order, with every group's parameters taken from the weights
    before any update (no ``g_idx``, which fast kernels prefer). Computation is float32
    (float64 if ``weight`` is float64).
    """
    out_features, in_features = weight.shape
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype=dtype, device=w.device).clone()
    group = min(group_size or in_features, in_features)
    num_groups = -(-in_features // group)

    # An input that is always zero carries no information: pin H_ii so H stays invertible; its
    # weights can be anything, and zero is exact.
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    scales = torch.empty(out_features, num_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty(out_features, num_groups, dtype=torch.float32, device=w.device)
    # One group per row: its range is the untouched row's, known before any update.
    static = static_groups or group == in_features
    if static:
        for g in range(num_groups):
            scales[:, g], zeros[:, g] = group_qparams(w[:, g * group : (g + 1) * group], bits, symmetric)

    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_factor(h, damp)

    # Blocks hold whole groups, so a group's first column sees all earlier columns' updates.
    block = max(group, block_size // group * group) if group < in_features else block_size
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        w_block, u_block = w[:, start:stop], u[start:stop, start:stop]  # views: updated in place
        errors = torch.empty(out_features, stop - start, dtype=dtype, device=w.device)
        for i in range(stop - start):
            col = start + i
            if static:
                g = int(perm[col]) // group if perm is not None else col // group
            else:
                g = col // group
                if col % group == 0:
                    scales[:, g], zeros[:, g] = group_qparams(w_block[:, i : i + group], bits, symmetric)
            scale, zero = scales[:, g].to(dtype), zeros[:, g].to(dtype)
            q = quantize_codes(w_block[:, i : i + 1], scales[:, g], zeros[:, g], bits)[:, 0]
            codes[:, col] = q.to(torch.uint8)
            err = (w_block[:, i] - (q.to(dtype) - zero) * scale) / u_block[i, i]
            # OBS: compensate the rounding error on this block's later columns now ...
            w_block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            errors[:, i] = err
        # ... and on the columns after the block in one matrix product (the lazy batch update).
        w[:, stop:] -= errors @ u[start:stop, stop:]

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        if not static:
            g_idx = (inverse // group).to(torch.int32)
    return QuantizedWeight(codes, scales, zeros.to(torch.int32), bits, group, g_idx)


class HessianAccumulator:
    """H = 2/n sum_t x_t x_t^T over all calibration tokens seen by one Linear, in float32."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.count, 1))


def _quantize_layer(
    step: LayerCalibration, bits: int, group_size: int | None, symmetric: bool, act_order: bool, damp: float
) -> None:
    # Quantize the layer's Linears in execution order, each measured on inputs that already pass
    # through the quantized ones before it (q/k/v, then o, gate/up, down). Fused q/k/v (gate/up)
    # share one input and so one Hessian; GPTQ treats output rows independently, so quantizing
    # the fused weight is the same as quantizing q, k and v one by one.
    for name, linear in step.linears.items():
        acc = HessianAccumulator(linear.in_features, linear.weight.device)
        step.observe({name: linear}, lambda _, x, acc=acc: acc.add(x))
        qw = gptq_quantize_weight(
            linear.weight.data, acc.hessian(), bits, group_size, symmetric, act_order, damp
        )
        linear.set_quantized(qw)


def quantize_model_gptq(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    show_progress: bool = True,
) -> None:
    """GPTQ-quantize every decoder Linear of ``model`` in place (embeddings and lm_head stay float).

    ``calib_ids`` [rows, seq_len] comes from ``calibration.calibration_batches``.
    """
    run_layerwise(
        model,
        calib_ids,
        lambda step: _quantize_layer(step, bits, group_size, symmetric, act_order, damp),
        desc="gptq",
        show_progress=show_progress,
    )
