"""The ``effinfer`` command line: generate, chat, serve, eval, quantize, convert, bench, train.

Every command takes the engine settings (``--dtype``, ``--kv-cache-memory``, ...) and, where it
samples, flags that mirror ``SamplingParams``. Errors the user can fix (a wrong path, a bad
value, a prompt that is too long) print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# A plain, documented template for models that ship none: one "role: content" line per message.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model", help="HF model directory or .gguf file (default: the built-in default model)"
    )
    group.add_argument("--dtype", default="auto", help="auto (from config.json), float32, bfloat16, float16")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    group.add_argument("--kv-cache-memory", type=_bytes, help="KV-cache budget in bytes (e.g. 512M, 2G)")
    group.add_argument(
        "--kv-cache-memory-fraction", type=float, default=0.5, help="share of free memory for KV"
    )
    group.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in a batch")
    group.add_argument("--max-model-len", type=int, help="context length limit (default: the model's)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    group.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    group.add_argument("--threads", type=int, help="CPU threads (default: the cores available)")
    group.add_argument(
        "--quantization", choices=("int8", "int4", "fp8", "nf4", "llm_int8"),
        help="quantize a float checkpoint's weights while loading (RTN; see `effinfer quantize` for GPTQ/AWQ)",
    )  # fmt: skip
    group.add_argument(
        "--kv-cache-dtype", default="auto", choices=("auto", "int8"),
        help="KV-cache storage: auto (the model dtype) or int8 (per token and head scales)",
    )  # fmt: skip
    group.add_argument("--max-num-batched-tokens", type=int, help="token budget of one step")
    group.add_argument(
        "--enable-chunked-prefill", action="store_true",
        help="cut long prompts into chunks that run alongside the decodes (budget: --max-num-batched-tokens)",
    )  # fmt: skip
    group.add_argument("--speculative-model", help='draft model (HF directory or .gguf) or "ngram"')
    group.add_argument("--num-speculative-tokens", type=int, help="draft tokens per step (default 4)")
    group.add_argument("--ngram-prompt-lookup-max", type=int, help="longest n-gram to match (default 4)")
    group.add_argument("--ngram-prompt-lookup-min", type=int, help="shortest n-gram to match (default 1)")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=-1)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--seed", type=int)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--stop-token-ids", type=int, nargs="+", default=[])
    group.add_argument("--max-tokens", type=int, default=max_tokens)
    group.add_argument("--min-tokens", type=int, default=0)
    group.add_argument("--ignore-eos", action="store_true")
    group.add_argument("--n", type=int, default=1, help="completions per prompt")
    group.add_argument("--logprobs", type=int, help="print the top-N log-probabilities of each token")


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M or 2G)") from None


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype,
        device=args.device,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        num_threads=args.threads,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.enable_chunked_prefill,
        speculative_model=args.speculative_model,
        num_speculative_tokens=args.num_speculative_tokens,
        ngram_prompt_lookup_max=args.ngram_prompt_lookup_max,
        ngram_prompt_lookup_min=args.ngram_prompt_lookup_min,
    )


def sampling_params(args: argparse.Namespace):
    from effinfer import SamplingParams

    return SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        stop_token_ids=args.stop_token_ids,
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from effinfer import LLM

    params = sampling_params(args)
    llm = LLM(args.model, **engine_kwargs(args))
    prompt = args.prompt
    if args.n == 1:
        # Stream the one completion as it is produced.
        sys.stdout.write(prompt)
        final = None
        for update in llm.stream(prompt, params):
            sys.stdout.write(update.outputs[0].delta_text)
            sys.stdout.flush()
            final = update
        sys.stdout.write("\n")
        outputs = final.outputs
    else:
        outputs = llm.generate([prompt], params)[0].outputs
        for completion in outputs:
            print(f"--- completion {completion.index} ({completion.finish_reason}) ---")
            print(prompt + completion.text)
    if args.logprobs is not None:
        for completion in outputs:
            for token_id, alternatives in zip(completion.token_ids, completion.logprobs or []):
                shown = ", ".join(f"{lp.decoded_token!r}: {lp.logprob:.3f}" for lp in alternatives.values())
                print(f"{token_id}: {shown}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from effinfer import LLM

    params = sampling_params(args)
    llm = LLM(args.model, **engine_kwargs(args))
    tokenizer = llm.get_tokenizer()
    if tokenizer.chat_template is None:
        print(
            "note: the model has no chat template; using the plain 'role: content' fallback", file=sys.stderr
        )
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("effinfer chat — /reset starts over, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        reply = ""
        for update in llm.stream(prompt, params):
            sys.stdout.write(update.outputs[0].delta_text)
            sys.stdout.flush()
            reply = update.outputs[0].text
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from effinfer import LLM
    from effinfer.eval import perplexity

    if not Path(args.data).is_file():
        raise FileNotFoundError(f"data file {args.data!r} does not exist")
    llm = LLM(args.model, **engine_kwargs(args))
    result = perplexity(llm, path=args.data, ctx=args.ctx, stride=args.stride, max_windows=args.max_windows)
    print(result)
    return 0


def cmd_bench(argv: list[str]) -> int:
    from effinfer.bench import main as bench_main

    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effinfer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)

    generate = sub.add_parser("generate", help="complete a prompt, streaming to the terminal")
    generate.add_argument("prompt")
    add_engine_arguments(generate)
    add_sampling_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--system", help="system prompt")
    add_engine_arguments(chat)
    add_sampling_arguments(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)

    evaluate = sub.add_parser("eval", help="evaluate a model")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    ppl = eval_sub.add_parser("ppl", help="sliding-window perplexity of a text file")
    ppl.add_argument("--data", required=True, help="UTF-8 text file")
    ppl.add_argument("--ctx", type=int, help="window length in tokens (default: the model's context)")
    ppl.add_argument("--stride", type=int, help="tokens the window advances (default: ctx)")
    ppl.add_argument("--max-windows", type=int, help="score only the first N windows")
    add_engine_arguments(ppl)
    ppl.set_defaults(func=cmd_eval_ppl)

    from effinfer import convert
    from effinfer.compress.quant import pipeline as quantize
    from effinfer.serve.cli import register_serve_commands

    convert.register(sub)
    quantize.register(sub)
    register_serve_commands(sub)

    bench_help = "decode speed and throughput, optionally against HF transformers"
    sub.add_parser("bench", help=bench_help, add_help=False)
    sub.add_parser("train", help="train a small Llama model (also under torchrun)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "quant"]:
        from effinfer.bench.quant import main as bench_quant_main

        return _guarded(bench_quant_main, argv[2:])
    if argv[:2] == ["bench", "serve"]:
        from effinfer.serve.bench_serve import main as bench_serve_main

        return _guarded(bench_serve_main, argv[2:])
    if argv and argv[0] == "bench":
        return _guarded(cmd_bench, argv[1:])
    if argv and argv[0] == "train":
        from effinfer.train import main as train_main

        return _guarded(train_main, argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    return _guarded(args.func, args)


def _guarded(func, arg) -> int:
    from effinfer import ConfigError, InvalidSamplingParams, PromptError
    from effinfer.tokenizer import TokenizerError

    try:
        return func(arg)
    except (ConfigError, PromptError, InvalidSamplingParams, TokenizerError, FileNotFoundError) as e:
        print(f"effinfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
