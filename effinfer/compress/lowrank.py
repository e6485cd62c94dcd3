"""Low-rank factorization of a model's Linear layers: truncated SVD, ASVD and SVD-LLM.

Papers: Eckart & Young 1936 (truncated SVD is the best rank-r approximation in Frobenius norm);
ASVD (Yuan et al. 2023, arXiv:2312.05821); SVD-LLM (Wang et al. 2024, arXiv:2403.07378).
Idea: replace W [out, in] by U [out, r] @ V [r, in]. Plain SVD minimises ||W - UV||; ASVD scales
input channel j by (mean |x_j|)^alpha before the SVD and folds the scale back into V, so channels
that carry large activations are kept better; SVD-LLM whitens with the Cholesky factor L of X^T X
(calibration inputs X), so that dropping singular value s of W L costs exactly s^2 of ||W X - U V X||^2.
Ranks come from one global parameter budget: components are taken greedily by the share of their
layer's (whitened) energy they keep per parameter; a layer whose rank would not save parameters
(r * (in + out) >= in * out) stays dense.
Switch on: ``effinfer compress --low-rank 0.7 --method svd-llm --model M --out DIR``
(keep 70% of the decoder Linears' parameters); ``LLM(DIR)`` runs the result (``quant/lowrank.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from effinfer.compress.calibration import LayerCalibration, run_layerwise
from effinfer.config import ConfigError
from effinfer.layers.linear import Linear
from effinfer.models.base import CausalLM
from effinfer.quant.lowrank import LowRankWeight

METHODS = {
    "svd": "plain truncated SVD of W (no calibration)",
    "asvd": "ASVD: SVD of W * diag(mean|x|^alpha), scale folded back into V",
    "svd-llm": "SVD-LLM: SVD of W L with X^T X = L L^T (truncation-aware whitening)",
}
ALLOCATIONS = {
    "global": "ranks from one budget, greedily by kept energy per parameter",
    "uniform": "every matrix keeps the same share of its parameters",
}


@dataclass
class LowRankOptions:
    keep_ratio: float  # share of the factorized Linears' parameters that remains
    method: str = "svd-llm"
    allocation: str = "global"
    alpha: float = 0.5  # ASVD: exponent of the activation scale (the paper's default)
    damp: float = 1e-4  # SVD-LLM: added to X^T X's diagonal (share of its mean) so Cholesky succeeds

    def __post_init__(self) -> None:
        if not 0 < self.keep_ratio < 1:
            raise ConfigError(f"--low-rank must be a share of parameters in (0, 1), got {self.keep_ratio}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown low-rank method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"unknown rank allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)}"
            )
        if not (self.alpha >= 0 and self.damp >= 0):
            raise ConfigError(f"--alpha and --damp must be >= 0, got {self.alpha} and {self.damp}")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "svd"


# -------------------------------------------------------------------- one matrix


def max_saving_rank(out_features: int, in_features: int) -> int:
    """The largest rank whose factors hold fewer numbers than the matrix: r * (in + out) < in * out."""
    return (out_features * in_features - 1) // (out_features + in_features)


@dataclass
class InputStats:
    """What a factorization needs to know about a Linear's inputs, summed over calibration tokens."""

    gram: torch.Tensor | None = None  # float64 [in, in]: X^T X (SVD-LLM)
    abs_sum: torch.Tensor | None = None  # float64 [in]: sum of |x| (ASVD)
    tokens: int = 0

    def add(self, x: torch.Tensor, method: str) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        if method == "svd-llm":
            self.gram = x.T @ x if self.gram is None else self.gram + x.T @ x
        if method == "asvd":
            abs_sum = x.abs().sum(0)
            self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.tokens += x.shape[0]


class Whitening:
    """W -> W M before the SVD and V -> V M^-1 after it; M is I (SVD), diag(s) (ASVD) or L (SVD-LLM)."""

    def __init__(self, method: str, stats: InputStats | None, alpha: float = 0.5, damp: float = 1e-4):
        self.scale: torch.Tensor | None = None
        self.cholesky: torch.Tensor | None = None
        if method == "asvd":
            mean_abs = stats.abs_sum / max(stats.tokens, 1)
            scale = mean_abs.pow(alpha)
            # A channel no calibration token used gets the smallest seen scale, not a division by 0.
            positive = scale[scale > 0]
            self.scale = scale.clamp_min(float(positive.min()) if positive.numel() else 1.0)
        elif method == "svd-llm":
            gram = stats.gram / max(stats.tokens, 1)
            eye = torch.eye(gram.shape[0], dtype=gram.dtype)
            jitter = damp * float(gram.diagonal().mean()) or 1e-12
            for _ in range(8):  # a rank-deficient X^T X: grow the dampening until Cholesky succeeds
                factor, info = torch.linalg.cholesky_ex(gram + jitter * eye)
                if int(info) == 0:
                    break
                jitter *= 10
            self.cholesky = factor

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return weight * self.scale
        if self.cholesky is not None:
            return weight @ self.cholesky
        return weight

    def unwhiten(self, v: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return v / self.scale
        if self.cholesky is not None:
            return torch.linalg.solve_triangular(self.cholesky, v, upper=False, left=False)
        return v


def energy_shares(weight: torch.Tensor, whitening: Whitening | None = None) -> torch.Tensor:
    """Each singular value's share of ||W M||_F^2 (descending): what keeping that component retains."""
    energy, _, _ = _gram_eigen(_whitened(weight, whitening))
    return energy / energy.sum().clamp_min(1e-300)


def _whitened(weight: torch.Tensor, whitening: Whitening | None) -> torch.Tensor:
    w = weight.detach().double()
    return whitening.whiten(w) if whitening is not None else w


def _gram_eigen(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(squared singular values, singular vectors, right) of ``a`` from its smaller Gram matrix, descending.

    The eigenvectors of a^T a are a's right singular vectors (of a a^T its left ones), and the
    eigenvalues the squared singular values: an eigh of min(out, in)^2 in float64 instead of an SVD
    of out x in, about 10x faster for the 576 x 1536 matrices of a 135M model.
    """
    right = a.shape[1] <= a.shape[0]
    eigenvalues, vectors = torch.linalg.eigh(a.T @ a if right else a @ a.T)
    return eigenvalues.flip(0).clamp_min(0), vectors.flip(1), right


def truncated_svd(
    weight: torch.Tensor, rank: int, whitening: Whitening | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [out, rank], V [rank, in]) in float32 with U V ~= W: the top ``rank`` components of W M, V M^-1.

    With right singular vectors R of A = W M, the rank-r truncation is (A R_r) R_r^T; with left
    ones L, it is L_r (L_r^T A). Either way it is the Eckart-Young optimum of A.
    """
    a = _whitened(weight, whitening)
    _, vectors, right = _gram_eigen(a)
    top = vectors[:, :rank]
    u, v = (a @ top, top.T) if right else (top, top.T @ a)
    if whitening is not None:
        v = whitening.unwhiten(v)
    return u.float(), v.float()


# -------------------------------------------------------------------- rank allocation


@dataclass
class Part:
    """One checkpoint tensor (q_proj, gate_proj, ...) inside a model Linear: what gets a rank."""

    name: str  # the HF tensor's module name, e.g. model.layers.0.self_attn.q_proj
    linear: Linear
    start: int  # its first row in the (possibly fused) Linear
    rows: int
    energy: torch.Tensor | None = None  # energy_shares of its (whitened) weight
    rank: int | None = None  # None: kept dense

    @property
    def dense_parameters(self) -> int:
        return self.rows * self.linear.in_features

    @property
    def parameters(self) -> int:
        return (
            self.dense_parameters if self.rank is None else self.rank * (self.rows + self.linear.in_features)
        )


def allocate_ranks(parts: list[Part], keep_ratio: float, allocation: str) -> None:
    """Set ``part.rank`` so that the parts hold at most ``keep_ratio`` of their dense parameters."""
    budget = keep_ratio * sum(p.dense_parameters for p in parts)
    if allocation == "uniform":
        for p in parts:
            cap = max_saving_rank(p.rows, p.linear.in_features)
            rank = math.floor(keep_ratio * p.dense_parameters / (p.rows + p.linear.in_features))
            p.rank = min(max(1, rank), cap) if cap >= 1 else None
        return
    factorable = [p for p in parts if max_saving_rank(p.rows, p.linear.in_features) >= 1]
    for p in parts:
        p.rank = 1 if p in factorable else None
    spent = sum(p.parameters for p in parts)
    if spent > budget:
        raise ConfigError(f"--low-rank {keep_ratio} is too small: rank 1 everywhere already keeps more")
    # Within a matrix the shares fall with the index, so taking candidates in order of share per
    # parameter takes each matrix's components in order: the greedy optimum for this budget.
    candidates = sorted(
        ((float(p.energy[k]) / (p.rows + p.linear.in_features), i, k)
         for i, p in enumerate(factorable)
         for k in range(1, max_saving_rank(p.rows, p.linear.in_features))),
        key=lambda c: -c[0],
    )  # fmt: skip
    for _, i, _ in candidates:
        p = factorable[i]
        step = p.rows + p.linear.in_features
        if spent + step <= budget:
            p.rank += 1
            spent += step
    # A matrix that took every saving component loses nothing by being kept whole, if that fits.
    for p in factorable:
        extra = p.dense_parameters - p.parameters
        if p.rank == max_saving_rank(p.rows, p.linear.in_features) and spent + extra <= budget:
            p.rank, spent = None, spent + extra


# -------------------------------------------------------------------- the model


@dataclass
class LowRankReport:
    """What ``factorize_model`` did: ranks per checkpoint tensor and the parameter counts."""

    ranks: dict[str, int | None] = field(default_factory=dict)  # None: kept dense
    parameters_before: int = 0  # of the decoder's Linears
    parameters_after: int = 0

    def as_dict(self) -> dict:
        return {
            "ranks": self.ranks,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
        }


def model_parts(model: CausalLM) -> list[Part]:
    """Every checkpoint tensor of the decoder's Linears, in execution order."""
    parts = []
    for name, linear in model.compressible_linears():
        parent, start = name.rpartition(".")[0], 0
        for ckpt, rows in model.split_sizes(linear).items():
            parts.append(Part(f"{parent}.{ckpt}" if parent else ckpt, linear, start, rows))
            start += rows
    return parts


def _part_weight(part: Part) -> torch.Tensor:
    return part.linear.dequantized_weight()[part.start : part.start + part.rows].float()


def _factorize_linear(linear: Linear, parts: list[Part], whitening: Whitening | None) -> None:
    """Replace ``linear``'s weight by its parts' factors (a part kept dense rides along as V = W)."""
    if all(p.rank is None for p in parts):
        return
    us, vs = [], []
    for p in parts:
        weight = _part_weight(p)
        if p.rank is None:
            us.append(None)
            vs.append(weight)
        else:
            u, v = truncated_svd(weight, p.rank, whitening)
            us.append(u)
            vs.append(v)
    linear.set_quantized(LowRankWeight(tuple(us), tuple(vs)))


def _observe_inputs(step: LayerCalibration, method: str) -> dict[int, InputStats]:
    """Input statistics of each of the layer's Linears, keyed by the Linear's id."""
    linears = step.linears
    stats = {id(m): InputStats() for m in linears.values()}
    ids = {name: id(m) for name, m in linears.items()}
    step.observe(linears, lambda name, x: stats[ids[name]].add(x, method))
    return stats


def factorize_model(
    model: CausalLM,
    options: LowRankOptions,
    calib_ids: torch.Tensor | None = None,
    show_progress: bool = True,
) -> LowRankReport:
    """Factorize the decoder's Linears in place; ``calib_ids`` [rows, seq_len] for ASVD / SVD-LLM.

    Two passes over the layers: the first measures every matrix's (whitened) spectrum, from which
    the global budget sets the ranks; the second factorizes layer by layer, each with the inputs
    that the already-factorized layers before it produce (the sequential scheme of GPTQ).
    """
    if options.needs_calibration and calib_ids is None:
        raise ConfigError(f"--method {options.method} needs calibration text")
    parts = model_parts(model)
    by_linear: dict[int, list[Part]] = {}
    for p in parts:
        by_linear.setdefault(id(p.linear), []).append(p)

    def whitening_for(stats: dict[int, InputStats] | None, linear: Linear) -> Whitening | None:
        if stats is None:
            return None
        return Whitening(options.method, stats[id(linear)], options.alpha, options.damp)

    def measure(stats: dict[int, InputStats] | None, linears: list[Linear]) -> None:
        for linear in linears:
            whitening = whitening_for(stats, linear)
            for p in by_linear[id(linear)]:
                p.energy = energy_shares(_part_weight(p), whitening)

    def factorize(stats: dict[int, InputStats] | None, linears: list[Linear]) -> None:
        for linear in linears:
            _factorize_linear(linear, by_linear[id(linear)], whitening_for(stats, linear))

    linears = [linear for _, linear in model.compressible_linears()]
    with torch.no_grad():
        if options.allocation == "global":
            _each_layer(model, options, calib_ids, measure, linears, "spectra", show_progress)
        allocate_ranks(parts, options.keep_ratio, options.allocation)
        _each_layer(model, options, calib_ids, factorize, linears, options.method, show_progress)
    return LowRankReport(
        {p.name: p.rank for p in parts},
        sum(p.dense_parameters for p in parts),
        sum(p.parameters for p in parts),
    )


def _each_layer(
    model: CausalLM,
    options: LowRankOptions,
    calib_ids: torch.Tensor | None,
    fn: Callable[[dict[int, InputStats] | None, list[Linear]], None],
    linears: list[Linear],
    desc: str,
    show_progress: bool,
) -> None:
    """``fn(stats, linears)`` per decoder layer, with calibration statistics when the method uses them."""
    if not options.needs_calibration:
        for linear in tqdm(linears, desc=desc, unit="linear", disable=not show_progress):
            fn(None, [linear])
        return

    def transform(step: LayerCalibration) -> None:
        fn(_observe_inputs(step, options.method), list(step.linears.values()))

    run_layerwise(model, calib_ids, transform, desc=desc, show_progress=show_progress)
