"""Load a GGUF file (llama.cpp's single-file format): model config, tokenizer and weights.

Format reference: ggml's ``docs/gguf.md`` (header, typed key/value metadata, tensor infos, aligned
tensor data) and llama.cpp's ``convert_hf_to_gguf.py`` / ``gguf-py`` for the key and tensor names.

Idea: the metadata says what the model is (``general.architecture`` picks the model family in
``models/registry.py``; its ``{arch}.*`` hyper-parameters, rope settings and the vocabulary follow),
so it becomes a ``ModelConfig`` and a ``Tokenizer``; the family renames each tensor to its Hugging
Face name (``CausalLM.gguf_tensor``), it is dequantised to float32 (``gguf_quants``), cast to the working
dtype and copied into the model exactly as a safetensors tensor would be; block-quantized layer
weights instead stay quantized (every block type as ``AffineGroupWeight``, see docs/gguf-kernels.md) and run on the quantized kernels.
Use it with ``LLM("model.gguf")`` or ``effinfer generate --model model.gguf``.

The header is parsed here rather than with ``gguf.GGUFReader``: that reader builds a Python object
per array element, which takes ~10 s for a 150k-token vocabulary; this parser reads numeric arrays
with one ``np.frombuffer`` and leaves tensor data memory-mapped.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType
from gguf import quants as gguf_quants_reference

from effinfer.config import ConfigError, ModelConfig
from effinfer.layers.embedding import QuantizedEmbedding
from effinfer.loading.builder import WeightsError, build_model, fill_model, finalize_model
from effinfer.loading.gguf_quants import (
    AFFINE_TYPES,
    BLOCK_FORMATS,
    FLOAT_TYPES,
    SUPPORTED_TYPES,
    block_values,
    dequantize,
    to_affine_weight,
)
from effinfer.loading.memory import release_freed_memory
from effinfer.loading.quant_formats import QuantizedShard
from effinfer.loading.sharded import SplitLookup, checkpoint_splits, rank_head_config, split_gguf_bytes
from effinfer.models.base import REQUIRED_GGUF_KEYS, CausalLM
from effinfer.models.llama import permute_rotary_rows, unpermute_rotary_rows  # noqa: F401  (tests, convert)
from effinfer.models.registry import family_for_gguf, gguf_architectures, model_class
from effinfer.models.stage import PipelineStage, stage_tensor_filter
from effinfer.quant.affine import AffineGroupWeight

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Per-dimension rope frequency divisors (Llama 3.1's rope scaling as llama.cpp stores it).
ROPE_FREQS = "rope_freqs.weight"
TOKEN_EMBEDDING = "token_embd.weight"

_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


def is_gguf_file(path: str | os.PathLike) -> bool:
    """A regular file that starts with the GGUF magic (the suffix alone is not trusted)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


@dataclass
class TensorInfo:
    name: str
    qtype: QType
    shape: tuple[int, ...]  # torch order (outermost first): GGUF lists ne0 (the row length) first
    offset: int  # byte offset in the file
    nbytes: int


class GGUFFile:
    """The parsed header of a GGUF file: ``metadata`` (key -> value) and ``tensors`` (name -> TensorInfo).

    Tensor bytes stay in a read-only memory map until ``tensor(name)`` dequantises one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"GGUF file {str(path)!r} does not exist")
        with open(self.path, "rb") as f:
            # Private (copy-on-write) rather than read-only, so tensors can live on the map without
            # torch's non-writable warning; nothing writes to it, so the pages stay shared with the page cache.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{self.path} is not a valid GGUF file: {e}") from e

    # ---------------------------------------------------------------- header parsing

    def _parse(self) -> None:
        if self._map[:4] != GGUF_MAGIC:
            raise ConfigError(f"{self.path} is not a GGUF file (bad magic {bytes(self._map[:4])!r})")
        self._pos = 4
        self.version = self._scalar("<I")
        if self.version not in (2, 3):
            raise ConfigError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        num_tensors, num_kv = self._scalar("<Q"), self._scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self._string()
            self.metadata[key] = self._value(GGUFValueType(self._scalar("<I")))
        infos = []
        for _ in range(num_tensors):
            name = self._string()
            dims = [self._scalar("<Q") for _ in range(self._scalar("<I"))]
            qtype, offset = self._scalar("<I"), self._scalar("<Q")
            infos.append((name, dims, qtype, offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        # As llama.cpp's reader: a power of two (tensor data offsets are rounded up to it).
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise ConfigError(f"{self.path}: general.alignment must be a power of two, got {alignment!r}")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, offset in infos:
            try:
                qtype = QType(qtype)
            except ValueError:
                raise ConfigError(f"{self.path}: tensor {name!r} has unknown GGML type {qtype}") from None
            info = TensorInfo(
                name, qtype, tuple(reversed(dims)), data_start + offset, _tensor_nbytes(qtype, dims)
            )
            self._check_extent(info, dims)
            self.tensors[name] = info

    def _check_extent(self, info: TensorInfo, dims: list[int]) -> None:
        """A tensor of a type effinfer reads has whole blocks per row and lies inside the file."""
        if info.qtype not in SUPPORTED_TYPES:
            return  # reported by ``check_loadable`` if the model needs it
        if dims and dims[0] % block_values(info.qtype):
            raise ConfigError(
                f"{self.path}: tensor {info.name!r} rows of {dims[0]} values are not whole "
                f"{info.qtype.name} blocks of {block_values(info.qtype)}"
            )
        if info.offset + info.nbytes > len(self._map):
            raise WeightsError(
                f"{self.path} is truncated: tensor {info.name!r} ends at byte {info.offset + info.nbytes}, "
                f"the file has {len(self._map)}"
            )

    def _scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._scalar("<Q")
        text = self._map[self._pos : self._pos + length].decode("utf-8")
        self._pos += length
        return text

    def _value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype != GGUFValueType.ARRAY:
            return self._scalar(_SCALARS[vtype])
        item_type, count = GGUFValueType(self._scalar("<I")), self._scalar("<Q")
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type].replace("?", "b1"))
            values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos)
            self._pos += values.nbytes
            return values.tolist()
        return [self._value(item_type) for _ in range(count)]

    # ---------------------------------------------------------------- tensors

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (uint8), memory-mapped."""
        info = self.tensors[name]
        if info.offset + info.nbytes > len(self._map):
            raise WeightsError(f"{self.path} is truncated: tensor {name!r} runs past the end of the file")
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def read(self, name: str) -> np.ndarray:
        """A copy of the tensor's bytes; the map's pages it went through are dropped from this process.

        Loading reads every tensor once and keeps a repacked copy, so the mapped pages would only
        add the file's size to the resident set (the page cache keeps them for the next reader).
        """
        data = self.raw(name).copy()
        info = self.tensors[name]
        self.release_pages(info.offset, info.nbytes)
        return data

    def release_pages(self, offset: int = 0, length: int | None = None) -> None:
        """Drop the map's pages in [offset, offset + length) from this process (re-read on next touch)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        length = len(self._map) - offset if length is None else length
        start = offset - offset % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, min(len(self._map), offset + length) - start)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantised to float32, in torch's row-major shape."""
        info = self.tensors[name]
        # A copy, detached from the map (whose pages it drops).
        return dequantize(self.read(name), info.qtype, info.shape)

    # ---------------------------------------------------------------- model description

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def model_config(self) -> ModelConfig:
        return model_config_from_gguf(self)

    def tokenizer(self):
        from effinfer.loading.gguf_tokenizer import tokenizer_from_gguf

        tokenizer = tokenizer_from_gguf(self.metadata)
        # A vocabulary-only file may name an architecture effinfer cannot run; its tokenizer still works.
        if tokenizer.chat_template is None and self.architecture in gguf_architectures():
            template = family_for_gguf(self.architecture, self.metadata).default_chat_template
            if template:
                tokenizer.chat_template = tokenizer.chat_templates["default"] = template
        return tokenizer

    def load_model(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        show_progress: bool = True,
        stage: PipelineStage | None = None,
    ) -> torch.nn.Module:
        return load_model(self, config, dtype, device, max_positions, show_progress, stage=stage)


def _tensor_nbytes(qtype: QType, dims: list[int]) -> int:
    count = int(np.prod(dims)) if dims else 1
    if qtype in FLOAT_TYPES:
        return count * FLOAT_TYPES[qtype].itemsize
    if qtype in BLOCK_FORMATS:
        block_values, block_bytes, _ = BLOCK_FORMATS[qtype]
        return count // block_values * block_bytes
    return 0  # unsupported: reported when the tensor is loaded, so the header still parses


# -------------------------------------------------------------------- metadata -> ModelConfig


def model_config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """Hyper-parameters from the family's ``{arch}.*`` keys and the file's vocabulary, through ``ModelConfig.from_hf``."""
    hf = hf_config_from_gguf(gguf)
    try:
        return ModelConfig.from_hf(hf)
    except ConfigError as e:  # name the file; the field names are HF's (see the family's mapping)
        raise ConfigError(f"{gguf.path.name}: {e}") from None


def hf_config_from_gguf(gguf: GGUFFile) -> dict[str, Any]:
    """The file's hyper-parameters as an HF config.json dict (what a checkpoint written from it carries)."""
    meta, arch = gguf.metadata, gguf.architecture
    try:
        family = family_for_gguf(arch, meta)
    except ConfigError as e:
        raise ConfigError(f"{gguf.path.name}: {e}") from None

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if isinstance(value, list):  # per-layer values (e.g. head_count_kv); these models use one value
            value = value[0]
        return value

    missing = [k for k in REQUIRED_GGUF_KEYS if f"{arch}.{k}" not in meta]
    if missing:
        raise ConfigError(f"{gguf.path.name} lacks metadata {', '.join(f'{arch}.{k}' for k in missing)}")
    # The embedding's rows decide (the vocabulary may be padded or shorter); vocab-only files have none.
    embed = gguf.tensors.get("token_embd.weight")
    vocab_size = (
        embed.shape[0] if embed else key("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    )
    try:
        hf = family.hf_config_from_gguf(arch, key)
        hf.update(
            vocab_size=vocab_size,
            # llama.cpp ties the output projection to the embedding when the file has no output.weight.
            tie_word_embeddings="output.weight" not in gguf.tensors,
            attention_bias="blk.0.attn_q.bias" in gguf.tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            dtype=_working_dtype(gguf),
        )
        return hf
    except ConfigError as e:  # name the file; the field names are HF's (see the family's mapping)
        raise ConfigError(f"{gguf.path.name}: {e}") from None


def _working_dtype(gguf: GGUFFile) -> str:
    """The dtype a plain float file was made in; quantized files are dequantised to bfloat16."""
    info = gguf.tensors.get("blk.0.attn_q.weight") or gguf.tensors.get("token_embd.weight")
    float_names = {QType.F32: "float32", QType.F16: "float16", QType.BF16: "bfloat16"}
    return float_names.get(info.qtype, "bfloat16") if info is not None else "float32"


# -------------------------------------------------------------------- tensors -> HF tensors


def hf_tensor_name(name: str, family: type[CausalLM] = CausalLM) -> str | None:
    """The HF name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    return family.gguf_hf_name(name)


def hf_tensors(
    gguf: GGUFFile,
    config: ModelConfig,
    quantized_linears: bool = False,
    split_for: SplitLookup | None = None,
    wanted: Callable[[str], bool] | None = None,
    skip: frozenset[str] = frozenset(),
):
    """Yield (HF name, tensor, bytes read) for every weight in the file but the GGUF names in ``skip``.

    Tensors are dequantised to float32, except, with ``quantized_linears``, the block-quantized
    weights of the layers' linears and of an untied lm_head, which stay quantized (exactly the
    same numbers) as ``AffineGroupWeight`` (every block type, ``quantized_layouts``); a stack of expert matrices as a list, one per expert.
    ``split_for`` (tensor parallelism): each tensor's slice for this rank, cut in the stored bytes
    before decoding. ``wanted`` (pipeline parallelism): which tensors, by HF name, to decode at all.
    """
    family = model_class(config.architecture)
    layouts = quantized_layouts(gguf, family) if quantized_linears else {}
    mapping_config = rank_head_config(config) if split_for else config
    for name, info in gguf.tensors.items():
        if name == ROPE_FREQS or name in skip:
            continue  # rope_freqs: applied to the rotary tables after loading
        hf_name = family.gguf_hf_name(name)
        if wanted is not None and hf_name is not None and not wanted(hf_name):
            continue
        raw, shape = gguf.raw(name), info.shape
        split = split_for(hf_name) if split_for and hf_name else None
        if split is not None:
            raw, shape = split_gguf_bytes(raw, info.qtype, shape, split, name)
        # Keep llama.cpp's own blocks where possible: the layer runs on the quantized kernels, no dequantising.
        layout = layouts.get(_fusion_group(name)) if info.qtype in BLOCK_FORMATS else None  # not a float bias
        keep_quantized = layout is not None
        if keep_quantized:
            raw = raw.copy()
            if len(shape) == 3:  # stacked experts: one quantized matrix per expert
                per_expert = raw.reshape(shape[0], -1)
                tensor = [to_affine_weight(part, info.qtype, shape[1:]) for part in per_expert]
            else:
                tensor = to_affine_weight(raw, info.qtype, shape)
        else:
            tensor = dequantize(raw.copy(), info.qtype, shape)
        mapped = family.gguf_tensor(name, tensor, mapping_config)
        if mapped is None:
            raise WeightsError(f"{gguf.path.name}: tensor {name!r} is not supported")
        hf_name, tensor = mapped
        if isinstance(tensor, list):
            tensor = [QuantizedShard(t) for t in tensor]
        elif keep_quantized:
            tensor = QuantizedShard(tensor)
        yield hf_name, tensor, info.nbytes


def quantized_layouts(gguf: GGUFFile, family: type[CausalLM]) -> dict[str, type]:
    """Fusion group -> the weight type its block-quantized tensors load as (groups absent stay float).

    Every block type loads as an ``AffineGroupWeight`` (Q8_0 / Q4_0 too: fp16 scales stream fewer
    bytes); a fused layer (q/k/v, gate/up) mixing types (Q4_K_M puts Q6_K or Q8_0 next to Q4_K /
    Q5_0) is one, whose ``cat_rows`` widens the parts to a common code width and group size, still
    exactly. Float tensors in a group keep the whole group float. Stacked
    expert matrices (``*_exps``, 3-D) load as a list of such weights, one per expert.
    """
    group_types: dict[str, set] = {}
    for name, info in gguf.tensors.items():
        hf_name = family.gguf_hf_name(name)
        if hf_name is None:
            continue
        linear = (hf_name.endswith("_proj.weight") or hf_name == "lm_head.weight") and len(info.shape) == 2
        if linear or (hf_name.endswith("_exps.weight") and len(info.shape) == 3):
            group_types.setdefault(_fusion_group(name), set()).add(info.qtype)
    layouts: dict[str, type] = {}
    for group, types in group_types.items():
        if all(t in AFFINE_TYPES for t in types):  # Q8_0 / Q4_0 too: fp16 scales stream fewer bytes
            layouts[group] = AffineGroupWeight
    return layouts


def quantize_tied_lm_head(model: torch.nn.Module, gguf: GGUFFile, config: ModelConfig) -> None:
    """A tied lm_head reads the embedding's own blocks, as llama.cpp does: for SmolLM2's Q8_0 table
    8.5 bits a weight per token instead of bf16's 16."""
    info = gguf.tensors.get(TOKEN_EMBEDDING)
    if info is None or info.qtype not in AFFINE_TYPES:
        return
    weight = to_affine_weight(gguf.raw(TOKEN_EMBEDDING).copy(), info.qtype, info.shape)
    model.lm_head.set_quantized(
        model_class(config.architecture).gguf_tensor(TOKEN_EMBEDDING, weight, config)[1]
    )


def check_loadable(gguf: GGUFFile) -> None:
    """Every tensor has an HF name and a type effinfer dequantises; else a one-line error, nothing allocated."""
    family = family_for_gguf(gguf.architecture, gguf.metadata)
    for name, info in gguf.tensors.items():
        if name != ROPE_FREQS and family.gguf_hf_name(name) is None:
            raise WeightsError(f"{gguf.path.name}: tensor {name!r} is not supported")
        if info.qtype not in SUPPORTED_TYPES:
            raise WeightsError(
                f"{gguf.path.name}: tensor {name!r} has GGUF type {info.qtype.name}, which effinfer cannot "
                f"read; supported: {', '.join(t.name for t in SUPPORTED_TYPES)}"
            )


def _fusion_group(name: str) -> str:
    """The effinfer layer a GGUF tensor lands in: ``blk.3.attn_k.weight`` -> ``blk.3.attn_qkv``."""
    for members, fused in (
        (("attn_q", "attn_k", "attn_v"), "attn_qkv"),
        (("ffn_gate", "ffn_up"), "ffn_gate_up"),
        (("ffn_gate_exps", "ffn_up_exps"), "ffn_gate_up_exps"),  # each expert's gate/up is fused
        (("ffn_gate_shexp", "ffn_up_shexp"), "ffn_gate_up_shexp"),
    ):
        for member in members:
            if f".{member}." in name:
                return name.replace(f".{member}.", f".{fused}.").removesuffix(".weight").removesuffix(".bias")
    return name.removesuffix(".weight")


# -------------------------------------------------------------------- the model


def load_model(
    gguf: GGUFFile | str | os.PathLike,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    show_progress: bool = True,
    finalize: bool = True,
    stage: PipelineStage | None = None,
) -> torch.nn.Module:
    """Build the model for ``config`` and fill it from the GGUF file, dequantising as it goes.

    ``finalize=False`` dequantises every weight and leaves plain float weights for compression to work on;
    ``stage``: only that pipeline stage's modules and weights.
    """
    if not isinstance(gguf, GGUFFile):
        gguf = GGUFFile(gguf)
    check_loadable(gguf)  # before the model is allocated
    model = build_model(config, dtype, device, max_positions, stage)
    splits = checkpoint_splits(model)
    # For inference on CPU in one process the embedding keeps the file's blocks (read row by row
    # from the map); under tensor parallelism each rank holds its vocabulary slice as floats.
    placed = (
        _keep_embedding_quantized(gguf, model, config, dtype)
        if finalize and device.type == "cpu" and splits is None
        else ()
    )
    total = sum(info.nbytes for name, info in gguf.tensors.items() if name not in placed)
    tensors = hf_tensors(
        gguf, config, finalize, split_for=splits, wanted=stage_tensor_filter(model), skip=frozenset(placed)
    )
    fill_model(
        model,
        config,
        tensors,
        total,
        gguf.path.name,
        "loading GGUF",
        show_progress,
        prepare_quantized=finalize,
    )
    if finalize and config.tie_word_embeddings and not placed and splits is None and _holds_head(model):
        quantize_tied_lm_head(model, gguf, config)
    # llama.cpp stores Llama 3 rope scaling as per-frequency divisors of the rotary tables.
    rope_freq_factors = gguf.tensor(ROPE_FREQS) if ROPE_FREQS in gguf.tensors else None
    finalize_model(model, device, dtype, finalize, rope_freq_factors, release_quantized=True)
    gguf.release_pages()  # what loading touched; the embedding's rows come back as tokens use them
    release_freed_memory()
    return model


def _keep_embedding_quantized(
    gguf: GGUFFile, model: torch.nn.Module, config: ModelConfig, dtype: torch.dtype
) -> tuple[str, ...]:
    """Put a block-quantized ``token_embd`` into the model as a ``QuantizedEmbedding`` over the map.

    A tied output projection gets its own copy of the same blocks in the layout its kernel reads
    (it streams the whole table every token; a lookup reads a few rows). Returns the GGUF names
    placed (none when the table is stored in floating point or the family names it differently).
    """
    info = gguf.tensors.get(TOKEN_EMBEDDING)
    family = model_class(config.architecture)
    hf_name = family.gguf_hf_name(TOKEN_EMBEDDING)
    target = model.checkpoint_target(hf_name) if hf_name else None
    if info is None or info.qtype not in BLOCK_FORMATS or target is None or len(info.shape) != 2:
        return ()
    module_name = target[0].removesuffix(".weight")
    parent_name, _, attr = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(getattr(parent, attr, None), torch.nn.Embedding):
        return ()
    rows, cols = info.shape
    table = torch.from_numpy(gguf.raw(TOKEN_EMBEDDING).reshape(rows, info.nbytes // rows))
    decode = functools.partial(_decode_rows, qtype=info.qtype, cols=cols)
    setattr(parent, attr, QuantizedEmbedding(table, cols, decode, dtype, info.qtype.name))
    if config.tie_word_embeddings and _holds_head(model):
        if info.qtype not in AFFINE_TYPES:
            raise WeightsError(
                f"{gguf.path.name}: a tied {info.qtype.name} embedding cannot be an output layer"
            )
        quantize_tied_lm_head(model, gguf, config)
        model.lm_head.finalize(
            release_quantized=True
        )  # packed now: its loaded form is freed before the rest loads
        _look_up_in_head(getattr(parent, attr), model.lm_head, rows)
    return (TOKEN_EMBEDDING,)


def _look_up_in_head(embedding: QuantizedEmbedding, head: torch.nn.Module, rows: int) -> None:
    """A tied embedding reads its rows from the output layer's packed blocks (one C++ call; the same
    values), where the CPU kernel holds the whole vocabulary."""
    from effinfer.kernels.cpu import woq

    state = getattr(head, "_kernel_state", None)
    if state is not None and state.backend == "cpu-woq" and head.out_features == rows:
        embedding.lookup = functools.partial(woq.embedding_rows, state.data)


def _holds_head(model: torch.nn.Module) -> bool:
    """Whether this process runs the output head (a pipeline stage other than the last does not)."""
    return hasattr(getattr(model, "lm_head", None), "set_quantized")


# Up to this many rows (a decode step's tokens), the embedding lookup decodes with gguf.quants, the
# format's reference implementation in a few numpy calls (~20-50 us a row); effinfer's torch
# decoder, which gives the same values, pays for its dozens of small tensor ops on so few rows.
NUMPY_DECODE_MAX_ROWS = 8


def _decode_rows(raw_rows: torch.Tensor, qtype: QType, cols: int) -> torch.Tensor:
    if raw_rows.shape[0] <= NUMPY_DECODE_MAX_ROWS:
        values = gguf_quants_reference.dequantize(raw_rows.numpy(), qtype)
        return torch.from_numpy(values).reshape(raw_rows.shape[0], cols)
    return dequantize(raw_rows, qtype, (raw_rows.shape[0], cols))
