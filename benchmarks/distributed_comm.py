"""Communication per generated token of tensor, pipeline and data parallelism, from the model shape.

The formulas (docs/distributed.md), for one token at hidden size H, vocabulary V, L decoder layers,
b bytes per activation and t tensor-parallel ranks or m pipeline stages:

- Tensor parallel: each decoder layer ends its attention (row-parallel o_proj) and its MLP
  (row-parallel down_proj) with an all-reduce of H values; the vocabulary-parallel embedding adds
  one more. Payload per token: (2L + 1) * H * b. A ring all-reduce makes every rank send
  2 (t - 1) / t of the payload. The vocabulary-parallel head then all-gathers the logits: each
  rank receives the other ranks' (t - 1) / t * V * b_logits bytes.
- Pipeline parallel: each stage boundary passes the token's hidden state on: (m - 1) * H * b, and
  the last stage sends the logits of a sampled token to the driver (rank 0, the first stage):
  V * b_logits.
- Data parallel: replicas share no activations; only a request's token ids travel (router <->
  replica), a few bytes per token whatever the model.
Not counted: the driver's per-step broadcast of the step's inputs (token ids, positions, slots,
block tables: tens of bytes per sequence) and, for pipelines, micro-batch bubbles (a time cost).

It also prints what the split buys: the weight bytes each rank holds (and reads per decode step)
and the KV heads each rank stores (KV heads are replicated when there are fewer than ranks). Sizes
that do not divide the query heads are refused, as the engine refuses them.

The "measured" column is left for the bytes the tensor- and pipeline-parallel tests count on the
wire; this script only computes. Run:
    python benchmarks/distributed_comm.py [--tp 2 3 4] [--pp 2 4] [--model DIR_OR_GGUF ...]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Shapes of the models the docs quote (their config.json / GGUF metadata).
KNOWN_SHAPES = {
    # name: (hidden, intermediate, layers, query heads, KV heads, head dim, vocabulary, tied embeddings)
    "SmolLM2-135M": (576, 1536, 30, 9, 3, 64, 49152, True),
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 64, 151936, True),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 128, 151936, True),
}


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def layer_params(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2)


def tp_refusal(shape: Shape, ranks: int) -> str | None:
    """Why ``ranks`` tensor-parallel ranks cannot split ``shape``, or None."""
    if shape.heads % ranks:
        return f"{shape.heads} query heads do not split over {ranks} ranks"
    if shape.kv_heads % ranks and ranks % shape.kv_heads:
        return f"{shape.kv_heads} KV heads neither split over nor replicate onto {ranks} ranks"
    return None


def tp_row(shape: Shape, ranks: int, act_bytes: int, logit_bytes: int) -> dict:
    payload = (2 * shape.layers + 1) * shape.hidden * act_bytes
    kv_per_rank = max(shape.kv_heads // ranks, 1)
    replicated_kv = kv_per_rank * ranks - shape.kv_heads  # extra KV heads the ranks hold in all
    # Each rank: its share of every split matrix, plus the copies of replicated k/v projections.
    weights = shape.params / ranks + shape.layers * 2 * replicated_kv * shape.head_dim * shape.hidden / ranks
    return {
        "split": f"TP={ranks}",
        "refused": tp_refusal(shape, ranks),
        "collectives": f"{2 * shape.layers + 1} all-reduce + 1 all-gather",
        "payload": payload,
        "sent_per_rank": 2 * (ranks - 1) / ranks * payload,
        "logits": (ranks - 1) / ranks * shape.vocab * logit_bytes,
        "weights_per_rank": weights * act_bytes,
        "kv_heads_per_rank": kv_per_rank,
    }


def pp_row(shape: Shape, stages: int, act_bytes: int, logit_bytes: int) -> dict:
    refused = None if shape.layers >= stages else f"{shape.layers} layers cannot fill {stages} stages"
    boundary = (stages - 1) * shape.hidden * act_bytes
    largest_stage = -(-shape.layers // stages) * shape.layer_params + shape.vocab * shape.hidden
    return {
        "split": f"PP={stages}",
        "refused": refused,
        "collectives": f"{stages - 1} hidden send + logits to rank 0",
        "payload": boundary,
        "sent_per_rank": shape.hidden * act_bytes,  # each stage but the last sends once
        "logits": shape.vocab * logit_bytes,
        "weights_per_rank": largest_stage * act_bytes,
        "kv_heads_per_rank": shape.kv_heads,
    }


def dp_row(shape: Shape, replicas: int, act_bytes: int) -> dict:
    return {
        "split": f"DP={replicas}",
        "refused": None,
        "collectives": "none (token ids only)",
        "payload": 0,
        "sent_per_rank": 0,
        "logits": 0,
        "weights_per_rank": shape.params * act_bytes,
        "kv_heads_per_rank": shape.kv_heads,
    }


def shape_of_model(path: str) -> Shape:
    from effinfer.loading.checkpoint import open_checkpoint

    c = open_checkpoint(path).model_config
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return Shape(
        name, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
        c.vocab_size, c.tie_word_embeddings,
    )  # fmt: skip


def _size(value: float) -> str:
    if value == 0:
        return "0"
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:,.0f} B"


def table(shape: Shape, rows: list[dict]) -> str:
    lines = [
        f"### {shape.name}: H={shape.hidden}, L={shape.layers}, V={shape.vocab}, heads {shape.heads} / KV {shape.kv_heads}, "
        f"{shape.params / 1e6:,.0f} M parameters",
        "",
        "| split | per token | activation bytes | sent per rank (ring) | logits moved | weights per rank | KV heads per rank | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in rows:
        if row["refused"]:
            lines.append(f"| {row['split']} | refused: {row['refused']} | | | | | | |")
            continue
        lines.append(
            f"| {row['split']} | {row['collectives']} | {_size(row['payload'])} | {_size(row['sent_per_rank'])} "
            f"| {_size(row['logits'])} | {_size(row['weights_per_rank'])} | {row['kv_heads_per_rank']} | — |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 3, 4], help="tensor-parallel sizes")
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4], help="pipeline-parallel sizes")
    parser.add_argument("--dp", type=int, nargs="+", default=[2], help="data-parallel sizes")
    parser.add_argument("--act-bytes", type=int, default=2, help="bytes per activation (bf16: 2)")
    parser.add_argument("--logit-bytes", type=int, default=4, help="bytes per gathered logit (float32: 4)")
    parser.add_argument("--model", nargs="*", default=[], help="HF directories or GGUF files to add")
    args = parser.parse_args()
    shapes = [Shape(name, *dims) for name, dims in KNOWN_SHAPES.items()]
    shapes += [shape_of_model(path) for path in args.model]
    print(f"Per generated token; activations {args.act_bytes} B, logits {args.logit_bytes} B.\n")
    for shape in shapes:
        rows = [tp_row(shape, t, args.act_bytes, args.logit_bytes) for t in args.tp]
        rows += [pp_row(shape, m, args.act_bytes, args.logit_bytes) for m in args.pp]
        rows += [dp_row(shape, r, args.act_bytes) for r in args.dp]
        print(table(shape, rows) + "\n")


if __name__ == "__main__":
    main()
