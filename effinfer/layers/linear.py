"""Linear layers behind one interface.

A model file only says "a projection from d_in to d_out"; whether the weight is dense bf16, a
fused stack of several checkpoint tensors (q/k/v, gate/up), quantized or sharded is decided
here and in ``kernels/``. Fusing q/k/v and gate/up turns three (two) small GEMMs into one,
which matters for one-token decode where every kernel launch is pure overhead.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from effinfer.kernels import dense_linear, quant_linear
from effinfer.quant.base import CompressedWeight


class Linear(nn.Module):
    """y = x @ W^T + b. ``shard_sizes`` lists the output rows of each checkpoint tensor fused into W."""

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False) -> None:
        super().__init__()
        self.shard_sizes = list(out_features) if isinstance(out_features, (list, tuple)) else [out_features]
        self.in_features = in_features
        self.out_features = sum(self.shard_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        self._kernel_state = None
        # Set when the weight is quantized (``set_quantized``); the float ``weight`` is then empty.
        self.quantized: CompressedWeight | None = None
        # How activations are quantized at run time: None (weight-only) or "int8" / "int8-tensor" (W8A8).
        self.act_quant: str | None = None
        self._quantized_shards: dict[int, CompressedWeight] = {}

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        param = self.weight if param_name == "weight" else self.bias
        if param is None:
            raise ValueError(f"checkpoint has a {param_name} for a layer built without one")
        start = sum(self.shard_sizes[:shard])
        rows = self.shard_sizes[shard]
        expected = (rows, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{param_name} shard {shard} has shape {tuple(tensor.shape)}, expected {expected}"
            )
        param.data[start : start + rows].copy_(tensor)

    def shard(self, param_name: str, shard: int) -> torch.Tensor:
        """The rows of one checkpoint tensor inside the fused parameter (the inverse of ``load_shard``)."""
        param = self.weight if param_name == "weight" else self.bias
        start = sum(self.shard_sizes[:shard])
        return param[start : start + self.shard_sizes[shard]]

    def set_quantized(self, weight: CompressedWeight, act_quant: str | None = None) -> None:
        """Replace the float weight by a quantized one of the same shape (quantizers and loaders call this)."""
        if (weight.out_features, weight.in_features) != (self.out_features, self.in_features):
            raise ValueError(
                f"quantized weight is {weight.out_features}x{weight.in_features}, "
                f"the layer is {self.out_features}x{self.in_features}"
            )
        self.quantized = weight
        self.act_quant = act_quant
        self._kernel_state = None
        # A new (empty) Parameter rather than emptying ``.data``: a tied lm_head must not take
        # the embedding table with it.
        self.weight = nn.Parameter(
            torch.empty(0, dtype=self.weight.dtype, device=self.weight.device), requires_grad=False
        )

    def load_quantized_shard(
        self, weight: CompressedWeight, shard: int = 0, act_quant: str | None = None
    ) -> None:
        """One checkpoint tensor of a fused layer; the layer becomes quantized once every shard arrived."""
        if weight.out_features != self.shard_sizes[shard] or weight.in_features != self.in_features:
            raise ValueError(
                f"quantized shard {shard} is {weight.out_features}x{weight.in_features}, "
                f"expected {self.shard_sizes[shard]}x{self.in_features}"
            )
        self._quantized_shards[shard] = weight
        if len(self._quantized_shards) == len(self.shard_sizes):
            parts = [self._quantized_shards[i] for i in range(len(self.shard_sizes))]
            self._quantized_shards = {}
            if len({type(p) for p in parts}) != 1:
                raise ValueError(
                    f"cannot fuse shards of different weight types: {[type(p).__name__ for p in parts]}"
                )
            self.set_quantized(parts[0] if len(parts) == 1 else type(parts[0]).cat_rows(parts), act_quant)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight, quantized or not (for quantizers that work layer by layer)."""
        if self.quantized is not None:
            return self.quantized.dequantize(self.weight.dtype)
        return self.weight.data

    def num_parameters(self) -> int:
        """Parameters of the layer, also after the backend released the plain weight."""
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)

    def weight_nbytes(self) -> int:
        """Bytes of the weight (and bias) as the kernels read them: packed codes and scales if quantized."""
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        packed = getattr(getattr(self._kernel_state, "data", None), "nbytes", None)
        if callable(packed):  # the kernel's own layout (the loaded tensors may be released to meta)
            return packed() + bias
        if self.quantized is not None:
            return self.quantized.nbytes() + bias
        return self.out_features * self.in_features * self.weight.element_size() + bias

    @property
    def prepared(self) -> bool:
        """Whether ``finalize`` ran (the kernel backend holds its prepared weight)."""
        return self._kernel_state is not None

    def held_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor the layer keeps alive: parameters, loaded quantized form, kernel data."""
        held = [(n, p) for n, p in (("weight", self.weight), ("bias", self.bias)) if p is not None]
        if self.quantized is not None:
            held += named_tensors(self.quantized.state_dict()[0], "quantized")
        return held + named_tensors(self._kernel_state, "kernel")

    def finalize(self, release_weight: bool = True, release_quantized: bool = False) -> None:
        """Called once after loading: lets the kernel backend repack the weight for inference.

        When the backend made its own copy, the original is released (``release_weight``) so the
        model is not held twice; a weight shared with another module (tied embeddings) is kept.
        A quantized weight is released too with ``release_quantized`` (GGUF loading): ``quantized``
        then keeps only its description on the meta device (shape, kind, bits, bytes), and
        whatever needs its tensors (saving, dequantizing) must load with ``finalize=False``.
        """
        bias = self.bias.data if self.bias is not None else None
        if self.quantized is not None:
            self._kernel_state = quant_linear.prepare(self.quantized, bias, self.act_quant, self.weight.dtype)
            if release_quantized and not _shares_storage(self._kernel_state.data, self.quantized):
                # The kernel made its own (packed) copy: keep only the description (shape, kind,
                # bytes) of the loaded form, so a GGUF model holds each weight once.
                self.quantized = self.quantized.to("meta")
            return
        self._kernel_state = dense_linear.prepare(self.weight.data, bias)
        if self._kernel_state.packed and release_weight:
            self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def kernel_call(self):
        """This layer's forward as one callable x -> y without the module machinery (for callers that
        run it once per layer and step: the CPU decode plan). Where a hook or an instance's own
        ``forward`` (a profiler's timer) is attached, the module itself, so they still run."""
        if self._forward_hooks or self._forward_pre_hooks or "forward" in self.__dict__:
            return self
        if isinstance(self._kernel_state, quant_linear.QuantState):
            return functools.partial(quant_linear.apply, self._kernel_state)
        if self._kernel_state is not None:
            return functools.partial(dense_linear.apply, self._kernel_state)
        return self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_state is None:
            if self.quantized is not None:
                return self.quantized.reference_linear(x, self.bias, self.act_quant)
            return nn.functional.linear(x, self.weight, self.bias)
        if isinstance(self._kernel_state, quant_linear.QuantState):
            return quant_linear.apply(self._kernel_state, x)
        return dense_linear.apply(self._kernel_state, x)


def _shares_storage(kernel_data: object, weight: CompressedWeight) -> bool:
    """Whether the kernel's prepared data holds any of the weight's own tensors (then releasing saves nothing)."""
    ours = {t.untyped_storage().data_ptr() for _, t in named_tensors(weight.state_dict()[0])}
    return any(t.untyped_storage().data_ptr() in ours for _, t in named_tensors(kernel_data))


def named_tensors(obj: object, prefix: str = "", depth: int = 4) -> list[tuple[str, torch.Tensor]]:
    """(dotted path, tensor) for the tensors an object holds in its fields, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        children = obj.items()
    elif isinstance(obj, (list, tuple)):
        children = enumerate(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)) and not callable(obj):
        children = vars(obj).items()
    else:
        return []
    if depth == 0:
        return []
    return [
        found
        for key, child in children
        for found in named_tensors(child, f"{prefix}.{key}" if prefix else str(key), depth - 1)
    ]


def quantizable_linears(model: nn.Module) -> list[tuple[str, Linear]]:
    """The decoder's Linear layers, in execution order: what every weight quantizer transforms.

    The model family answers (``CausalLM.compressible_linears``: embeddings and lm_head stay in
    floating point, as in GPTQ, AWQ and llama.cpp's defaults); layers/ sits below models/, so
    this only asks.
    """
    return model.compressible_linears()
