"""Where speculation stops paying: decode throughput at batch 1, 4 and 16, plain against fixed and
adaptive draft lengths, with prompt lookup on a code-editing workload.

Each request asks the model to rename the loop variable of the same code to a different name, so
the answers repeat the prompt (prompt lookup's case) but differ from one another. The code comes
first, so prefix caching shares it and prefill stays short. The three engines (plain, fixed k,
adaptive k) run the same batch **step by step in turn**, so a load spike from another process on
a shared machine lands on all three alike. A mode's decode time is the sum of its own step times
from the step where its last request got its first token to the end; its throughput counts every
generated token after each request's first. Each batch size runs ``--repeats`` rounds; the table
shows the median ratio to plain decoding of the same round, with the lowest and highest.
Prints one JSON line per (round, batch, mode), then a markdown table; ``--plot`` draws the ratios.
Run: ``python benchmarks/spec_crossover.py --model SMOLLM2.gguf --batches 1 4 16 --plot out.png``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from spec_decode import CODE  # benchmarks/ runs as a script: its directory is on sys.path

from effinfer import LLM, SamplingParams

NAMES = ["value", "item", "number", "element", "entry", "sample", "reading", "point",
         "datum", "figure", "amount", "score", "measure", "term", "record", "unit"]  # fmt: skip
MODES = {"plain": {}, "fixed": {"speculative_adaptive": False}, "adaptive": {"speculative_adaptive": True}}


def prompts(llm: LLM, batch: int) -> list[list[int]]:
    requests = [
        f"{CODE}\nRename the loop variable `x` to `{NAMES[i % len(NAMES)]}` in this code. "
        "Reply with the whole code only."
        for i in range(batch)
    ]
    return [
        llm.tokenizer.encode(
            llm.tokenizer.apply_chat_template([{"role": "user", "content": r}], add_generation_prompt=True),
            add_special_tokens=False,
        )
        for r in requests
    ]


class DecodeRun:
    """One engine working through one batch; ``step`` runs one engine step and times it."""

    def __init__(self, llm: LLM, batch: int, max_tokens: int) -> None:
        self.engine = llm.engine
        self.stats_before = self.engine.stats()
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        self.ids = [self.engine.add_request(p, params) for p in prompts(llm, batch)]
        self.tokens: dict[str, list[int]] = {i: [] for i in self.ids}
        self.decoding = False  # every request has its first token
        self.decode_seconds = 0.0

    def step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        if self.decoding:
            self.decode_seconds += time.perf_counter() - start
        for out in outputs:
            self.tokens[out.request_id] = list(out.outputs[0].token_ids)
        self.decoding = self.decoding or all(self.tokens[i] for i in self.ids)

    @property
    def done(self) -> bool:
        return not self.engine.has_unfinished_requests()

    def result(self) -> dict:
        after = self.engine.stats()
        drafts = after.num_draft_tokens - self.stats_before.num_draft_tokens
        accepted = after.num_accepted_tokens - self.stats_before.num_accepted_tokens
        outputs = [self.tokens[i] for i in self.ids]
        return {
            "decode_tokens_per_s": sum(len(t) - 1 for t in outputs) / self.decode_seconds,
            "draft_tokens": drafts,
            "acceptance_rate": accepted / drafts if drafts else None,
            "outputs": outputs,
        }


def interleaved(llms: dict[str, LLM], batch: int, max_tokens: int) -> dict[str, dict]:
    runs = {mode: DecodeRun(llm, batch, max_tokens) for mode, llm in llms.items()}
    while not all(run.done for run in runs.values()):
        for run in runs.values():
            if not run.done:
                run.step()
    return {mode: run.result() for mode, run in runs.items()}


def plot(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    batches = [row["batch"] for row in table]
    for mode, marker in (("fixed", "o"), ("adaptive", "s")):
        medians = [row[mode]["median"] for row in table]
        low = [m - row[mode]["min"] for m, row in zip(medians, table)]
        high = [row[mode]["max"] - m for m, row in zip(medians, table)]
        label = "fixed k" if mode == "fixed" else "adaptive k"
        ax.errorbar(batches, medians, yerr=[low, high], marker=marker, capsize=3, label=label)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="plain decoding")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode speed / plain (median, min-max)")
    ax.set_title("Prompt-lookup speculation vs batch size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per batch size")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--kv-cache-gib", type=float, default=1.0, help="KV cache of each of the three engines"
    )
    parser.add_argument("--plot", help="write a PNG of the ratios to this path (needs matplotlib)")
    args = parser.parse_args()

    spec = {"speculative_model": "ngram", "num_speculative_tokens": args.num_speculative_tokens}
    llms = {
        mode: LLM(
            args.model,
            dtype=args.dtype,
            num_threads=args.threads,
            kv_cache_memory=int(args.kv_cache_gib * 2**30),
            max_num_seqs=max(args.batches),
            show_progress=False,
            **(spec | extra if extra else {}),
        )
        for mode, extra in MODES.items()
    }
    interleaved(llms, 1, 8)  # warm-up: kernels built, code prefix cached
    table = []
    for batch in args.batches:
        ratios: dict[str, list[float]] = {"fixed": [], "adaptive": []}
        drafts: dict[str, list[int]] = {"fixed": [], "adaptive": []}
        identical = True
        plain_speeds = []
        for round_index in range(args.repeats):
            results = interleaved(llms, batch, args.max_tokens)
            plain = results["plain"]
            plain_speeds.append(plain["decode_tokens_per_s"])
            for mode, row in results.items():
                line = {"round": round_index, "batch": batch, "mode": mode}
                print(json.dumps(line | {k: v for k, v in row.items() if k != "outputs"}), flush=True)
                if mode != "plain":
                    ratios[mode].append(row["decode_tokens_per_s"] / plain["decode_tokens_per_s"])
                    drafts[mode].append(row["draft_tokens"])
                    identical &= row["outputs"] == plain["outputs"]
        summary = {"batch": batch, "plain": statistics.median(plain_speeds), "identical": identical}
        for mode, values in ratios.items():
            summary[mode] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                             "drafts": statistics.median(drafts[mode])}  # fmt: skip
        table.append(summary)

    print("\n| batch | plain tok/s (median) | fixed k / plain | adaptive k / plain | drafts per round fixed / adaptive | greedy identical |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---|")
    for row in table:
        cells = [f"**{row[m]['median']:.2f}×** ({row[m]['min']:.2f}-{row[m]['max']:.2f})" for m in ("fixed", "adaptive")]  # fmt: skip
        drafts = f"{row['fixed']['drafts']:.0f} / {row['adaptive']['drafts']:.0f}"
        print(
            f"| {row['batch']} | {row['plain']:.1f} | {cells[0]} | {cells[1]} | {drafts} | {row['identical']} |"
        )
    if args.plot:
        plot(table, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
