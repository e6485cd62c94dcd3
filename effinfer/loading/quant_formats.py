"""Pack and unpack ``QuantizedWeight`` in the tensor layouts of GPTQ, AWQ (GEMM) and compressed-tensors.

Papers: GPTQ (Frantar et al. 2022, arXiv:2210.17323), AWQ (Lin et al. 2023, arXiv:2306.00978);
compressed-tensors is the checkpoint format of llm-compressor. Idea: all three store the same
integer codes, group scales and zero points; they differ only in how codes are packed into
int32 words, which dimension is packed, and small conventions (GPTQ v1 stores ``zero - 1``, AWQ
interleaves its nibbles, compressed-tensors offsets signed values). Switch on: these functions
are used by ``effinfer.loading.quantized`` (reading) and ``effinfer.compress.quant.formats``
(``save_quantized``, writing); nothing here touches files.

Layouts, per Linear with ``out`` output and ``in`` input features (codes ``q``, ``W = (q - z) * s``):

* GPTQ (``checkpoint_format`` "gptq", i.e. v1): ``qweight`` int32 [in*bits/32, out] (codes packed
  along the input dimension), ``qzeros`` int32 [groups, out*bits/32] holding ``z - 1``,
  ``scales`` fp16 [groups, out], ``g_idx`` int32 [in]. "gptq_v2" stores ``z`` itself.
* AWQ GEMM: ``qweight`` int32 [in, out/8] with nibbles in the order 0, 2, 4, 6, 1, 3, 5, 7,
  ``qzeros`` int32 [groups, out/8] in the same order, ``scales`` fp16 [groups, out].
* compressed-tensors "pack-quantized": ``weight_packed`` int32 [out, in*bits/32], ``weight_scale``
  [out, groups], ``weight_shape`` [2], ``weight_zero_point`` int32 [out*bits/32, groups] when
  asymmetric (packed along the output dimension), ``weight_g_idx`` [in] for act-order.
  "int-quantized" / "naive-quantized": ``weight`` int8 [out, in] holding ``q - 2**(bits-1)``.

Every packing here is the same dense little-endian bit stream: value ``i`` of a row occupies bits
``[i*bits, (i+1)*bits)`` of the row's words, which is what GPTQ (including its 3-bit scheme)
and compressed-tensors do; widths that do not fill a word are zero-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effinfer.quant.integer import QuantizedWeight

# AWQ GEMM: nibble ``i`` of a word holds output column ``8 * word + AWQ_ORDER[i]``.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# ...so output column ``j`` of a block sits in nibble ``AWQ_REVERSE_ORDER[j]``.
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

_MASK32 = 0xFFFFFFFF


@dataclass
class QuantizedShard:
    """What a quantized-checkpoint reader hands ``fill_model`` in place of a float weight tensor."""

    weight: QuantizedWeight
    act_quant: str | None = None  # "int8" / "int8-tensor" for W8A8 layers


# ---- dense bit packing -------------------------------------------------------------------------


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``values`` [..., n] (each < 2**bits) into int32 words [..., ceil(n*bits/32)]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit values")
    *lead, n = values.shape
    num_words = -(-n * bits // 32)
    blocks = -(-n // 32)  # 32 values fill exactly ``bits`` words
    v = torch.zeros(*lead, blocks * 32, dtype=torch.int64, device=values.device)
    v[..., :n] = values.to(torch.int64)
    if int(v.min()) < 0 or int(v.max()) >= 2**bits:
        raise ValueError(f"values out of range for {bits}-bit packing")
    v = v.view(*lead, blocks, 32)
    # int64 accumulators so shifts never overflow; wrapped to int32 at the end.
    words = torch.zeros(*lead, blocks, bits, dtype=torch.int64, device=values.device)
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        words[..., word] |= (v[..., i] << offset) & _MASK32
        if offset + bits > 32:  # straddles into the next word (3-bit and other odd widths)
            words[..., word + 1] |= v[..., i] >> (32 - offset)
    words = words.view(*lead, blocks * bits)[..., :num_words]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of ``pack_bits``: int32 words [..., W] -> the first ``n`` values [..., n], uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot unpack {bits}-bit values")
    *lead, num_words = words.shape
    if num_words * 32 < n * bits:
        raise ValueError(f"{num_words} words hold fewer than {n} {bits}-bit values")
    blocks = -(-num_words // bits)
    w = torch.zeros(*lead, blocks * bits, dtype=torch.int64, device=words.device)
    w[..., :num_words] = words.to(torch.int64) & _MASK32  # reinterpret as unsigned
    w = w.view(*lead, blocks, bits)
    out = torch.empty(*lead, blocks, 32, dtype=torch.int64, device=words.device)
    mask = (1 << bits) - 1
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        value = w[..., word] >> offset
        if offset + bits > 32:
            value = value | (w[..., word + 1] << (32 - offset))
        out[..., i] = value & mask
    return out.view(*lead, blocks * 32)[..., :n].to(torch.uint8)


# ---- helpers -----------------------------------------------------------------------------------


def natural_groups(in_features: int, group_size: int) -> torch.Tensor:
    return torch.arange(in_features, dtype=torch.int32) // group_size


def _weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None,
) -> QuantizedWeight:
    """A QuantizedWeight; ``g_idx`` is kept only when it is not the natural ``k // group_size``."""
    in_features = codes.shape[1]
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32).cpu()
        if g_idx.numel() != in_features:
            raise ValueError(f"g_idx has {g_idx.numel()} entries for {in_features} input features")
        if torch.equal(g_idx, natural_groups(in_features, group_size)):
            g_idx = None
    return QuantizedWeight(
        codes.contiguous(),
        scales.float().contiguous(),
        zeros.to(torch.int32).contiguous(),
        bits,
        group_size,
        g_idx.contiguous() if g_idx is not None else None,
    )


def _check_bits(fmt: str, bits: int, allowed: tuple[int, ...]) -> None:
    if bits not in allowed:
        raise ValueError(f"{fmt} cannot store {bits}-bit weights (supported: {', '.join(map(str, allowed))})")


# ---- GPTQ --------------------------------------------------------------------------------------

GPTQ_BITS = (2, 3, 4, 8)


def gptq_zero_shift(weight: QuantizedWeight) -> QuantizedWeight:
    """Make every zero point >= 1 so GPTQ v1's ``zero - 1`` is never negative.

    A group with zero point 0 and no code at the top of the range is the same weight with every
    code and the zero point raised by one; GPTQ v1 has no way to store the other case.
    """
    bad = weight.zeros == 0
    if not bool(bad.any()):
        return weight
    shift_cols = bad[:, weight.group_index().to(bad.device)]  # [out, in]: columns whose group moves
    if bool((weight.qweight[shift_cols] == 2**weight.bits - 1).any()):
        raise ValueError(
            "GPTQ v1 stores zero - 1 and cannot hold a zero point of 0 in a group that also uses the "
            "largest code; use checkpoint_format 'gptq_v2', another format, or symmetric quantization"
        )
    return QuantizedWeight(
        weight.qweight + shift_cols.to(torch.uint8),
        weight.scales,
        weight.zeros + bad.to(torch.int32),
        weight.bits,
        weight.group_size,
        weight.g_idx,
    )


def pack_gptq(weight: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` (fp16) and ``g_idx`` of one Linear in GPTQ's layout."""
    _check_bits("GPTQ", weight.bits, GPTQ_BITS)
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r} (use 'gptq' or 'gptq_v2')")
    if checkpoint_format == "gptq":
        weight = gptq_zero_shift(weight)
    offset = 1 if checkpoint_format == "gptq" else 0
    codes = weight.qweight.cpu()
    zeros = weight.zeros.cpu() - offset
    return {
        "qweight": pack_bits(codes, weight.bits).t().contiguous(),  # [in*bits/32, out]
        "qzeros": pack_bits(zeros.t(), weight.bits).contiguous(),  # [groups, out*bits/32]
        "scales": weight.scales.cpu().t().to(torch.float16).contiguous(),  # [groups, out]
        "g_idx": weight.group_index().cpu().to(torch.int32).contiguous(),
    }


def unpack_gptq(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int, checkpoint_format: str = "gptq"
) -> QuantizedWeight:
    """One Linear from GPTQ tensors; ``group_size`` -1 means one group per output row."""
    _check_bits("GPTQ", bits, GPTQ_BITS)
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(
            f"unsupported GPTQ checkpoint_format {checkpoint_format!r} (supported: gptq, gptq_v2)"
        )
    for key in ("qweight", "qzeros", "scales"):
        if key not in tensors:
            raise ValueError(f"GPTQ layer lacks {key!r}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    g_idx = tensors.get("g_idx")
    out_features = scales.shape[1]
    # g_idx is the only tensor that states ``in`` exactly (qweight rows are padded to whole words).
    in_features = g_idx.numel() if g_idx is not None else qweight.shape[0] * 32 // bits
    codes = unpack_bits(qweight.t(), bits, in_features)  # [out, in]
    stored = unpack_bits(qzeros, bits, out_features).to(torch.int32)  # [groups, out]
    # v1 holds zero - 1; wrap like the writers that made it (a zero of 0 is stored as all ones).
    zeros = (stored + 1) % (2**bits) if checkpoint_format == "gptq" else stored
    if codes.shape[0] != out_features:
        raise ValueError(f"qweight has {codes.shape[0]} columns, scales {out_features}")
    group = in_features if group_size in (-1, 0, None) else group_size
    return _weight(codes, scales.t(), zeros.t(), bits, group, g_idx)


# ---- AWQ GEMM ----------------------------------------------------------------------------------


def _awq_interleave(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Reorder the columns of [rows, cols] within each block of 8 (cols padded to a multiple of 8)."""
    rows, cols = values.shape
    padded = -(-cols // 8) * 8
    v = torch.zeros(rows, padded, dtype=values.dtype, device=values.device)
    v[:, :cols] = values
    return v.view(rows, padded // 8, 8)[:, :, list(order)].reshape(rows, padded)


def pack_awq(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros`` and ``scales`` (fp16) of one Linear in AutoAWQ's GEMM layout."""
    _check_bits("AWQ GEMM", weight.bits, (4,))
    if weight.has_act_order():
        raise ValueError("AWQ GEMM has no g_idx and cannot store act-order (desc_act) groups")
    codes = weight.qweight.cpu().t()  # [in, out]
    zeros = weight.zeros.cpu().t()  # [groups, out]
    return {
        "qweight": pack_bits(_awq_interleave(codes, AWQ_ORDER), 4).contiguous(),
        "qzeros": pack_bits(_awq_interleave(zeros, AWQ_ORDER), 4).contiguous(),
        "scales": weight.scales.cpu().t().to(torch.float16).contiguous(),
    }


def _awq_unpack(words: torch.Tensor, cols: int) -> torch.Tensor:
    nibbles = unpack_bits(words, 4, words.shape[1] * 8)
    return _awq_interleave(nibbles, AWQ_REVERSE_ORDER)[:, :cols]


def unpack_awq(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantizedWeight:
    _check_bits("AWQ GEMM", bits, (4,))
    for key in ("qweight", "qzeros", "scales"):
        if key not in tensors:
            raise ValueError(f"AWQ layer lacks {key!r}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    out_features = scales.shape[1]
    in_features = qweight.shape[0]
    codes = _awq_unpack(qweight, out_features).t()  # [out, in]
    zeros = _awq_unpack(qzeros, out_features).t().to(torch.int32)
    group = in_features if group_size in (-1, 0, None) else group_size
    return _weight(codes, scales.t(), zeros, bits, group, None)


# ---- compressed-tensors ------------------------------------------------------------------------

CT_PACKED_BITS = (2, 4, 8)  # 3-bit packing changed between compressed-tensors releases


def compressed_tensors_args(weight: QuantizedWeight) -> dict:
    """The ``weights`` QuantizationArgs of a config group that describes ``weight``."""
    channel = weight.num_groups == 1 and weight.g_idx is None
    return {
        "num_bits": weight.bits,
        "type": "int",
        "symmetric": weight.symmetric,
        "group_size": None if channel else weight.group_size,
        "strategy": "channel" if channel else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": "group" if weight.has_act_order() else None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def pack_compressed_tensors(
    weight: QuantizedWeight, fmt: str = "pack-quantized", scale_dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """One Linear in compressed-tensors' ``pack-quantized`` or ``int-quantized`` / ``naive-quantized``."""
    offset = 2 ** (weight.bits - 1)
    codes, zeros = weight.qweight.cpu(), weight.zeros.cpu()
    out: dict[str, torch.Tensor] = {"weight_scale": weight.scales.cpu().to(scale_dtype).contiguous()}
    if fmt == "pack-quantized":
        _check_bits("compressed-tensors pack-quantized", weight.bits, CT_PACKED_BITS)
        # The codes are already the unsigned ``signed + 2**(bits-1)`` values the format packs.
        out["weight_packed"] = pack_bits(codes, weight.bits)
        out["weight_shape"] = torch.tensor([weight.out_features, weight.in_features], dtype=torch.int64)
        if not weight.symmetric:
            out["weight_zero_point"] = pack_bits(zeros.t(), weight.bits).t().contiguous()
    elif fmt in ("int-quantized", "naive-quantized"):
        _check_bits(f"compressed-tensors {fmt}", weight.bits, (8,))
        out["weight"] = (codes.to(torch.int16) - offset).to(torch.int8)
        if not weight.symmetric:
            out["weight_zero_point"] = (zeros - offset).to(torch.int8)
    else:
        raise ValueError(f"unknown compressed-tensors format {fmt!r}")
    if weight.has_act_order():
        out["weight_g_idx"] = weight.g_idx.cpu().to(torch.int32).contiguous()
    return out


def unpack_compressed_tensors(tensors: dict[str, torch.Tensor], args: dict) -> QuantizedWeight:
    """One Linear from compressed-tensors tensors and its group's ``weights`` QuantizationArgs."""
    if args.get("type", "int") != "int":
        raise ValueError(
            f"compressed-tensors weights of type {args.get('type')!r} are not supported (int only)"
        )
    bits = int(args.get("num_bits", 8))
    offset = 2 ** (bits - 1)
    scale = tensors["weight_scale"].float()
    if "weight_packed" in tensors:
        _check_bits("compressed-tensors pack-quantized", bits, CT_PACKED_BITS)
        out_features, in_features = (int(d) for d in tensors["weight_shape"].tolist())
        codes = unpack_bits(tensors["weight_packed"], bits, in_features)
    elif "weight" in tensors:
        if tensors["weight"].dtype != torch.int8:
            raise ValueError(f"expected an int8 'weight', found {tensors['weight'].dtype}")
        out_features, in_features = tensors["weight"].shape
        codes = (tensors["weight"].to(torch.int16) + offset).to(torch.uint8)
    else:
        raise ValueError("compressed-tensors layer has neither 'weight_packed' nor an int8 'weight'")
    if scale.dim() < 2:  # per-tensor ([] or [1]) or a flattened per-channel scale [out]
        scale = scale.reshape(-1, 1)
    if scale.shape[0] == 1:  # per-tensor: one scale for every row
        scale = scale.expand(out_features, scale.shape[1])
    groups = scale.shape[1]
    zero_point = tensors.get("weight_zero_point")
    if args.get("symmetric", True) or zero_point is None:
        if not args.get("symmetric", True):
            raise ValueError("asymmetric compressed-tensors layer lacks 'weight_zero_point'")
        zeros = torch.full((out_features, groups), offset, dtype=torch.int32)
    elif zero_point.dtype == torch.int32 and zero_point.shape[0] != out_features:
        # Packed along the output dimension, unsigned (compressed-tensors >= 0.10).
        zeros = unpack_bits(zero_point.t(), bits, out_features).t().to(torch.int32)
    else:
        zeros = zero_point.to(torch.int32).reshape(-1, groups).expand(out_features, groups) + offset
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "channel")
    if strategy == "group":
        group = int(args["group_size"])
    elif strategy in ("channel", "tensor"):
        group = in_features
    else:
        raise ValueError(f"compressed-tensors weight strategy {strategy!r} is not supported (group, channel)")
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None and bool((g_idx < 0).any()):  # llm-compressor's "unset" placeholder
        g_idx = None
    return _weight(codes, scale, zeros, bits, group, g_idx)


def compressed_tensors_act_quant(input_args: dict | None) -> str | None:
    """effinfer's ``act_quant`` for a group's ``input_activations`` (None: weight-only)."""
    if not input_args:
        return None
    kind, bits = input_args.get("type", "int"), input_args.get("num_bits")
    strategy, dynamic = input_args.get("strategy"), input_args.get("dynamic")
    if kind == "int" and bits == 8 and dynamic is True and input_args.get("symmetric", True):
        if strategy == "token":
            return "int8"
        if strategy == "tensor":
            return "int8-tensor"
    raise ValueError(
        f"compressed-tensors input activations {kind}{bits} strategy={strategy!r} dynamic={dynamic!r} "
        "are not supported (only dynamic symmetric int8 per token or per tensor)"
    )


def compressed_tensors_input_args(act_quant: str) -> dict:
    strategies = {"int8": "token", "int8-tensor": "tensor"}
    if act_quant not in strategies:
        raise ValueError(f"compressed-tensors cannot describe activation quantization {act_quant!r}")
    return {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": strategies[act_quant],
        "block_structure": None,
        "dynamic": True,
        "actorder": None,
        "observer": None,
        "observer_kwargs": {},
    }


class CheckpointFormat:
    """How one quantization method names and decodes the tensors of a quantized Linear."""

    suffixes: tuple[str, ...] = ()
    marker = ""  # a layer is quantized when ``<layer>.<marker>`` is in the checkpoint

    def check(self, names: set[str]) -> None:
        """Fail early for checkpoint contents this reader cannot handle."""

    def quantized_layers(self, names: set[str]) -> dict[str, set[str]]:
        """{layer: the keys of its tensors in the checkpoint} for every quantized Linear."""
        layers = {n[: -len(self.marker) - 1] for n in names if n.endswith("." + self.marker)}
        return {layer: {s for s in self.suffixes if f"{layer}.{s}" in names} for layer in layers}

    def split(self, name: str, layers: dict[str, set[str]]) -> tuple[str, str] | None:
        """(layer, key) when ``name`` is one of a quantized layer's tensors, else None."""
        layer, _, key = name.rpartition(".")
        return (layer, key) if key in layers.get(layer, ()) else None

    def decode(self, layer: str, tensors: dict[str, torch.Tensor]) -> QuantizedShard:
        raise NotImplementedError
