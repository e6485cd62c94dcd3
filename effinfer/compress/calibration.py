"""Calibration data and the layer-by-layer runner that GPTQ, AWQ (and pruning methods) share.

Methods that look at activations (GPTQ, Frantar et al. 2022; AWQ, Lin et al. 2023; SparseGPT,
Wanda) transform one decoder layer at a time: feed a few hundred calibration sequences through
the layers already transformed, record what the next layer's Linear layers see, let the method
rewrite that layer, and move on with the *transformed* layer's output, so every layer corrects
for the errors of those before it (the sequential scheme of GPTQ, section 4 of the paper).

    ids = calibration_batches(tokenizer, "calib.txt", num_samples=128, seq_len=512)
    run_layerwise(model, ids, lambda layer: ..., desc="gptq")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from effinfer.layers.linear import Linear
from effinfer.models.base import CausalLM

# A calibration row shorter than this says too little about the activations to be worth using.
MIN_ROW_TOKENS = 16
# Rows pushed through a layer at once: bounds the attention scores' memory, not the result.
ROWS_PER_CHUNK = 8


def _read_text(text_or_path: str | os.PathLike) -> str:
    """A Path (or a str naming an existing file) is read; a str with a newline is the text itself."""
    if isinstance(text_or_path, str) and not os.path.isfile(text_or_path) and "\n" in text_or_path:
        return text_or_path
    path = Path(text_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"calibration file {str(path)!r} does not exist (pass text as a str containing a newline)"
        )
    return path.read_text(encoding="utf-8", errors="replace")


def calibration_batches(
    tokenizer,
    text_or_path: str | os.PathLike,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    stride: int | str | None = None,
) -> torch.Tensor:
    """Token rows [n, seq_len] (int64) cut from a text, for the quantizers to look at activations.

    The text is tokenized once (as perplexity evaluation does) and cut into rows of ``seq_len``
    tokens starting every ``stride`` tokens (default ``seq_len``: non-overlapping rows);
    ``num_samples`` of them are drawn at random (``seed``) when there are more. A text too short
    for ``num_samples`` rows gives as many as fit, and one shorter than ``seq_len`` tokens gives
    a single row of all its tokens. A stride below ``seq_len`` gets more (overlapping) rows out
    of a short text, as GPTQ's reference sampling of random windows does; ``"auto"`` keeps rows
    apart unless the text is too short for ``num_samples`` of them, then starts one every
    ``seq_len // 4`` tokens.
    """
    auto = stride == "auto"
    stride = seq_len if auto or stride is None else stride
    if num_samples < 1 or seq_len < 2 or stride < 1:
        raise ValueError(
            f"need num_samples >= 1, seq_len >= 2 and stride >= 1, got {num_samples}, {seq_len}, {stride}"
        )
    ids = torch.tensor(tokenizer.encode(_read_text(text_or_path)), dtype=torch.long)
    if len(ids) < min(seq_len, MIN_ROW_TOKENS):
        raise ValueError(
            f"calibration text has {len(ids)} tokens, too few for one row "
            f"(need at least {min(seq_len, MIN_ROW_TOKENS)})"
        )
    if len(ids) < seq_len:
        return ids[None]
    rows = ids.unfold(0, seq_len, stride)
    if auto and len(rows) < num_samples:
        rows = ids.unfold(0, seq_len, max(1, seq_len // 4))
    if len(rows) > num_samples:
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(rows), generator=generator)[:num_samples]
        rows = rows[pick.sort().values]
    return rows.contiguous()


@dataclass
class LayerCalibration:
    """One decoder layer and the calibration activations entering it, handed to a layer transform."""

    index: int
    layer: nn.Module
    model: CausalLM  # asked for the layer's Linears, smoothing pairs and fused splits
    hidden: torch.Tensor  # [rows * seq_len, hidden]: the layer's input (output of the transformed prefix)
    # Chunk of n rows -> the arguments every layer gets besides the hidden states (rotary tables,
    # attention metadata), as the model itself passes them.
    layer_args: dict[int, tuple]
    rows: int
    seq_len: int

    @property
    def linears(self) -> dict[str, Linear]:
        """The layer's Linears that compression may rewrite, in execution order, by their model-wide name."""
        inside = {id(m) for m in self.layer.modules()}
        return {name: m for name, m in self.model.compressible_linears() if id(m) in inside}

    def _chunks(self, x: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, tuple]]:
        """``x`` (default: the layer's input) in chunks of whole rows, with the layer's other arguments."""
        x = self.hidden if x is None else x
        for start in range(0, self.rows, ROWS_PER_CHUNK):
            n = min(ROWS_PER_CHUNK, self.rows - start)
            yield x[start * self.seq_len : (start + n) * self.seq_len], self.layer_args[n]

    def forward(self) -> torch.Tensor:
        """The layer's output [rows * seq_len, hidden] with its current (possibly quantized) weights."""
        return self.map_rows(self.layer, self.hidden)

    def observe(self, modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> None:
        """Run the layer once, calling ``fn(name, x [tokens, in])`` with the input of each named module."""
        with _input_hooks(modules, fn):
            for x, args in self._chunks():
                self.layer(x, *args)

    def capture(self, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """The input of each named module over all calibration tokens, [tokens, in]."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.observe(modules, lambda name, x: parts[name].append(x))
        return {name: torch.cat(xs) for name, xs in parts.items()}

    def map_rows(self, fn: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn(x_chunk, *layer_args)`` over ``x`` [rows * seq_len, d] in row chunks, concatenated.

        Runs a part of the layer (the attention block, say) on activations of the same tokens.
        """
        return torch.cat([fn(chunk, *args) for chunk, args in self._chunks(x)])


class _LayerInputs(Exception):
    """Stops a forward pass at the first decoder layer, carrying what that layer was called with."""

    def __init__(self, hidden: torch.Tensor, args: tuple) -> None:
        super().__init__()
        self.hidden, self.args = hidden, args


def _first_layer_inputs(model: CausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """(hidden states, other arguments) the model hands its first decoder layer for ``ids`` [n, seq_len].

    The model's own forward pass computes them (embedding scale, rotary tables, metadata), so
    calibration runs the layers exactly as inference does.
    """

    def stop(_module, args):
        raise _LayerInputs(args[0], args[1:])

    handle = model.decoder_layers()[0].register_forward_pre_hook(stop)
    try:
        model.forward_dense(ids)
    except _LayerInputs as inputs:
        return inputs.hidden, inputs.args
    finally:
        handle.remove()
    raise RuntimeError("the model's forward pass never reached its first decoder layer")


@contextmanager
def _input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            fn(name, x.reshape(-1, x.shape[-1]).detach())

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_layerwise(
    model: CausalLM,
    calib_ids: torch.Tensor,
    transform: Callable[[LayerCalibration], None],
    desc: str = "calibrate",
    show_progress: bool = True,
) -> None:
    """Apply ``transform`` to each decoder layer in turn, feeding it the transformed prefix's output.

    ``model`` is a ``CausalLM`` (``models/base.py``); ``calib_ids`` is [rows, seq_len] from
    ``calibration_batches``. ``transform`` may run the layer as often as it likes (``observe`` /
    ``capture`` / ``forward``) and must leave it transformed in place.
    """
    device = next(model.parameters()).device
    calib_ids = calib_ids.to(device)
    rows, seq_len = calib_ids.shape
    with torch.no_grad():
        hiddens, layer_args = [], {}
        for start in range(0, rows, ROWS_PER_CHUNK):
            hidden, args = _first_layer_inputs(model, calib_ids[start : start + ROWS_PER_CHUNK])
            hiddens.append(hidden)
            layer_args.setdefault(hidden.shape[0] // seq_len, args)  # they depend on the shape only
        hidden = torch.cat(hiddens)
        bar = tqdm(model.decoder_layers(), desc=desc, unit="layer", disable=not show_progress)
        for index, layer in enumerate(bar):
            bar.set_postfix(layer=index)
            step = LayerCalibration(index, layer, model, hidden, layer_args, rows, seq_len)
            transform(step)
            hidden = step.forward()
