"""A model cut down to one pipeline stage: its share of the decoder layers and nothing else.

Pipeline parallelism (GPipe, Huang et al. 2019) splits the decoder layers into contiguous
stages, one per device or process; hidden states flow from each stage to the next. The first
stage holds the embedding, the last the final norm and the output head (with tied embeddings it
keeps the embedding table as its head's weight: its own copy). ``keep_stage`` replaces every
other module by a parameterless stand-in on the meta model, so only the stage's weights are
allocated and loaded and only its layers get KV cache. The engine switches it on with
``--pipeline-parallel-size M`` (``engine/pipeline.py`` runs the stages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from effinfer.config import ConfigError
from effinfer.layers.cache_spec import CacheSpec


@dataclass(frozen=True)
class PipelineStage:
    """Stage ``index`` of ``num_stages``, running decoder layers ``[first_layer, stop_layer)``."""

    index: int
    num_stages: int
    first_layer: int
    stop_layer: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.stop_layer)


def split_layers(num_layers: int, num_stages: int) -> list[PipelineStage]:
    """Contiguous stages of ``num_layers // num_stages`` layers; the remainder goes one each to the
    earliest stages, because the last stage also carries the output head (a vocabulary-wide matmul)."""
    if num_stages < 1:
        raise ConfigError(f"pipeline_parallel_size must be at least 1, got {num_stages}")
    if num_stages > num_layers:
        raise ConfigError(
            f"pipeline_parallel_size {num_stages} exceeds the model's {num_layers} decoder layers: "
            "every stage needs at least one layer"
        )
    base, extra = divmod(num_layers, num_stages)
    stages, first = [], 0
    for index in range(num_stages):
        stop = first + base + (index < extra)
        stages.append(PipelineStage(index, num_stages, first, stop))
        first = stop
    return stages


class OtherStage(nn.Module):
    """A parameterless stand-in for a module another pipeline stage holds."""


class OtherStageLayer(OtherStage):
    """A decoder layer (or the final norm) that another stage runs: hidden states pass through unchanged."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


class OtherStageModule(OtherStage):
    """The embedding or output head of another stage: a stage never calls it (it gets hidden states)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module belongs to another pipeline stage")


def keep_stage(model: nn.Module, stage: PipelineStage) -> None:
    """Cut ``model`` (a ``CausalLM``, best still on the meta device) down to ``stage``'s modules."""
    if not model.supports_pipeline:
        raise ConfigError(
            f"{model.config.architecture} cannot be split into pipeline stages; "
            "use pipeline_parallel_size 1 (--pipeline-parallel-size 1)"
        )
    layers = model.decoder_layers()
    for index in range(len(layers)):
        if index not in stage.layers:
            layers[index] = OtherStageLayer()
    # With tied embeddings the last stage's head is the embedding table: it keeps the module.
    if not (stage.is_first or (stage.is_last and model.config.tie_word_embeddings)):
        model.set_submodule(model.embedding_module, OtherStageModule())
    if not stage.is_last:
        model.set_submodule(model.final_norm_module, OtherStageLayer())
        model.set_submodule(model.output_head_module, OtherStageModule())
    model.pipeline_stage = stage


def held_by_other_stage(model: nn.Module, param_name: str) -> bool:
    """Whether the parameter ``param_name`` (our name) lives in a module ``keep_stage`` left to another stage."""
    module = model
    for part in param_name.split(".")[:-1]:
        module = getattr(module, part, None)
        if isinstance(module, OtherStage):
            return True
    return False


def stage_tensor_filter(model: nn.Module) -> Callable[[str], bool] | None:
    """For a pipeline stage, whether to read a checkpoint tensor (by HF name): only its own are read,
    not decoded and dropped. None for a whole model (every tensor is read)."""
    if getattr(model, "pipeline_stage", None) is None:
        return None
    return lambda name: model.checkpoint_target(name) is not None


def stage_cache_specs(model: nn.Module) -> list[CacheSpec]:
    """``model.cache_specs()`` of the layers this process runs (all of them without pipeline stages)."""
    specs = model.cache_specs()
    stage = getattr(model, "pipeline_stage", None)
    return specs if stage is None else specs[stage.first_layer : stage.stop_layer]
