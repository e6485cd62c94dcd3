"""Tokenizer: loads a Hugging Face tokenizer directory (tokenizer.json plus its config files), encodes and
decodes text, renders chat templates in a sandboxed jinja2 the way transformers does, and turns a stream of
generated token ids into text deltas that never split a UTF-8 character (``IncrementalDetokenizer``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _BackendTokenizer


class TokenizerError(ValueError):
    """A tokenizer directory, chat template or chat that cannot be used; the message says why."""


# Named special tokens of tokenizer_config.json; the chat template sees each one that is set as a string.
_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# A plain, documented template for models that ship none: one "role: content" line per message.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Names a message's reasoning may be passed under; templates read `reasoning_content` (gpt-oss: `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A Hugging Face tokenizer with the model's special-token ids and chat template.

    Build it with ``Tokenizer.from_dir(path)``.
    """

    def __init__(
        self,
        backend: _BackendTokenizer,
        tokenizer_config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        model_config: dict[str, Any] | None = None,
        chat_templates: dict[str, str] | None = None,
    ) -> None:
        tok_cfg = tokenizer_config or {}
        gen_cfg = generation_config or {}
        model_cfg = model_config or {}
        # Multimodal configs keep the language model's ids under text_config.
        text_cfg = model_cfg.get("text_config") if isinstance(model_cfg.get("text_config"), dict) else {}

        self._backend = backend
        # tokenizer.json may carry training-time truncation/padding; transformers turns both off for encode.
        backend.no_truncation()
        backend.no_padding()

        self.special_tokens: dict[str, str] = {
            name: token for name in _NAMED_SPECIAL_TOKENS if (token := _token_content(tok_cfg.get(name)))
        }
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self._register_config_special_tokens(tok_cfg)

        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = _first(
            [self._token_id(self.bos_token)]
            + _id_list(gen_cfg.get("bos_token_id"))
            + _id_list(model_cfg.get("bos_token_id", text_cfg.get("bos_token_id")))
        )
        self.eos_token_ids: list[int] = _unique(
            _id_list(gen_cfg.get("eos_token_id"))
            + _id_list(model_cfg.get("eos_token_id", text_cfg.get("eos_token_id")))
            + [self._token_id(self.eos_token)]
        )
        self.pad_token_id: int | None = _first(
            [self._token_id(self.special_tokens.get("pad_token"))]
            + _id_list(gen_cfg.get("pad_token_id"))
            + _id_list(model_cfg.get("pad_token_id", text_cfg.get("pad_token_id")))
        )

        max_len = tok_cfg.get("model_max_length")
        # transformers writes a huge sentinel (1e30) when the length is unknown.
        self.model_max_length: int | None = (
            int(max_len) if isinstance(max_len, (int, float)) and 0 < max_len < 1e12 else None
        )

        # Explicit add_bos_token/add_eos_token replace what tokenizer.json's post-processor adds (as transformers'
        # Llama/Gemma tokenizers do), so a post-processor that already adds BOS never gets a second one.
        self._explicit_bos_eos: tuple[bool, bool] | None = None
        if "add_bos_token" in tok_cfg or "add_eos_token" in tok_cfg:
            self._explicit_bos_eos = (bool(tok_cfg.get("add_bos_token")), bool(tok_cfg.get("add_eos_token")))
        self._eos_token_id_for_encode = self._token_id(self.eos_token)

        self._special_ids: frozenset[int] = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special
        )

        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.chat_template: str | None = self.chat_templates.get("default")

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and the optional tokenizer/generation/model configs and chat templates in ``path``."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"tokenizer directory not found: {path}")
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"missing tokenizer.json in {path} (looked for {tokenizer_file})")
        try:
            backend = _BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises bare Exception subclasses
            raise TokenizerError(f"cannot load {tokenizer_file}: {exc}") from exc
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        return cls(
            backend,
            tokenizer_config=tokenizer_config,
            generation_config=_read_json(path / "generation_config.json"),
            model_config=_read_json(path / "config.json"),
            chat_templates=_load_chat_templates(path, tokenizer_config),
        )

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that ``from_dir`` (and transformers) read back
        as this tokenizer: the same special tokens, BOS/EOS adding and chat template."""
        directory = Path(directory)
        self._backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        if self._explicit_bos_eos is not None:
            config["add_bos_token"], config["add_eos_token"] = self._explicit_bos_eos
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def _register_config_special_tokens(self, tok_cfg: dict[str, Any]) -> None:
        # transformers marks the config's special tokens as special in the backend, which makes them match as
        # whole tokens in input text and get skipped by decode; do the same for those already in the vocabulary.
        extra = tok_cfg.get("extra_special_tokens") or tok_cfg.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # newer configs may name them
            extra = list(extra.values())
        names = list(self.special_tokens.values()) + [_token_content(t) for t in extra]
        known = {str(t.content) for t in self._backend.get_added_tokens_decoder().values() if t.special}
        missing = [
            AddedToken(name, special=True, normalized=False)
            for name in _unique(names)
            if name and name not in known and self._backend.token_to_id(name) is not None
        ]
        if missing:
            self._backend.add_special_tokens(missing)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` it gets the BOS/EOS the tokenizer is configured to add."""
        if not add_special_tokens:
            return self._backend.encode(text, add_special_tokens=False).ids
        if self._explicit_bos_eos is None:
            return self._backend.encode(text).ids
        add_bos, add_eos = self._explicit_bos_eos
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_eos and self._eos_token_id_for_encode is not None:
            ids.append(self._eos_token_id_for_encode)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, chat markers) are left out unless ``skip_special_tokens=False``."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._decode_raw(ids)

    def _decode_raw(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special token (the ones ``decode`` skips)."""
        return token_id in self._special_ids

    def token_to_id(self, token: str) -> int | None:
        """Id of the vocabulary entry ``token`` (e.g. ``"<|eot_id|>"``), or None."""
        return self._backend.token_to_id(token)

    def detokenizer(
        self, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A streaming decoder for tokens generated after ``prompt_ids``."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template, as transformers' ``apply_chat_template(tokenize=False)``.

        Extra keyword arguments (``enable_thinking``, ``date_string``, ``documents``...) become template variables.
        """
        template = self._select_chat_template(tools)
        if not messages:
            raise TokenizerError("cannot apply a chat template to an empty conversation")
        if tools is not None and not all(isinstance(tool, dict) for tool in tools):
            raise TokenizerError("tools must be JSON-schema dicts")
        try:
            compiled = _compile_chat_template(template)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template does not compile: {exc}") from exc
        variables = {**self.special_tokens, **kwargs}
        documents = variables.pop("documents", None)
        try:
            return compiled.render(
                messages=[_normalize_message(m) for m in messages],
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template rejected the conversation: {exc}") from exc

    def _select_chat_template(self, tools: list[dict] | None) -> str:
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is not None:
            return self.chat_template
        if self.chat_templates:
            raise TokenizerError(
                f"the tokenizer has chat templates {sorted(self.chat_templates)} but none named 'default'"
            )
        raise TokenizerError(
            "the tokenizer has no chat template (none in tokenizer_config.json, chat_template.jinja "
            "or chat_template.json)"
        )


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into the new text each one adds.

    Each step decodes a short window: the tokens of the last emitted piece (the prefix, which gives decoders like
    SentencePiece's the context they need for leading spaces) plus the tokens not yet emitted; the new text is what
    the window's decode adds after the prefix's. While that text ends in U+FFFD a multi-byte character is still
    incomplete, so nothing is emitted until it completes. The window stays a few tokens long, so a step costs O(1).
    """

    # Prompt tokens decoded ahead of the first generated one (as vLLM), so it keeps its leading space.
    PROMPT_CONTEXT = 5
    # A UTF-8 character has at most 4 bytes, so text still ending in U+FFFD after this many held tokens means the
    # model produced invalid bytes; they are emitted as decode shows them rather than held forever.
    MAX_HELD_TOKENS = 8

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = [int(i) for i in prompt_ids or [] if not (skip_special_tokens and tokenizer.is_special(i))]
        self._ids: list[int] = context[-self.PROMPT_CONTEXT :] if context else []
        self._read_offset = len(self._ids)  # window tokens before this have been emitted (or are prompt)
        self._prefix_text = tokenizer._decode_raw(self._ids)
        self._text = ""
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._pieces:
            self._text += "".join(self._pieces)
            self._pieces.clear()
        return self._text

    def add(self, token_id: int) -> str:
        """Add one generated token; returns the text it completes ("" while a character is incomplete)."""
        token_id = int(token_id)
        if self._skip_special_tokens and self._tokenizer.is_special(token_id):
            return ""
        self._ids.append(token_id)
        window_text = self._tokenizer._decode_raw(self._ids)
        if window_text.endswith("\ufffd") and len(self._ids) - self._read_offset < self.MAX_HELD_TOKENS:
            return ""
        return self._emit(window_text)

    def flush(self) -> str:
        """Emit whatever is still held (an incomplete character at the end of generation, as decode renders it)."""
        if len(self._ids) == self._read_offset:
            return ""
        return self._emit(self._tokenizer._decode_raw(self._ids))

    def _emit(self, window_text: str) -> str:
        piece = window_text[len(self._prefix_text) :]
        # The tokens just emitted become the next prefix; everything older leaves the window.
        self._ids = self._ids[self._read_offset :]
        self._read_offset = len(self._ids)
        self._prefix_text = self._tokenizer._decode_raw(self._ids)
        if piece:
            self._pieces.append(piece)
        return piece


# -------------------------------------------------------------------- loading helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data


def _load_chat_templates(path: Path, tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """Templates by name ("default" is the main one), with transformers' precedence between file layouts."""
    files: dict[str, str] = {}
    main_file = path / "chat_template.jinja"
    if main_file.is_file():
        files["default"] = main_file.read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        for template_file in sorted(extra_dir.glob("*.jinja")):
            files[template_file.stem] = template_file.read_text(encoding="utf-8")
    if files:
        # Standalone files replace any template in tokenizer_config.json, as in transformers.
        return files

    templates = _parse_template_entry(tokenizer_config.get("chat_template"), path / "tokenizer_config.json")
    if not templates:
        # Processor-style layout of multimodal repositories.
        templates = _parse_template_entry(
            _read_json(path / "chat_template.json").get("chat_template"), path / "chat_template.json"
        )
    return templates


def _parse_template_entry(entry: Any, source: Path) -> dict[str, str]:
    if entry is None:
        return {}
    if isinstance(entry, str):
        return {"default": entry}
    if isinstance(entry, list) and all(
        isinstance(e, dict) and "name" in e and "template" in e for e in entry
    ):
        return {e["name"]: e["template"] for e in entry}
    raise TokenizerError(
        f"chat_template in {source} must be a string or a list of {{name, template}} objects"
    )


def _token_content(token: Any) -> str | None:
    # Older configs serialise special tokens as AddedToken dicts.
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)]


def _first(values: list[int | None]) -> int | None:
    return next((v for v in values if v is not None), None)


def _unique(values: Iterable[Any]) -> list[Any]:
    seen: dict[Any, None] = {}
    for value in values:
        if value is not None:
            seen.setdefault(value, None)
    return list(seen)


# -------------------------------------------------------------------- chat template rendering


def _normalize_message(message: dict) -> dict:
    if not isinstance(message, dict):
        raise TokenizerError(f"chat messages must be dicts, got {message!r}")
    # APIs send `content: null` next to tool calls; templates handle a missing key but may print "None".
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' ``{% generation %}...{% endgeneration %}`` blocks and renders their body as is.

    transformers uses them to mark assistant text for training masks; inference only needs the text.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # transformers' version: jinja's own tojson escapes HTML characters (<, >, &, ') which changes the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile_chat_template(template: str) -> jinja2.Template:
    # Chat templates come from model repositories, so they run sandboxed and cannot change the objects they get.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
