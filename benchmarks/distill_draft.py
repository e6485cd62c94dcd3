"""A speculative-decoding draft distilled from Qwen2.5-Coder-0.5B-Instruct (docs/distillation.md).

Four steps, each a subcommand, around two ``effinfer distill`` runs (the commands are in the docs):

    python benchmarks/distill_draft.py generate --teacher Q05.gguf --out runs/selfgen.jsonl
    python benchmarks/distill_draft.py data --selfgen runs/selfgen.jsonl --out runs/data
    effinfer distill --teacher Q05.gguf --data runs/data --out runs/kd --teacher-topk 64 ...  (and --kd-weight 0)
    python benchmarks/distill_draft.py accept --target Q05.gguf --drafts runs/kd runs/base --json out.json
    python benchmarks/distill_draft.py speed --target Q05.gguf --draft runs/kd          (timings: quiet machine)

``generate`` has the teacher answer the training tasks greedily (self-distillation data: the text the
target itself will write); ``data`` writes each answer, after its task, as a file, plus Python standard
library modules as more code; ``accept`` measures, with a fixed number of drafts per step, how many of
each draft's proposals the target accepts on held-out tasks that no training prompt contains; ``speed``
times batch-1 decoding of the held-out tasks with and without the draft.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

from effinfer import LLM, SamplingParams

KV_CACHE_BYTES = 2**29  # plenty for these short chats; the default would take half the free memory

TRAIN_TASKS = [
    "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation.",
    "Write a Python function that returns the n-th Fibonacci number using memoization.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python function that flattens an arbitrarily nested list.",
    "Write a Python function that counts the words in a text file and returns the 10 most common.",
    "Write a Python class for a stack with push, pop, peek and is_empty methods.",
    "Write a Python function that performs binary search on a sorted list.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "Write a Python function that converts a Roman numeral to an integer.",
    "Write a Python function that validates an email address with a regular expression.",
    "Write a Python function that reads a CSV file and returns a list of dictionaries.",
    "Write a Python function that computes the greatest common divisor of two integers.",
    "Write a Python function that transposes a matrix given as a list of lists.",
    "Write a Python function that returns all prime numbers below n with the sieve of Eratosthenes.",
    "Write a Python function that groups a list of words into anagrams.",
    "Write a Python class for a bank account with deposit, withdraw and balance methods.",
    "Write a Python function that implements quicksort.",
    "Write a Python function that checks whether parentheses in a string are balanced.",
    "Write a Python decorator that measures and prints the run time of a function.",
    "Write a Python function that downloads a web page with urllib and returns its title.",
    "Write a Python function that finds the longest common prefix of a list of strings.",
    "Write a Python generator that yields the lines of a file that contain a given word.",
    "Write a Python function that converts a temperature from Celsius to Fahrenheit and back.",
    "Write a Python class for a linked list with append, remove and __iter__.",
    "Write a Python function that rotates a list by k positions.",
    "Write a Python function that returns the factorial of n, iteratively and recursively.",
    "Write a Python function that parses a query string into a dictionary.",
    "Write a Python function that finds two numbers in a list that add up to a target.",
    "Write a Python script that renames every .txt file in a folder to lower case.",
    "Write a Python function that computes the moving average of a list with window k.",
    "Write a Python dataclass for a 2D point with a method for the distance to another point.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that implements a simple LRU cache with a dictionary and a list.",
    "Write a Python function that returns the depth of a binary tree.",
    "Write a Python function that serializes a dictionary to JSON and writes it to a file.",
    "Write a Python function that chunks a list into pieces of size n.",
    "Write a Python function that checks whether a number is an Armstrong number.",
    "Write a Python context manager that changes the working directory temporarily.",
    "Write a Python function that computes the Levenshtein distance between two strings.",
    "Write a Python function that returns the intersection of two lists.",
    "Write a JavaScript function that debounces another function.",
    "Write a JavaScript function that deep-clones an object.",
    "Write a JavaScript function that fetches JSON from a URL with async/await and handles errors.",
    "Write a SQL query that returns the five customers with the highest total order amount.",
    "Write a SQL query that counts the employees in each department.",
    "Write a bash script that backs up a directory into a dated tar.gz archive.",
    "Write a bash one-liner that finds the ten largest files under the current directory.",
    "Write a C function that reverses a string in place.",
    "Write a Java method that checks whether a number is prime.",
    "Write a Go function that sums the elements of a slice of integers.",
    "Write a Rust function that returns the largest element of a vector.",
    "Explain what a Python list comprehension is, with an example.",
    "Explain the difference between a tuple and a list in Python.",
    "Explain what the `with` statement does in Python, with an example.",
    "Write a Python function that sorts a list of dictionaries by a given key.",
    "Write a Python function that returns the most frequent element of a list.",
    "Write a Python function that checks whether two strings are rotations of each other.",
    "Write a Python function that converts a string from snake_case to camelCase.",
    "Write a Python function that computes the power set of a list.",
    "Write a Python function that finds the maximum subarray sum (Kadane's algorithm).",
    "Write a Python unittest test case for a function add(a, b).",
    "Write a Python function that pretty-prints a nested dictionary with indentation.",
    "Write a Python function that returns the number of days between two dates.",
    "Write a Python function that encrypts a string with a Caesar cipher.",
]

HELDOUT_TASKS = [
    "Write a Python function that checks whether a year is a leap year.",
    "Write a Python function that returns the second largest number in a list.",
    "Write a Python function that reverses the words in a sentence.",
    "Write a Python function that computes the sum of the digits of an integer.",
    "Write a Python class for a queue with enqueue, dequeue and size methods.",
    "Write a Python function that converts a binary string to a decimal integer.",
    "Write a Python function that counts how often each character appears in a string.",
    "Write a Python function that returns the median of a list of numbers.",
    "Write a Python function that merges two dictionaries, summing the values of shared keys.",
    "Write a Python function that checks whether a matrix is symmetric.",
    "Write a Python function that capitalizes the first letter of every word in a string.",
    "Write a Python function that returns the indices of all occurrences of a value in a list.",
    "Write a JavaScript function that returns the unique values of an array.",
    "Write a SQL query that lists the products that were never ordered.",
    "Write a bash script that counts the lines of every .py file in a directory.",
    "Explain the difference between `==` and `is` in Python, with an example.",
]


def chat_prompt(llm: LLM, task: str) -> list[int]:
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": task}], add_generation_prompt=True)
    return llm.tokenizer.encode(text, add_special_tokens=False)


def generate(args: argparse.Namespace) -> None:
    llm = LLM(args.teacher, num_threads=args.threads, max_num_seqs=args.batch, kv_cache_memory=KV_CACHE_BYTES,
              show_progress=False)  # fmt: skip
    prompts = [chat_prompt(llm, task) for task in TRAIN_TASKS]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    with open(args.out, "w", encoding="utf-8") as f:
        for task, out in zip(TRAIN_TASKS, outputs):
            answer = out.outputs[0]
            f.write(json.dumps({"task": task, "answer": answer.text, "tokens": len(answer.token_ids)}) + "\n")
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{len(outputs)} answers, {tokens} tokens in {seconds:.0f} s -> {args.out}", file=sys.stderr)


def write_data(args: argparse.Namespace) -> None:
    """One file per self-generated answer (task, blank line, answer) and the chosen standard-library modules."""
    out = Path(args.out)
    (out / "selfgen").mkdir(parents=True, exist_ok=True)
    (out / "code").mkdir(parents=True, exist_ok=True)
    lines = Path(args.selfgen).read_text(encoding="utf-8").splitlines() if args.selfgen else []
    answers = [json.loads(line) for line in lines]
    for i, item in enumerate(answers):
        (out / "selfgen" / f"answer{i:03d}.md").write_text(
            f"{item['task']}\n\n{item['answer']}\n", encoding="utf-8"
        )
    stdlib = Path(args.code_dir or sysconfig.get_paths()["stdlib"])
    budget, used, files = args.code_bytes, 0, 0
    for path in sorted(stdlib.glob("*.py")):  # top-level modules only: no tests, no site-packages
        size = path.stat().st_size
        if size > args.max_file_bytes or used + size > budget:
            continue
        (out / "code" / path.name).write_bytes(path.read_bytes())
        used, files = used + size, files + 1
    print(
        f"{len(answers)} answers and {files} modules ({used:,} bytes) of {stdlib} -> {out}", file=sys.stderr
    )


def accept(args: argparse.Namespace) -> None:
    results = {}
    for draft in args.drafts:
        llm = LLM(args.target, speculative_model=draft, num_speculative_tokens=args.k, speculative_adaptive=False,
                  num_threads=args.threads, max_num_seqs=args.batch, kv_cache_memory=KV_CACHE_BYTES,
                  show_progress=False)  # fmt: skip
        prompts = [chat_prompt(llm, task) for task in HELDOUT_TASKS]
        start = time.perf_counter()
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
        stats = llm.engine.stats()
        per_task = [o.speculation.acceptance_rate for o in outputs]
        results[str(draft)] = {
            "num_speculative_tokens": args.k,
            "prompts": len(prompts),
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "draft_tokens": stats.num_draft_tokens,
            "accepted_tokens": stats.num_accepted_tokens,
            "verify_steps": stats.num_verify_steps,
            "acceptance_rate": stats.num_accepted_tokens / max(1, stats.num_draft_tokens),
            "mean_accepted_length": 1 + stats.num_accepted_tokens / max(1, stats.num_verify_steps),
            "per_task_acceptance": per_task,
            "seconds_loaded_machine": time.perf_counter() - start,
        }
        print(json.dumps({draft: {k: v for k, v in results[str(draft)].items() if k != "per_task_acceptance"}}),
              file=sys.stderr)  # fmt: skip
        del llm
    text = json.dumps({"target": args.target, "tasks": HELDOUT_TASKS, "drafts": results}, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def speed(args: argparse.Namespace) -> None:
    """Batch-1 greedy decode of every held-out task, plain then with the draft: decode tokens/s and the ratio."""
    from spec_decode import timed_generate  # benchmarks/ runs as a script: its directory is on sys.path

    common = dict(
        num_threads=args.threads, max_num_seqs=1, kv_cache_memory=KV_CACHE_BYTES, show_progress=False
    )
    runs = {"plain": {}, "draft": {"speculative_model": args.draft, "num_speculative_tokens": args.k,
                                    "speculative_adaptive": not args.fixed}}  # fmt: skip
    result: dict = {"target": args.target, "draft": args.draft, "k": args.k, "adaptive": not args.fixed}
    tokens: dict = {}
    for name, extra in runs.items():
        llm = LLM(args.target, **common, **extra)
        prompts = [chat_prompt(llm, task) for task in HELDOUT_TASKS[: args.tasks]]
        timed_generate(llm, prompts[0][:32], 8)  # warm-up: kernels built, caches touched
        total_tokens, total_seconds, tokens[name] = 0, 0.0, []
        for prompt in prompts:
            out, seconds = timed_generate(llm, prompt, args.max_tokens)
            total_tokens, total_seconds = total_tokens + len(out) - 1, total_seconds + seconds
            tokens[name].append(out)
        result[f"{name}_decode_tokens_per_s"] = total_tokens / total_seconds
        if name == "draft":
            stats = llm.engine.stats()
            result["acceptance_rate"] = stats.num_accepted_tokens / max(1, stats.num_draft_tokens)
        del llm
    result["speedup"] = result["draft_decode_tokens_per_s"] / result["plain_decode_tokens_per_s"]
    result["identical_tokens"] = tokens["plain"] == tokens["draft"]
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="the teacher's greedy answers to the training tasks")
    g.add_argument("--teacher", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--max-tokens", type=int, default=320)
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--threads", type=int)
    d = sub.add_parser("data", help="write the training files")
    d.add_argument("--selfgen", help="the teacher's answers from `generate` (default: none)")
    d.add_argument("--out", required=True)
    d.add_argument("--code-dir", help="default: this Python's standard library")
    d.add_argument("--code-bytes", type=int, default=600_000)
    d.add_argument("--max-file-bytes", type=int, default=40_000)
    a = sub.add_parser("accept", help="acceptance rate of each draft on the held-out tasks")
    a.add_argument("--target", required=True)
    a.add_argument("--drafts", nargs="+", required=True)
    a.add_argument("--k", type=int, default=4)
    a.add_argument("--max-tokens", type=int, default=192)
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--threads", type=int)
    a.add_argument("--json")
    s = sub.add_parser("speed", help="batch-1 decode speed with and without the draft (quiet machine)")
    s.add_argument("--target", required=True)
    s.add_argument("--draft", required=True)
    s.add_argument("--k", type=int, default=4)
    s.add_argument("--fixed", action="store_true", help="draft k every step (default: adaptive k)")
    s.add_argument("--tasks", type=int, default=len(HELDOUT_TASKS))
    s.add_argument("--max-tokens", type=int, default=192)
    s.add_argument("--threads", type=int)
    args = parser.parse_args()
    {"generate": generate, "data": write_data, "accept": accept, "speed": speed}[args.command](args)


if __name__ == "__main__":
    main()
