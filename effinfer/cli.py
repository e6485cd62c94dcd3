"""The ``effinfer`` command line: generate, chat, serve, eval, quantize, convert, bench, train, distill.

Every command registers itself the same way: its module has ``register(subparsers)``, which adds its
parser and sets ``func``; ``main`` builds the parser from ``COMMANDS`` and calls ``args.func(args)``.
Commands that load a model take the engine flags of ``EngineArgs`` (``--dtype``, ``--kv-cache-memory``,
...) and, where they sample, flags that mirror ``SamplingParams``. Errors the user can fix (a wrong
path, a bad value, a prompt that is too long) print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from functools import partial
from pathlib import Path

from effinfer import (
    LLM,
    ConfigError,
    InvalidSamplingParams,
    PromptError,
    SamplingParams,
    bench,
    convert,
    train,
)
from effinfer.bench import BenchError, BenchServeError
from effinfer.compress import lowrank_cli
from effinfer.compress.gqa import convert_to_gqa
from effinfer.compress.prune import pipeline as prune
from effinfer.compress.quant import pipeline as quantize
from effinfer.config import EngineArgs
from effinfer.eval import perplexity
from effinfer.report import cli as report
from effinfer.serve import cli as serve
from effinfer.tokenizer import FALLBACK_CHAT_TEMPLATE, TokenizerError
from effinfer.train import distill

# What a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ConfigError,
    PromptError,
    InvalidSamplingParams,
    TokenizerError,
    OSError,  # a missing, unreadable or unwritable path
    BenchError,
    BenchServeError,
)


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


def _load(args: argparse.Namespace) -> LLM:
    return LLM(args.model, **EngineArgs.cli_kwargs(args))


def sampling_params(args: argparse.Namespace) -> SamplingParams:
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
    params = sampling_params(args)
    llm = _load(args)
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
    params = sampling_params(args)
    llm = _load(args)
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
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"data file {args.data!r} does not exist")
    llm = _load(args)
    result = perplexity(llm, path=args.data, ctx=args.ctx, stride=args.stride, max_windows=args.max_windows)
    print(result)
    return 0


# ---- registration ------------------------------------------------------------------------------


def register_generate(subparsers) -> None:
    generate = subparsers.add_parser("generate", help="complete a prompt, streaming to the terminal")
    generate.add_argument("prompt")
    EngineArgs.add_cli_args(generate)
    add_sampling_arguments(generate)
    generate.set_defaults(func=cmd_generate)


def register_chat(subparsers) -> None:
    chat = subparsers.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--system", help="system prompt")
    EngineArgs.add_cli_args(chat)
    add_sampling_arguments(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)


def register_eval(subparsers) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate a model")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    ppl = eval_sub.add_parser("ppl", help="sliding-window perplexity of a text file")
    ppl.add_argument("--data", required=True, help="UTF-8 text file")
    ppl.add_argument("--ctx", type=int, help="window length in tokens (default: the model's context)")
    ppl.add_argument("--stride", type=int, help="tokens the window advances (default: ctx)")
    ppl.add_argument("--max-windows", type=int, help="score only the first N windows")
    EngineArgs.add_cli_args(ppl)
    ppl.set_defaults(func=cmd_eval_ppl)


# Each adds its subcommand to the ``effinfer`` parser and sets ``func`` on it; order is --help's order.
COMMANDS = (
    register_generate,
    register_chat,
    serve.register,
    register_eval,
    quantize.register,
    prune.register,
    lowrank_cli.register,
    partial(convert.register, to_gqa=convert_to_gqa),
    bench.register,
    train.register,
    distill.register,
    report.register,
)


class _OneLineErrors(argparse.ArgumentParser):
    """A parser whose usage errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="effinfer", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["effinfer", *argv])  # recorded next to benchmark results
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"effinfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
