"""What every model family answers, so that loading, compression, training and the engine never
reach into a model's attributes.

A family (Llama, Gemma 3, ...) is one module with one ``CausalLM`` subclass registered in
``models/registry.py``. The class says which HF ``architectures`` and GGUF
``general.architecture`` names it runs, turns their config into a ``ModelConfig``, maps checkpoint
tensor names onto its parameters, and answers the questions the rest of effinfer asks: its decoder
layers, the Linear layers compression may rewrite, the pairs of modules AWQ / SmoothQuant scale
against each other, and what each layer caches per sequence. What is the same for every family
(tensor-name routing through ``packed_modules``, the llama.cpp tensor-name table, rotary tables,
cache specs from ``ModelConfig.sliding_windows``) is implemented here once.

Contract of the decoder layers (``compress/calibration.py`` runs them one at a time): a layer is
called as ``layer(hidden, *args)``, returns the new hidden states, and receives the same ``args``
at every layer of one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from effinfer.config import ConfigError, ModelConfig, parse_dtype
from effinfer.layers.attention import AttentionMetadata, DenseCausal
from effinfer.layers.cache_spec import AttentionCacheSpec
from effinfer.layers.linear import Linear
from effinfer.layers.rotary import RotaryEmbedding
from effinfer.models.stage import PipelineStage, held_by_other_stage

# llama.cpp's tensor names (gguf-py's tensor map) -> HF names, for the tensors every decoder has.
# A family with more tensors extends these class attributes (``CausalLM.gguf_layer_tensors``).
GGUF_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF keys every family needs (``{arch}.`` is prepended).
REQUIRED_GGUF_KEYS = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")


@dataclass(frozen=True)
class SmoothingPair:
    """Linears whose input channels can be multiplied by s while ``prev`` divides its output by s.

    The function the layer computes does not change, which is what AWQ (Lin et al. 2023) and
    SmoothQuant (Xiao et al. 2022) exploit. ``prev`` is a norm (its output is
    ``(weight_offset + weight) * normalized``; ``weight_offset`` is 0 unless the norm defines it,
    e.g. Gemma's ``1 + w``) or a Linear, of which only ``prev_rows`` of the outputs feed the
    linears (v rows -> o_proj, up rows -> down_proj: attention is linear in v, the gated MLP in up).
    """

    name: str  # unique within a layer: "qkv", "o", "gate_up", "down"
    prev: nn.Module
    linears: tuple[Linear, ...]
    # The smallest module containing the linears whose output AWQ compares (attention, MLP, a Linear).
    block: nn.Module
    block_takes_layer_args: bool = False  # block(x, *layer args) (attention) rather than block(x)
    prev_rows: slice | None = None  # for a Linear ``prev``
    # Each of ``prev``'s channels feeds ``fanout`` input channels of the linears: their input is laid
    # out [channels // fanout_width, fanout, fanout_width] (grouped KV heads: v -> o_proj, width = head_dim).
    fanout: int = 1
    fanout_width: int = 1

    @property
    def channels(self) -> int:
        """How many scales the pair takes: one per channel of ``prev``'s output that feeds the linears."""
        return self.linears[0].in_features // self.fanout

    def expand(self, per_channel: torch.Tensor) -> torch.Tensor:
        """Scales per ``prev`` channel -> per input channel of the linears."""
        if self.fanout == 1:
            return per_channel
        width = self.fanout_width
        groups = per_channel.view(-1, 1, width).expand(-1, self.fanout, width)
        return groups.reshape(-1)

    def reduce(self, per_input: torch.Tensor) -> torch.Tensor:
        """Statistics per input channel of the linears -> per ``prev`` channel (max over its fan-out)."""
        if self.fanout == 1:
            return per_input
        return per_input.view(-1, self.fanout, self.fanout_width).amax(dim=1).reshape(-1)

    @torch.no_grad()
    def fold(self, scales: torch.Tensor) -> None:
        """W[:, c] *= s[c] in the linears and ``prev``'s output channel c divided by s[c] (exact)."""
        s = scales.float()
        columns = self.expand(s)
        for linear in self.linears:
            w = linear.weight.data
            w.copy_((w.float() * columns).to(w.dtype))
        if isinstance(self.prev, Linear):
            rows = self.prev_rows if self.prev_rows is not None else slice(None)
            w = self.prev.weight.data
            w[rows] = (w[rows].float() / s[:, None]).to(w.dtype)
            if self.prev.bias is not None:
                b = self.prev.bias.data
                b[rows] = (b[rows].float() / s).to(b.dtype)
            return
        w = self.prev.weight.data
        offset = getattr(self.prev, "weight_offset", 0.0)
        w.copy_(((w.float() + offset) / s - offset).to(w.dtype))


class DecodePlan(Protocol):
    """A model's decode step without its modules (see ``CausalLM.decode_plan``)."""

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor | None:
        """The final hidden states of a decode step, or None where this step needs the modules."""


class CausalLM(nn.Module):
    """A decoder-only language model family. Subclasses implement the methods marked below."""

    hf_architectures: tuple[str, ...] = ()  # HF config.json ``architectures`` names
    gguf_architectures: tuple[str, ...] = ()  # GGUF ``general.architecture`` values
    # GGUF architectures whose files with ``{arch}.expert_count`` > 0 are this family's (llama.cpp
    # writes Mixtral as ``llama`` with expert tensors).
    gguf_expert_architectures: tuple[str, ...] = ()
    # checkpoint module name -> (our fused module's name, shard index), e.g. q_proj -> (qkv_proj, 0)
    packed_modules: dict[str, tuple[str, int]] = {}
    gguf_global_tensors: dict[str, str] = GGUF_GLOBAL_TENSORS
    gguf_layer_tensors: dict[str, str] = GGUF_LAYER_TENSORS
    # The chat template of a GGUF file that carries none (HF directories ship their own).
    default_chat_template: str | None = None
    # Built from layers/parallel.py's constructors, so it can run tensor parallel (--tensor-parallel-size).
    supports_tensor_parallel: bool = False
    # Pipeline parallelism (models/stage.py): whether ``forward`` takes a stage's incoming
    # ``hidden_states``, and the modules only the first / last stage holds.
    supports_pipeline: bool = False
    embedding_module = "model.embed_tokens"
    final_norm_module = "model.norm"
    output_head_module = "lm_head"

    config: ModelConfig
    pipeline_stage: PipelineStage | None = None  # set by ``keep_stage``; None: the whole model

    # ---------------------------------------------------------------- configs

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        """The config.json dict as a ``ModelConfig`` (or a family's subclass of it). Subclasses implement."""
        raise NotImplementedError

    @classmethod
    def hf_config_from_gguf(cls, arch: str, key: Callable[[str, Any], Any]) -> dict[str, Any]:
        """An HF-style config dict for ``config_from_hf`` from ``{arch}.*`` GGUF metadata.

        ``key(name, default)`` reads ``{arch}.{name}``. The loader adds what the file says
        elsewhere (vocabulary size, tied output, special tokens, dtype). This reads the keys every
        llama.cpp decoder writes; a family adds its own.
        """
        hidden, heads = key("embedding_length", None), key("attention.head_count", None)
        if not isinstance(heads, int) or heads < 1:
            raise ConfigError(f"{arch}.attention.head_count must be a positive integer, got {heads!r}")
        hf: dict[str, Any] = {
            "architectures": [cls.hf_architecture_for_gguf(arch)],
            "hidden_size": hidden,
            "intermediate_size": key("feed_forward_length", None),
            "num_hidden_layers": key("block_count", None),
            "num_attention_heads": heads,
            "num_key_value_heads": key("attention.head_count_kv", heads),
            "head_dim": key("attention.key_length", None) or hidden // heads,
            "max_position_embeddings": key("context_length", 2048),
            "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
            "rope_theta": key("rope.freq_base", 10000.0),
        }
        scaling = key("rope.scaling.type", None)
        if scaling == "linear":
            hf["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor", None)}
        elif scaling not in (None, "none"):
            raise ConfigError(f"rope scaling {scaling!r} is not supported (supported: linear)")
        return hf

    @classmethod
    def hf_architecture_for_gguf(cls, arch: str) -> str:
        """The HF ``architectures`` name a GGUF architecture of this family loads as."""
        return cls.hf_architectures[0]

    @classmethod
    def gguf_architecture_for(cls, hf_architecture: str) -> str | None:
        """The GGUF ``general.architecture`` an HF checkpoint is written as, or None if it cannot be."""
        return None

    # ---------------------------------------------------------------- checkpoint names

    @classmethod
    def gguf_hf_name(cls, name: str) -> str | None:
        """The HF name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
        if name in cls.gguf_global_tensors:
            return cls.gguf_global_tensors[name]
        parts = name.split(".")
        if (
            len(parts) == 4
            and parts[0] == "blk"
            and parts[2] in cls.gguf_layer_tensors
            and parts[3] in ("weight", "bias")
        ):
            return f"model.layers.{parts[1]}.{cls.gguf_layer_tensors[parts[2]]}.{parts[3]}"
        return None

    @classmethod
    def gguf_tensor(cls, name: str, tensor, config: ModelConfig) -> tuple[str, Any] | None:
        """A GGUF tensor as (HF name, tensor in HF layout), or None if the name is unknown.

        ``tensor`` is a float tensor or a still-quantized weight (``quant/``) with the same rows.
        A family whose llama.cpp layout differs from HF's (permuted rows, norms stored as 1 + w)
        transforms it here.
        """
        hf_name = cls.gguf_hf_name(name)
        return None if hf_name is None else (hf_name, tensor)

    @classmethod
    def hf_tensor_to_gguf(cls, hf_name: str, tensor: torch.Tensor, config: ModelConfig):
        """The inverse of ``gguf_tensor`` for ``effinfer convert --to gguf``: (GGUF name, tensor in
        llama.cpp's layout), or None for a tensor GGUF has no name for."""
        for gguf_name, ours in cls.gguf_global_tensors.items():
            if ours == hf_name:
                return gguf_name, tensor
        parts = hf_name.split(".")
        if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
            module = ".".join(parts[3:-1])
            for gguf_name, ours in cls.gguf_layer_tensors.items():
                if ours == module:
                    return f"blk.{parts[2]}.{gguf_name}.{parts[-1]}", tensor
        return None

    def checkpoint_tensors(self, tensors: Iterable[tuple[str, Any, int]]) -> Iterable[tuple[str, Any, int]]:
        """A checkpoint's (name, tensor, bytes read) as ``checkpoint_target`` maps them: unchanged, unless
        a family's checkpoints stack several modules' weights in one tensor (it splits them here)."""
        return tensors

    def checkpoint_target(self, name: str) -> tuple[str, int] | None:
        """Map a checkpoint tensor name to (our parameter name, shard); None for tensors we do not use
        (including those of layers another pipeline stage holds)."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        target = name, 0
        for ckpt_name, (ours, shard) in self.packed_modules.items():
            if f".{ckpt_name}." in name:
                target = name.replace(f".{ckpt_name}.", f".{ours}."), shard
                break
        if self.pipeline_stage is not None and held_by_other_stage(self, target[0]):
            return None
        return target

    # ---------------------------------------------------------------- the math (subclasses implement)

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.max_positions = max_positions

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat batch of tokens; ``compute_logits`` projects the sampled ones.

        ``hidden_states``: a later pipeline stage's input, from the stage before (then the token ids are
        not embedded); a family that takes it sets ``supports_pipeline``.
        """
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tie_weights(self) -> None:
        """Share the embedding with the output projection when the config ties them (again after ``to_empty``)."""
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers in execution order (see the module docstring for how they are called)."""
        raise NotImplementedError

    def smoothing_pairs(self, layer: nn.Module) -> list[SmoothingPair]:
        """The scaling pairs of one decoder layer, in execution order (none: AWQ is then RTN with clipping)."""
        return []

    # ---------------------------------------------------------------- generic answers

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, hidden] of whole sequences without the KV cache: training and scoring."""
        batch, seq_len = input_ids.shape
        positions = torch.arange(seq_len, device=input_ids.device).repeat(batch)
        hidden = self(input_ids.reshape(-1), positions, DenseCausal(batch, seq_len))
        return hidden.view(batch, seq_len, -1)

    def compressible_linears(self) -> list[tuple[str, Linear]]:
        """The decoder layers' Linears in execution order, named from the model: what every weight
        quantizer may rewrite. Embeddings and lm_head stay in floating point, as in GPTQ, AWQ and
        llama.cpp's defaults."""
        inside = {id(m) for layer in self.decoder_layers() for m in layer.modules()}
        return [(n, m) for n, m in self.named_modules() if isinstance(m, Linear) and id(m) in inside]

    def split_sizes(self, linear: Linear) -> dict[str, int]:
        """Output rows per checkpoint tensor fused into ``linear``, in row order (``{"q_proj": 64, ...}``)."""
        module_name = next(n for n, m in self.named_modules() if m is linear).rpartition(".")[2]
        parts = sorted(
            (shard, ckpt) for ckpt, (ours, shard) in self.packed_modules.items() if ours == module_name
        )
        if not parts:
            return {module_name: linear.out_features}
        return {ckpt: rows for (_, ckpt), rows in zip(parts, linear.shard_sizes)}

    def decode_plan(self, device: torch.device, dtype: torch.dtype) -> DecodePlan | None:
        """This model's decode steps as a flat list of kernel calls (``models/cpu_decode_plan.py``),
        asked for at the first decode step; None (the default): the engine runs the modules."""
        return None

    def cache_specs(self) -> list[AttentionCacheSpec]:
        """What each decoder layer caches per sequence (the engine sizes and frees KV from these)."""
        windows = self.config.sliding_windows or [None] * self.config.num_layers
        return [AttentionCacheSpec(sliding_window=w) for w in windows]

    def prepare(
        self, device: torch.device, dtype: torch.dtype, rope_freq_factors: torch.Tensor | None = None
    ) -> None:
        """Work after the weights are in: the rotary tables (buffers, not checkpoint tensors).

        ``rope_freq_factors`` divide each rotary frequency (llama.cpp stores Llama 3.1's rope
        scaling that way, as the ``rope_freqs.weight`` tensor).
        """
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.build_cache(device, dtype, rope_freq_factors)


def architecture_in(hf: dict, names: tuple[str, ...]) -> str:
    """The first of config.json's ``architectures`` that is one of ``names``."""
    found = next((a for a in hf.get("architectures") or [] if a in names), None)
    if found is None:
        raise ConfigError(f"architectures {hf.get('architectures')!r} names none of {', '.join(names)}")
    return found


def hf_rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from a config.json of transformers 4.x or 5.

    transformers 5 nests them in ``rope_parameters``; 4.x used ``rope_theta`` + ``rope_scaling``.
    """
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    if scaling is None and hf.get("rope_scaling"):
        scaling = dict(hf["rope_scaling"])
    if scaling is not None:
        scaling.setdefault("rope_type", scaling.get("type"))
    return float(theta), scaling


def common_hf_fields(hf: dict, architecture: str) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments that every decoder's config.json spells the same way."""
    num_heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    rope_theta, rope_scaling = hf_rope(hf)
    eos = hf.get("eos_token_id")
    return dict(
        architecture=architecture,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hidden // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        hidden_act=hf.get("hidden_act", "silu"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        dtype=parse_dtype(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
    )
