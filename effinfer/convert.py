"""``effinfer convert --to gguf``: write an HF model directory as a GGUF file that llama.cpp runs.

Format reference: ggml's ``docs/gguf.md`` and llama.cpp's ``convert_hf_to_gguf.py`` (key names,
tensor names, the q/k row permutation, how a vocabulary is stored).

Idea: the inverse of ``loading/gguf.py``. Hyper-parameters become ``{arch}.*`` keys, the
``tokenizer.json`` vocabulary becomes ``tokenizer.ggml.*`` (SentencePiece-style ``llama`` for
``▁``/byte-fallback BPE, ``gpt2`` for byte-level BPE), and each tensor is renamed, q/k rows of
Llama models are interleaved for llama.cpp's rotary, and weights are stored as F32, F16, BF16 or
Q8_0 / Q4_0 (norms stay F32; a matrix whose rows do not split into 32-value blocks falls back to
F16).

    effinfer convert MODEL_DIR --to gguf --outtype q8_0 -o model.gguf

``effinfer convert --to-gqa N MODEL_DIR OUT_DIR`` (MHA -> GQA) is ``compress/gqa.py``'s; this module
only parses its flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from effinfer.config import ConfigError, ModelConfig
from effinfer.layers.rotary import inverse_frequencies
from effinfer.loading.gguf import ROPE_FREQS
from effinfer.loading.gguf_quants import quantize_q8_0
from effinfer.loading.gguf_tokenizer import BYTE, CONTROL, GPT2_REGEX, NORMAL, UNKNOWN, USER_DEFINED
from effinfer.loading.safetensors import check_model_dir, find_weight_files
from effinfer.models.registry import gguf_architecture_for, model_class
from effinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

QType = gguf.GGMLQuantizationType

OUTTYPES = {
    "f32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}

# The original (HF tokenizer.json) regexes of the BPE pre-tokenizers llama.cpp knows by name.
_HF_PRE_TOKENIZER_REGEXES = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
    GPT2_REGEX: "gpt-2",
    GPT2_REGEX + "|\\s+": "gpt-2",
}


class ConvertError(ConfigError):
    """The model cannot be written as GGUF; the message says why."""


def convert_to_gguf(model_dir: str | os.PathLike, output: str | os.PathLike, outtype: str = "f16") -> Path:
    """Write ``model_dir`` (config.json, *.safetensors, tokenizer.json) to the GGUF file ``output``."""
    model_dir, output = check_model_dir(model_dir), Path(output)
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    _check_output(model_dir, output)
    config = ModelConfig.from_dir(model_dir)
    arch = gguf_architecture_for(config.architecture)
    if arch is None:
        raise ConvertError(f"{config.architecture} cannot be converted to GGUF")
    if any(window is not None for window in config.sliding_windows):
        logger.warning("sliding-window attention is not written to GGUF; llama.cpp will attend to all tokens")
    writer = gguf.GGUFWriter(str(output), arch)
    _write_hparams(writer, config, model_dir, outtype)
    _write_vocab(writer, model_dir, config)
    for name, data, qtype in _gguf_tensors(model_dir, config, OUTTYPES[outtype][0]):
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return output


def _write_hparams(writer: gguf.GGUFWriter, config: ModelConfig, model_dir: Path, outtype: str) -> None:
    writer.add_name(model_dir.resolve().name)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope_type = (config.rope_scaling or {}).get("rope_type") or "default"
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])
    elif rope_type not in ("default", "llama3"):  # llama3 goes in as the rope_freqs tensor
        raise ConvertError(f"rope scaling {rope_type!r} cannot be written to GGUF")


# -------------------------------------------------------------------- vocabulary


def _write_vocab(writer: gguf.GGUFWriter, model_dir: Path, config: ModelConfig) -> None:
    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ConvertError(f"no tokenizer.json in {model_dir}; GGUF needs the vocabulary")
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"tokenizer model {model.get('type')!r} cannot be written to GGUF (BPE can)")
    tokenizer = Tokenizer.from_dir(model_dir)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens") or []}
    for t in added.values():
        vocab.setdefault(t["content"], t["id"])
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]  # embedding rows beyond the vocabulary (as llama.cpp pads)
    types = [USER_DEFINED] * size
    for token, token_id in vocab.items():
        tokens[token_id] = token
        types[token_id] = NORMAL
    for token in added.values():
        types[token["id"]] = CONTROL if token.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    if _is_sentencepiece_style(spec):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        for token_id, token in enumerate(tokens):
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[token_id] = BYTE
        if tokenizer.special_tokens.get("unk_token") in vocab:
            types[vocab[tokenizer.special_tokens["unk_token"]]] = UNKNOWN
        writer.add_token_scores(_scores_from_merges(tokens, merges))
        writer.add_add_space_prefix(_adds_space_prefix(spec))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_bpe_pre_tokenizer(spec))
        writer.add_token_merges(merges)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    for kind, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token)):
        if token is not None and token in vocab:
            getattr(writer, f"add_{kind}_token_id")(vocab[token])
    if tokenizer.special_tokens.get("unk_token") in vocab:
        writer.add_unk_token_id(vocab[tokenizer.special_tokens["unk_token"]])
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    # What encode adds is the ground truth for the flags, whichever config file decided it.
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    writer.add_add_bos_token(len(full) > len(plain) and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(full) > len(plain) and full[-1] in tokenizer.eos_token_ids)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _is_sentencepiece_style(spec: dict) -> bool:
    """Llama-2-style tokenizer.json: ▁ for spaces (Metaspace or a Replace normalizer) and byte fallback."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return bool(spec["model"].get("byte_fallback")) or "Metaspace" in text or "\u2581" in text


def _adds_space_prefix(spec: dict) -> bool:
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)


def _scores_from_merges(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores that make llama.cpp merge in tokenizer.json's merge order.

    llama.cpp merges the pair whose result scores highest, so a token scores minus the rank of the
    first merge producing it; tokens no merge produces (characters, bytes, specials) score lowest.
    """
    scores = [-1e9] * len(tokens)
    index = {t: i for i, t in enumerate(tokens)}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        token_id = index.get(left + right)
        if token_id is not None and scores[token_id] == -1e9:
            scores[token_id] = -float(rank)
    return scores


def _bpe_pre_tokenizer(spec: dict) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level tokenizer.json (llama-bpe, qwen2 or gpt-2)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return "gpt-2"
        if step.get("type") == "Split":
            pattern = step.get("pattern", {})
            regex = pattern.get("Regex", pattern.get("String"))
            if regex in _HF_PRE_TOKENIZER_REGEXES:
                return _HF_PRE_TOKENIZER_REGEXES[regex]
            raise ConvertError(
                f"pre-tokenizer regex {regex!r} has no llama.cpp equivalent (llama-bpe, qwen2, gpt-2)"
            )
    raise ConvertError(
        "byte-level tokenizer.json without a recognised pre-tokenizer cannot be written to GGUF"
    )


# -------------------------------------------------------------------- tensors


def _gguf_tensors(model_dir: Path, config: ModelConfig, weight_type: QType):
    """Yield (GGUF name, numpy data, GGML type) for every tensor the GGUF file gets."""
    family = model_class(config.architecture)
    for file in find_weight_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                if "rotary_emb.inv_freq" in hf_name:
                    continue
                if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # llama.cpp ties the output to token_embd when output.weight is absent
                mapped = family.hf_tensor_to_gguf(hf_name, f.get_tensor(hf_name).float(), config)
                if mapped is None:
                    raise ConvertError(f"checkpoint tensor {hf_name!r} has no GGUF equivalent")
                name, tensor = mapped
                yield (name, *_encode(tensor, weight_type))
    if (config.rope_scaling or {}).get("rope_type") == "llama3":
        plain = inverse_frequencies(config.head_dim, config.rope_theta, None)
        scaled = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        yield ROPE_FREQS, (plain / scaled).numpy().astype(np.float32), QType.F32


def _encode(tensor: torch.Tensor, weight_type: QType) -> tuple[np.ndarray, QType]:
    """Store 1-D tensors (norms, biases) as F32, matrices as ``weight_type`` (Q8_0/Q4_0 need 32-wide blocks)."""
    if tensor.dim() < 2 or weight_type == QType.F32:
        return tensor.numpy().astype(np.float32), QType.F32
    if weight_type == QType.Q8_0 and tensor.shape[-1] % 32 == 0:
        return quantize_q8_0(tensor.reshape(-1, tensor.shape[-1])).numpy().reshape(
            *tensor.shape[:-1], -1
        ), QType.Q8_0
    if weight_type == QType.Q4_0 and tensor.shape[-1] % 32 == 0:
        return gguf.quants.quantize(tensor.float().numpy(), QType.Q4_0), QType.Q4_0
    if weight_type == QType.BF16:
        raw = tensor.to(torch.bfloat16).view(torch.uint8).numpy()
        return raw, QType.BF16
    return tensor.numpy().astype(np.float16), QType.F16


# -------------------------------------------------------------------- command line


def _check_output(model_dir: Path, output: Path) -> None:
    """The output is a file name in an existing directory, and not one of the checkpoint's own files."""
    if output.is_dir():
        raise ConvertError(f"output {str(output)!r} is a directory; give a file name such as model.gguf")
    if not output.parent.is_dir():
        raise ConvertError(f"the directory of output {str(output)!r} does not exist")
    if output.resolve().parent == model_dir.resolve() and (
        output.suffix in (".safetensors", ".json") or output.name.startswith("tokenizer")
    ):
        raise ConvertError(f"output {str(output)!r} would overwrite a file of the model being converted")


def register(subparsers, to_gqa: Callable[..., object] | None = None) -> argparse.ArgumentParser:
    """Add ``convert`` to the ``effinfer`` command's subparsers.

    ``to_gqa`` (``compress.gqa.convert_to_gqa``, which this floor may not import) adds ``--to-gqa N``.
    """
    parser = subparsers.add_parser(
        "convert", help="convert an HF model directory to another format (GGUF, GQA)"
    )
    parser.add_argument("model", help="HF model directory (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("out", nargs="?", help="output: the GGUF file, or the directory --to-gqa writes")
    parser.add_argument("--to", choices=["gguf"], help="target format (default: gguf)")
    parser.add_argument("--outtype", choices=list(OUTTYPES), default="f16", help="weight type (default: f16)")
    parser.add_argument("-o", "--output", help="output file (default: MODEL_DIR/<name>-<outtype>.gguf)")
    if to_gqa is not None:
        parser.add_argument(
            "--to-gqa",
            type=int,
            metavar="N",
            help="mean-pool the KV heads into N groups (MHA -> GQA, Ainslie et al. 2023); writes OUT",
        )
    parser.set_defaults(func=partial(run, to_gqa=to_gqa))
    return parser


def run(args: argparse.Namespace, to_gqa: Callable[..., object] | None = None) -> int:
    if args.out and args.output:
        raise ConvertError(f"give the output once: {args.out!r} or -o {args.output!r}")
    if getattr(args, "to_gqa", None) is not None:
        if args.to is not None:
            raise ConvertError("--to-gqa and --to are two conversions; run them one after the other")
        if not (args.out or args.output):
            raise ConvertError(
                "--to-gqa needs an output directory: effinfer convert --to-gqa N MODEL_DIR OUT_DIR"
            )
        print(to_gqa(args.model, args.out or args.output, args.to_gqa))
        return 0
    model_dir = Path(args.model)
    output = args.out or args.output
    output = Path(output) if output else model_dir / f"{model_dir.resolve().name}-{args.outtype}.gguf"
    path = convert_to_gguf(model_dir, output, args.outtype)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="effinfer")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"effinfer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
