"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot", arXiv:2301.00774).

Idea: prune a Linear's weight one input column at a time and move each pruned weight's error onto
the columns not yet visited through the inverse Hessian of H = 2XXᵀ (Optimal Brain Surgeon, made
cheap by the upper Cholesky factor of H⁻¹, as in GPTQ), so the layer's *output* changes little.
Switch on: ``effinfer prune --method sparsegpt --sparsity 0.5 | 2:4 --calib TEXT --out DIR``, or
``prune_model_sparsegpt(model, calibration_batches(...), SparsityPattern.parse("2:4"))``.

Details as in the paper (Algorithm 1): the mask is chosen adaptively for each block of 128
columns, from the weights as updated so far, by the OBS error w² / [H⁻¹]²_jj (lowest share of the
whole block; for N:M, per group of M inputs when the group's first column is reached); H is
dampened by 1% of its mean diagonal; updates inside a block are column by column, those of later
blocks one matrix product per block. Layers are pruned in order on the pruned prefix's activations.
"""

from __future__ import annotations

import torch

from effinfer.compress.calibration import LayerCalibration, run_layerwise
from effinfer.compress.prune.masks import SparsityPattern, lowest_share_mask, n_m_mask
from effinfer.compress.quant.gptq import HessianAccumulator, inverse_hessian_factor
from effinfer.models.base import CausalLM

BLOCK_SIZE = 128
DAMP = 0.01


def sparsegpt_prune_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """``weight`` [out, in] pruned to ``pattern`` with the remaining weights updated to keep
    ||X Wᵀ - X Ŵᵀ|| small for inputs whose Hessian is ``hessian`` [in, in]. Computed in float32
    (float64 for a float64 weight); returned in ``weight``'s dtype."""
    out_features, in_features = weight.shape
    if pattern.is_n_m:
        pattern.check_fits("the weight", in_features)
        block_size = max(pattern.m, block_size // pattern.m * pattern.m)  # N:M groups never straddle blocks
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype=dtype, device=w.device).clone()
    # An input that is always zero carries no information: pin H_jj so H stays invertible and
    # prune its weights first (zero is exact for them).
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = inverse_hessian_factor(h, damp)
    threads = torch.get_num_threads()
    # The column loop is thousands of tiny ops: one thread does them 7x faster than two on a busy
    # 2-core machine (5.8 s against 43 s for a 3072 x 576 weight), where threads wait for each other.
    torch.set_num_threads(1)
    try:
        return _prune_columns(w, u, pattern, block_size).to(weight.dtype)
    finally:
        torch.set_num_threads(threads)


def _prune_columns(
    w: torch.Tensor, u: torch.Tensor, pattern: SparsityPattern, block_size: int
) -> torch.Tensor:
    """Algorithm 1 of the paper on ``w`` (updated in place) with the upper Cholesky factor ``u`` of H⁻¹."""
    out_features, in_features = w.shape
    dtype = w.dtype
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        w_block, u_block = w[:, start:stop], u[start:stop, start:stop]  # views: updated in place
        mask = pruned[:, start:stop]
        obs_error = w_block.square() / u_block.diagonal().square()[None, :]
        if not pattern.is_n_m:
            mask.copy_(lowest_share_mask(obs_error, pattern.sparsity))
        errors = torch.zeros(out_features, stop - start, dtype=dtype, device=w.device)
        for i in range(stop - start):
            if pattern.is_n_m and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                group_error = w_block[:, group].square() / u_block.diagonal()[group].square()[None, :]
                mask[:, group] = n_m_mask(group_error, pattern.n, pattern.m)
            err = torch.where(mask[:, i], w_block[:, i], 0) / u_block[i, i]
            # OBS: the pruned weights' error goes onto this block's later columns now ...
            w_block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            errors[:, i] = err
        # ... and onto the columns after the block in one product (the lazy batch update).
        w[:, stop:] -= errors @ u[start:stop, stop:]
    w[pruned] = 0
    return w


def _prune_layer(step: LayerCalibration, pattern: SparsityPattern, damp: float, block_size: int) -> None:
    linears = step.linears
    hessians = {name: HessianAccumulator(m.in_features, m.weight.device) for name, m in linears.items()}
    step.observe(linears, lambda name, x: hessians[name].add(x))
    for name, linear in linears.items():
        hessian, start = hessians[name].hessian(), 0
        # Each checkpoint tensor of a fused q/k/v or gate/up Linear is a layer of its own, as in the
        # paper: a mask chosen over the fused rows left one of SmolLM2's tensors at 29% zeros at 50%.
        for rows in step.model.split_sizes(linear).values():
            part = linear.weight.data[start : start + rows]
            part.copy_(sparsegpt_prune_weight(part, hessian, pattern, damp, block_size))
            start += rows


def prune_model_sparsegpt(
    model: CausalLM,
    calib_ids: torch.Tensor,
    pattern: SparsityPattern,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
    show_progress: bool = True,
) -> None:
    """SparseGPT-prune every decoder Linear of ``model`` in place; ``calib_ids`` [rows, seq_len]."""
    run_layerwise(
        model,
        calib_ids,
        lambda step: _prune_layer(step, pattern, damp, block_size),
        desc="sparsegpt",
        show_progress=show_progress,
    )
