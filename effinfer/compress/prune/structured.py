"""Structured pruning: remove whole KV groups (a KV head with its query heads), query heads within
each group, and MLP intermediate channels, so the result is a smaller *dense* model.

Papers: LLM-Pruner (Ma et al. 2023, arXiv 2305.11627) prunes coupled structures, a head with its
q/k/v rows and o_proj columns, a channel with its gate/up rows and down_proj column, so that every
matrix shrinks and no sparse kernel is needed; FLAP (An et al. 2024, arXiv 2312.11983) ranks those
structures from calibration activations alone: channel j of o_proj's or down_proj's input matters
by ``‖W[:, j]‖² · Var(x_j)`` (its "fluctuation"), summed over a head's channels.

Idea: score each structure from calibration activations, drop the lowest-scoring share uniformly in
every decoder layer (so config.json still describes the model: fewer ``num_attention_heads``,
``num_key_value_heads`` and ``intermediate_size``, ``head_dim`` kept), and slice the fused
q/k/v and gate/up Linears consistently. Layers are pruned in order, each one scored on the
activations of the already-pruned layers before it (``compress/calibration.py``). Importance
``"activation"`` (the default) is ``‖W[:, j]‖² · E[x_j²]``, the expected energy the channel adds
to the residual stream; FLAP's ``"fluctuation"`` ignores the mean because FLAP adds it back as
a bias, which Llama's o_proj/down_proj do not have (so no bias compensation here). ``"taylor"``
is LLM-Pruner's gradient-based first-order term, ``Σ |w · ∂L/∂w|`` over every weight of the
structure (q/k/v rows, o_proj columns; gate/up rows, down_proj column), from the language-model
loss of the unpruned model on the calibration rows.

Switch on: ``effinfer prune --method structured --sparsity 0.25 --model M --out DIR``, or before
that command exists ``python -m effinfer.compress.prune.structured --model M --sparsity 0.25 --out DIR``
(``--attention-sparsity``, ``--mlp-sparsity``, ``--query-sparsity``, ``--importance``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from effinfer.compress.calibration import LayerCalibration, calibration_batches, run_layerwise
from effinfer.compress.quant.pipeline import load_float_model
from effinfer.config import ConfigError, ModelConfig, parse_dtype
from effinfer.default_model import heldout_text_path
from effinfer.layers.linear import Linear
from effinfer.loading.builder import build_model, fill_model, finalize_model
from effinfer.loading.gguf import ROPE_FREQS, GGUFFile, check_loadable, hf_tensors, is_gguf_file
from effinfer.models.base import CausalLM
from effinfer.tokenizer import Tokenizer

IMPORTANCE = ("activation", "fluctuation", "taylor")
# Calibration rows per forward/backward pass of the Taylor importance (bounds the logits' memory).
TAYLOR_ROWS_PER_PASS = 2
# Checkpoint tensors (``CausalLM.split_sizes``) of the four Linears a decoder layer must have.
_ROLES = {
    ("q_proj", "k_proj", "v_proj"): "qkv",
    ("o_proj",): "o",
    ("gate_proj", "up_proj"): "gate_up",
    ("down_proj",): "down",
}

# transformers' config classes that reject hidden_size % num_attention_heads != 0 even with head_dim given.
_HEADS_DIVIDE_HIDDEN = ("LlamaForCausalLM",)


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer keeps, as indices into the unpruned layer (sorted)."""

    kv_heads: list[int]
    query_heads: list[int]
    channels: list[int]  # MLP intermediate channels


@dataclass
class _ChannelStats:
    """Running per-channel sums of a Linear's input over the calibration tokens (float64)."""

    count: int
    total: torch.Tensor
    squares: torch.Tensor

    @classmethod
    def empty(cls, width: int) -> _ChannelStats:
        zeros = torch.zeros(width, dtype=torch.float64)
        return cls(0, zeros, zeros.clone())

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(dim=0)
        self.squares += (x * x).sum(dim=0)

    def spread(self, importance: str) -> torch.Tensor:
        """E[x²] ("activation") or the unbiased variance ("fluctuation") of each channel."""
        if importance == "activation":
            return self.squares / self.count
        mean = self.total / self.count
        return ((self.squares - self.count * mean * mean) / max(self.count - 1, 1)).clamp_min(0)


def channel_importance(weight: torch.Tensor, stats: _ChannelStats, importance: str) -> torch.Tensor:
    """Score of each input channel j of a Linear: ``‖W[:, j]‖²`` times the channel's activation spread."""
    column_norms = weight.detach().to("cpu", torch.float64).pow(2).sum(dim=0)
    return column_norms * stats.spread(importance)


def kept_count(total: int, sparsity: float, what: str) -> int:
    """How many of ``total`` structures stay when ``sparsity`` of them go (rounded to nearest, at least 1)."""
    kept = total - math.floor(sparsity * total + 0.5)
    if kept < 1:
        raise ConfigError(f"sparsity {sparsity} would remove all {total} {what}; use a smaller sparsity")
    return kept


def top_indices(scores: torch.Tensor, count: int) -> list[int]:
    """The ``count`` highest-scoring indices, in increasing index order."""
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(order[:count].tolist())


def layer_linears(model: CausalLM, layer: nn.Module) -> dict[str, Linear]:
    """The layer's fused q/k/v, o_proj, gate/up and down_proj Linears, by role; a ConfigError if one is missing."""
    inside = {id(m) for m in layer.modules()}
    found = {}
    for _, linear in model.compressible_linears():
        if id(linear) in inside:
            role = _ROLES.get(tuple(model.split_sizes(linear)))
            if role is not None:
                found[role] = linear
    missing = [names for names, role in _ROLES.items() if role not in found]
    if missing:
        raise ConfigError(
            f"structured pruning needs fused q/k/v, o_proj, gate/up and down_proj Linears in every layer; "
            f"{model.config.architecture} lacks {', '.join('+'.join(m) for m in missing)}"
        )
    for role, linear in found.items():
        if linear.quantized is not None or linear.weight.numel() != linear.out_features * linear.in_features:
            raise ConfigError(
                f"structured pruning needs float weights ({role} is quantized or was released by the "
                f"kernels); load the model unfinalized, a quantized checkpoint dequantized first"
            )
    return found


def _check_sparsity(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def prune_structured(
    model: CausalLM,
    calib_ids: torch.Tensor,
    sparsity: float,
    *,
    attention_sparsity: float | None = None,
    mlp_sparsity: float | None = None,
    query_sparsity: float = 0.0,
    importance: str = "activation",
    show_progress: bool = True,
) -> list[LayerPlan]:
    """Remove ``sparsity`` of each layer's KV groups (with their query heads) and of its MLP
    intermediate channels, uniformly in every decoder layer, shrinking the linears and updating
    ``model.config`` in place.

    ``attention_sparsity`` / ``mlp_sparsity`` override ``sparsity`` for KV groups / MLP channels;
    ``query_sparsity`` also removes that share of the query heads inside every kept group (the
    heads per group stay equal). ``calib_ids`` is [rows, seq_len] from ``calibration_batches``.
    Returns what each layer kept.
    """
    sparsity = _check_sparsity("sparsity", sparsity)
    attention = _check_sparsity(
        "attention sparsity", sparsity if attention_sparsity is None else attention_sparsity
    )
    mlp = _check_sparsity("MLP sparsity", sparsity if mlp_sparsity is None else mlp_sparsity)
    query = _check_sparsity("query sparsity", query_sparsity)
    if importance not in IMPORTANCE:
        raise ConfigError(f"unknown importance {importance!r}; choose from {', '.join(IMPORTANCE)}")
    if calib_ids.dim() != 2 or calib_ids.dtype != torch.long or calib_ids.numel() == 0:
        raise ConfigError(
            f"calibration ids must be a non-empty [rows, seq_len] long tensor, got {calib_ids.shape}"
        )
    config = model.config
    group_size = config.num_heads // config.num_kv_heads
    kv_kept = kept_count(config.num_kv_heads, attention, "KV groups")
    per_group_kept = kept_count(group_size, query, "query heads of a group")
    channels_kept = kept_count(config.intermediate_size, mlp, "MLP channels")
    heads_kept = kv_kept * per_group_kept
    if config.architecture in _HEADS_DIVIDE_HIDDEN and config.hidden_size % heads_kept:
        raise ConfigError(
            f"keeping {heads_kept} query heads ({kv_kept} KV groups of {per_group_kept}) gives a config "
            f"transformers refuses: {config.architecture} needs hidden_size ({config.hidden_size}) to be a "
            f"multiple of num_attention_heads; choose other sparsities"
        )
    for layer in model.decoder_layers():
        layer_linears(model, layer)  # every layer is prunable before any is touched

    plans: list[LayerPlan] = []
    taylor = taylor_scores(model, calib_ids) if importance == "taylor" else {}
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def prune_layer(step: LayerCalibration) -> None:
        linears = layer_linears(model, step.layer)
        o_proj, down_proj = linears["o"], linears["down"]
        if taylor:  # the query head's q rows and o columns; its KV head's k and v rows
            qkv_rows = taylor[id(linears["qkv"])]
            head_scores = qkv_rows[:q_size] + taylor[id(o_proj)]
            kv_scores = (
                (qkv_rows[q_size : q_size + kv_size] + qkv_rows[q_size + kv_size :])
                .view(config.num_kv_heads, config.head_dim)
                .sum(dim=1)
            )
        else:
            head_scores = channel_importance(o_proj.weight, _observe(step, o_proj), importance)
            kv_scores = torch.zeros(config.num_kv_heads, dtype=torch.float64)
        head_scores = head_scores.view(config.num_heads, config.head_dim).sum(dim=1)
        group_scores = head_scores.view(config.num_kv_heads, group_size).sum(dim=1) + kv_scores
        groups = top_indices(group_scores, kv_kept)
        query_heads = [
            g * group_size + h
            for g in groups
            for h in top_indices(head_scores[g * group_size : (g + 1) * group_size], per_group_kept)
        ]
        _zero_columns(o_proj, _complement(query_heads, config.num_heads), config.head_dim)
        # The MLP is scored on the output of the already-pruned attention.
        if taylor:
            gate_up_rows = taylor[id(linears["gate_up"])]
            inter = config.intermediate_size
            channel_scores = gate_up_rows[:inter] + gate_up_rows[inter:] + taylor[id(down_proj)]
        else:
            channel_scores = channel_importance(down_proj.weight, _observe(step, down_proj), importance)
        channels = top_indices(channel_scores, channels_kept)
        _zero_columns(down_proj, _complement(channels, config.intermediate_size), 1)
        plans.append(LayerPlan(groups, query_heads, channels))

    with torch.no_grad():
        run_layerwise(model, calib_ids, prune_layer, desc="structured pruning", show_progress=show_progress)
        new_config = dataclasses.replace(
            config,
            num_heads=heads_kept,
            num_kv_heads=kv_kept,
            intermediate_size=channels_kept,
        )
        shrink_layers(model, plans, new_config)
    return plans


def taylor_scores(model: CausalLM, calib_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """LLM-Pruner's first-order importance ``|w · ∂L/∂w|`` of every weight of the decoder layers'
    Linears, summed per output row for q/k/v and gate/up and per input column for o_proj and
    down_proj (keyed by ``id`` of the Linear). L is the summed next-token cross-entropy of the
    unpruned model on the calibration rows."""
    by_role = [layer_linears(model, layer) for layer in model.decoder_layers()]
    linears = [linear for roles in by_role for linear in roles.values()]
    tracked = {id(p) for linear in linears for p in linear.parameters()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in tracked)
        p.grad = None
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            for rows in calib_ids.to(device).split(TAYLOR_ROWS_PER_PASS):
                logits = model.compute_logits(model.forward_dense(rows))[:, :-1].float()
                loss = nn.functional.cross_entropy(
                    logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"
                )
                loss.backward()
        scores = {}
        for roles in by_role:
            for role, linear in roles.items():
                first_order = (linear.weight.detach().double() * linear.weight.grad.double()).abs()
                if role in ("o", "down"):
                    scores[id(linear)] = first_order.sum(dim=0).cpu()
                    continue
                if linear.bias is not None:
                    first_order = torch.cat(
                        [first_order, (linear.bias.double() * linear.bias.grad.double()).abs()[:, None]], 1
                    )
                scores[id(linear)] = first_order.sum(dim=1).cpu()
    finally:
        for p, flag in requires_grad.items():
            p.grad = None
            p.requires_grad_(flag)
    return scores


def _observe(step: LayerCalibration, linear: Linear) -> _ChannelStats:
    stats = _ChannelStats.empty(linear.in_features)
    step.observe({"input": linear}, lambda _name, x: stats.add(x))
    return stats


def _complement(kept: list[int], total: int) -> list[int]:
    keep = set(kept)
    return [i for i in range(total) if i not in keep]


def _zero_columns(linear: Linear, blocks: list[int], width: int) -> None:
    """Zero the input columns of the given blocks (heads of ``width`` channels, or single channels)."""
    columns = _block_rows(blocks, width)
    linear.weight.data[:, columns] = 0


def _block_rows(blocks: list[int], width: int, offset: int = 0) -> torch.Tensor:
    """Indices ``offset + b * width + i`` for each block b and i < width, in block order."""
    starts = torch.tensor(blocks, dtype=torch.long) * width + offset
    return (starts[:, None] + torch.arange(width)).reshape(-1)


def shrink_layers(model: CausalLM, plans: list[LayerPlan], new_config: ModelConfig) -> None:
    """Replace each decoder layer by one built for ``new_config`` holding the kept rows and columns."""
    old = model.config
    q_size, kv_size, inter = (
        old.num_heads * old.head_dim,
        old.num_kv_heads * old.head_dim,
        old.intermediate_size,
    )
    with torch.device("meta"):  # a skeleton of the smaller model; only its layers get memory
        skeleton = type(model)(new_config, model.max_positions)
    layers = model.decoder_layers()
    for index, plan in enumerate(plans):
        layer = layers[index]
        linears = layer_linears(model, layer)
        hd = old.head_dim
        qkv_rows = torch.cat([
            _block_rows(plan.query_heads, hd),
            _block_rows(plan.kv_heads, hd, q_size),
            _block_rows(plan.kv_heads, hd, q_size + kv_size),
        ])  # fmt: skip
        channels = torch.tensor(plan.channels, dtype=torch.long)
        rows = {"qkv": qkv_rows, "gate_up": torch.cat([channels, channels + inter])}
        columns = {"o": _block_rows(plan.query_heads, hd), "down": channels}
        names = {id(m): n for n, m in layer.named_modules()}
        state = layer.state_dict()
        for role, linear in linears.items():
            prefix = names[id(linear)]
            if role in rows:
                state[f"{prefix}.weight"] = linear.weight.data[rows[role]]
                if linear.bias is not None:
                    state[f"{prefix}.bias"] = linear.bias.data[rows[role]]
            else:
                state[f"{prefix}.weight"] = linear.weight.data[:, columns[role]]
        weight = linears["qkv"].weight
        new_layer = skeleton.decoder_layers()[index].to(weight.dtype).to_empty(device=weight.device)
        try:
            new_layer.load_state_dict(state)
        except RuntimeError as e:  # a family with another tensor whose shape depends on the heads
            raise ConfigError(f"{old.architecture} cannot be pruned structurally: {e}") from None
        layers[index] = new_layer
    model.config = new_config


def hf_config_fields(config: ModelConfig) -> dict[str, int]:
    """The config.json entries structured pruning changes (``head_dim`` written out: heads * head_dim
    no longer equals hidden_size)."""
    return {
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
    }


# -------------------------------------------------------------------- private entry (until `effinfer prune`)

# HF ``architectures`` -> ``model_type`` for a config.json written from a GGUF file's metadata.
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def load_float(model_path: Path) -> tuple[CausalLM, dict, Tokenizer]:
    """An HF directory or GGUF file as a float32 model (a quantized GGUF dequantized), its config.json
    dict and its tokenizer."""
    if not is_gguf_file(model_path):
        model, _ = load_float_model(model_path)
        return model, json.loads((model_path / "config.json").read_text()), Tokenizer.from_dir(model_path)
    gguf = GGUFFile(model_path)
    check_loadable(gguf)
    config = gguf.model_config()
    if config.architecture not in _MODEL_TYPES or any(config.sliding_windows) or ROPE_FREQS in gguf.tensors:
        raise ConfigError(
            f"{model_path.name}: this entry writes GGUF files of the Llama family without sliding windows "
            f"or rope_freqs only ({config.architecture})"
        )
    model = build_model(config, torch.float32, torch.device("cpu"), config.max_position_embeddings)
    total = sum(info.nbytes for info in gguf.tensors.values())
    fill_model(model, config, hf_tensors(gguf, config), total, model_path.name, "dequantizing GGUF")
    finalize_model(model, torch.device("cpu"), torch.float32, prepare_kernels=False)
    hf = {
        "architectures": [config.architecture],
        "model_type": _MODEL_TYPES[config.architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "hidden_act": config.hidden_act,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0] if len(config.eos_token_ids) == 1 else config.eos_token_ids,
        "dtype": str(config.dtype).removeprefix("torch."),
    }
    return model, hf, gguf.tokenizer()


def save_pruned(
    model: CausalLM, hf_config: dict, tokenizer: Tokenizer, out_dir: Path, dtype: torch.dtype
) -> None:
    """The model as an HF directory: fused Linears split into their checkpoint tensors, the new counts in config.json."""
    tensors = {}
    tied = model.config.tie_word_embeddings
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        module_name, _, param_name = name.rpartition(".")
        module = modules[module_name]
        if tied and name == "lm_head.weight":
            continue
        if isinstance(module, Linear) and len(module.shard_sizes) > 1:
            parent = module_name.rpartition(".")[0]
            for shard, checkpoint_name in enumerate(model.split_sizes(module)):
                tensors[f"{parent}.{checkpoint_name}.{param_name}"] = module.shard(param_name, shard)
        else:
            tensors[name] = param
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().to(dtype).contiguous() for n, t in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    config = {**hf_config, **hf_config_fields(model.config), "dtype": str(dtype).removeprefix("torch.")}
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_ids}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m effinfer.compress.prune.structured", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", required=True, help="HF model directory or GGUF file")
    parser.add_argument("--out", required=True, type=Path, help="new or empty output directory")
    parser.add_argument(
        "--sparsity", required=True, type=float, help="share of KV groups and MLP channels removed"
    )
    parser.add_argument(
        "--attention-sparsity", type=float, help="share of KV groups removed (default: --sparsity)"
    )
    parser.add_argument(
        "--mlp-sparsity", type=float, help="share of MLP channels removed (default: --sparsity)"
    )
    parser.add_argument(
        "--query-sparsity", type=float, default=0.0, help="share of query heads removed per group"
    )
    parser.add_argument(
        "--importance", choices=IMPORTANCE, default="activation", help="how structures are ranked"
    )
    parser.add_argument("--calib", help="calibration text (default: the default model's calibration text)")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration rows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration row")
    parser.add_argument(
        "--save-dtype", default=None, help="float32, bfloat16, float16 (default: the model's)"
    )
    args = parser.parse_args(argv)
    try:
        model_path = Path(args.model)
        if not model_path.exists():
            raise ConfigError(f"--model {args.model!r} does not exist")
        for name in ("sparsity", "attention_sparsity", "mlp_sparsity", "query_sparsity"):
            if getattr(args, name) is not None:  # before the model is read
                _check_sparsity("--" + name.replace("_", "-"), getattr(args, name))
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
            raise ConfigError(f"--out {str(args.out)!r} exists and is not an empty directory")
        model, hf_config, tokenizer = load_float(model_path)
        save_dtype = parse_dtype(
            args.save_dtype or hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        )
        calib = Path(args.calib) if args.calib else heldout_text_path("calibration")
        try:
            ids = calibration_batches(tokenizer, calib, args.num_samples, args.seq_len, stride="auto")
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"--calib: {e}") from None
        before = sum(p.numel() for p in model.parameters())
        prune_structured(model, ids, args.sparsity, attention_sparsity=args.attention_sparsity,
                         mlp_sparsity=args.mlp_sparsity, query_sparsity=args.query_sparsity,
                         importance=args.importance)  # fmt: skip
        save_pruned(model, hf_config, tokenizer, args.out, save_dtype)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    after = sum(p.numel() for p in model.parameters())
    c = model.config
    print(f"wrote {args.out}: {c.num_heads} heads / {c.num_kv_heads} KV heads, intermediate {c.intermediate_size}; "
          f"{before / 1e6:.1f}M -> {after / 1e6:.1f}M parameters")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
