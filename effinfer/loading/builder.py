"""Model construction shared by every checkpoint format.

A format reader only yields (HF tensor name, tensor, bytes read); building the model on the
meta device, allocating it in the target dtype, routing each tensor to its (possibly fused)
parameter, checking that nothing is missing and preparing the kernels happen here, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from effinfer.config import ConfigError, ModelConfig
from effinfer.loading.quant_formats import QuantizedShard
from effinfer.models.base import CausalLM
from effinfer.models.registry import model_class
from effinfer.models.stage import PipelineStage, keep_stage


class WeightsError(ConfigError):
    """The checkpoint's tensors are missing or do not fit the model."""


def build_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    stage: PipelineStage | None = None,
) -> CausalLM:
    """The model with uninitialised parameters in ``dtype`` on ``device`` (no random init, no copy);
    with ``stage``, only that pipeline stage's modules (``models/stage.py``)."""
    cls = model_class(config.architecture)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"), _no_random_init():
            model = cls(config, max_positions)
    finally:
        torch.set_default_dtype(previous_dtype)
    if stage is not None:
        keep_stage(model, stage)
    model.to_empty(device=device)
    model.tie_weights()
    return model


@contextmanager
def _no_random_init() -> Iterator[None]:
    """Module constructors skip ``torch.nn.init``'s random fills (``nn.Embedding`` draws normal values).

    On the meta device they are pointless, and not free: a meta ``normal_`` runs through
    ``torch._refs``, which imports ``torch._dynamo`` (SmolLM2's load: +150 MiB resident, ~3 s).
    """
    names = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def fill_model(
    model: torch.nn.Module,
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor | QuantizedShard, int]],
    total_bytes: int,
    source: str,
    desc: str = "loading weights",
    show_progress: bool = True,
    prepare_quantized: bool = False,
) -> None:
    """Copy each (HF name, tensor, bytes) into its parameter; fail if any parameter was not filled.

    ``prepare_quantized`` packs a quantized layer for its kernel (releasing the loaded form) as
    soon as all its tensors are in, so the loaded forms of all layers never coexist (peak memory).
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not show_progress) as bar:
        for name, tensor, nbytes in model.checkpoint_tensors(tensors):
            bar.update(nbytes)
            target = model.checkpoint_target(name)
            if target is None:
                continue
            ours, shard = target
            if ours not in params:
                raise WeightsError(f"{source}: tensor {name!r} has no place in {config.architecture}")
            module_name, _, param_name = ours.rpartition(".")
            module = modules[module_name]
            try:
                if isinstance(tensor, QuantizedShard):  # from loading/quantized.py
                    module.load_quantized_shard(tensor.weight, shard, tensor.act_quant)
                elif hasattr(module, "load_shard"):
                    module.load_shard(param_name, tensor, shard)
                else:
                    param = params[ours]
                    if param.shape != tensor.shape:
                        raise ValueError(
                            f"shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                        )
                    param.data.copy_(tensor)
            except ValueError as e:
                raise WeightsError(f"{source}: tensor {name!r}: {e}") from None
            loaded.add(f"{ours}#{shard}")
            if prepare_quantized and getattr(module, "quantized", None) is not None:
                _prepare_when_complete(module_name, module, loaded)
    expected, seen = set(), set()
    for module_name, module in modules.items():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if id(param) in seen:  # tied to a parameter filled under its own name (the embedding)
                continue
            seen.add(id(param))
            if param_name == "weight" and getattr(module, "quantized", None) is not None:
                continue  # the layer's weight came in quantized (a tied lm_head made from the embedding's blocks)
            shards = len(getattr(module, "shard_sizes", [0])) if param_name in ("weight", "bias") else 1
            expected.update(f"{full}#{s}" for s in range(shards))
    missing = sorted(expected - loaded)
    if missing:
        names = ", ".join(m.split("#")[0] for m in missing[:5])
        raise WeightsError(f"checkpoint {source} lacks {len(missing)} tensors, e.g. {names}")


def _prepare_when_complete(module_name: str, module: torch.nn.Module, loaded: set[str]) -> None:
    """``finalize`` a quantized layer once every shard of its weight and bias is loaded."""
    params = ("weight", "bias") if getattr(module, "bias", None) is not None else ("weight",)
    shards = range(len(module.shard_sizes))
    if not module.prepared and all(f"{module_name}.{p}#{s}" in loaded for p in params for s in shards):
        module.finalize(release_quantized=True)


def finalize_model(
    model: CausalLM,
    device: torch.device,
    dtype: torch.dtype,
    prepare_kernels: bool = True,
    rope_freq_factors: torch.Tensor | None = None,
    release_quantized: bool = False,
) -> CausalLM:
    """The model's post-load work (rotary tables), then each layer's kernel backend prepares its weights.

    ``prepare_kernels=False`` keeps plain float weights (what a compression pass works on);
    ``rope_freq_factors`` come from a GGUF file's ``rope_freqs.weight``; ``release_quantized``
    drops a quantized weight's loaded form once its kernel holds a packed copy (``Linear.finalize``).
    """
    model.prepare(device, dtype, rope_freq_factors)
    if not prepare_kernels:
        return model.eval()
    # A weight that two modules share (tied embeddings) must outlive the backend's repacked copy.
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for module in model.modules():
        if hasattr(module, "finalize") and not getattr(module, "prepared", False):
            module.finalize(release_weight=uses[id(module.weight)] == 1, release_quantized=release_quantized)
    return model.eval()
