"""Wanda: pruning by weights and activations (Sun et al. 2023, "A Simple and Effective Pruning
Approach for Large Language Models", arXiv:2306.11695).

Idea: a weight's importance is |W_ij| · ‖X_j‖₂, its size times the norm of the input feature it
reads over the calibration tokens; the lowest scores of each output row are zeroed, no update.
Switch on: ``effinfer prune --method wanda --sparsity 0.5 | 2:4 --calib TEXT --out DIR``, or
``prune_model_wanda(model, calibration_batches(...), SparsityPattern.parse("0.5"))``.

Layers are pruned in order, each seeing the activations of the layers already pruned before it;
within a layer every Linear's input norms are taken in one pass before any of them is pruned, as
the paper's code does.
"""

from __future__ import annotations

import torch

from effinfer.compress.calibration import LayerCalibration, run_layerwise
from effinfer.compress.prune.masks import SparsityPattern, prune_mask
from effinfer.models.base import CausalLM


class InputNormAccumulator:
    """‖X_j‖₂ of every input feature j over all calibration tokens one Linear saw."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum_of_squares = torch.zeros(in_features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.sum_of_squares += x.double().square().sum(0)

    def norms(self) -> torch.Tensor:
        return self.sum_of_squares.sqrt().float()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ for ``weight`` [out, in] and ``input_norms`` [in]."""
    return weight.float().abs() * input_norms[None, :]


def prune_weight_wanda(weight: torch.Tensor, input_norms: torch.Tensor, pattern: SparsityPattern) -> None:
    """Zero ``weight``'s lowest-scoring entries in place; the others keep their values."""
    weight[prune_mask(wanda_scores(weight, input_norms), pattern)] = 0


def _prune_layer(step: LayerCalibration, pattern: SparsityPattern) -> None:
    linears = step.linears
    norms = {name: InputNormAccumulator(m.in_features, m.weight.device) for name, m in linears.items()}
    step.observe(linears, lambda name, x: norms[name].add(x))
    for name, linear in linears.items():
        prune_weight_wanda(linear.weight.data, norms[name].norms(), pattern)


def prune_model_wanda(
    model: CausalLM, calib_ids: torch.Tensor, pattern: SparsityPattern, show_progress: bool = True
) -> None:
    """Wanda-prune every decoder Linear of ``model`` in place; ``calib_ids`` [rows, seq_len]."""
    run_layerwise(
        model, calib_ids, lambda step: _prune_layer(step, pattern), desc="wanda", show_progress=show_progress
    )
