"""Tests for effinfer.tokenizer against transformers and the tokenizers library on real tokenizers.

Uses the shared test data (Llama 2's 32000-piece tokenizer, stories260K's 512-piece byte-fallback tokenizer and real
chat templates); skips when it is absent.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from effinfer.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _shared_data() -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data"]
    if os.environ.get("EFFINFER_SHARED_DATA"):
        candidates.append(Path(os.environ["EFFINFER_SHARED_DATA"]))
    return next((c for c in candidates if c.is_dir()), None)


DATA = _shared_data()
if DATA is None:
    pytest.skip("shared test data not found (set EFFINFER_SHARED_DATA)", allow_module_level=True)

TOKENIZER_DIRS = {
    "llama2": DATA / "tokenizers" / "llama2",
    "stories260K": DATA / "stories260K" / "hf",
}
TEMPLATES = sorted((DATA / "chat_templates").glob("*.jinja"))

TEXTS = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "line one\nline two\n\n\tindented",
    "\n",
    "",
    "Emoji: 😀👍🏽 and a family 👨‍👩‍👧",
    "日本語のテキストと中文",
    "Accents: café, naïve, Ångström, São Paulo, Ελληνικά",
    "Price: 5€ or £4, math: ∑ x² ≤ ∞",
    "Once upon a time, there was a little girl named Lily.",
    "code: def f(x):\n    return x ** 2  # square",
]
MULTIBYTE_TEXTS = [t for t in TEXTS if any(ord(c) > 127 for c in t)]


@pytest.fixture(scope="module", params=sorted(TOKENIZER_DIRS))
def pair(request):
    """(ours, transformers' AutoTokenizer) loaded from the same directory."""
    path = TOKENIZER_DIRS[request.param]
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} not present")
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def stories() -> Tokenizer:
    return Tokenizer.from_dir(TOKENIZER_DIRS["stories260K"])


# ------------------------------------------------------------------ encode / decode


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(pair, text):
    ours, hf = pair
    assert ours.encode(text) == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", ["hi</s> there", "<s>x", "a <s> b", "x\n</s>\ny"])
def test_special_tokens_in_text_match_tokenizer_json(pair, text):
    # Special tokens in the text are matched whole. transformers' AutoTokenizer rebuilds Llama's pre-tokenizer
    # (prepend_scheme "first") instead of the file's, so the reference here is the file as written, loaded by
    # PreTrainedTokenizerFast.
    ours, hf = pair
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(hf.name_or_path)
    ids = ours.encode(text)
    assert ids == fast.encode(text)
    assert sum(i in (1, 2) for i in ids) == 2  # BOS plus the special token written in the text


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS + ["x</s>y"])
def test_decode_matches_transformers(pair, text, skip):
    ours, hf = pair
    ids = hf.encode(text) + [hf.eos_token_id]
    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_token_ids_match_transformers(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.eos_token_ids == [hf.eos_token_id] == [2]
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.is_special(hf.bos_token_id) and ours.is_special(hf.eos_token_id)
    assert not ours.is_special(hf.convert_tokens_to_ids("▁the"))


def _tokenizer_dir(tmp_path: Path, tokenizer_config: dict | None = None, **json_files: dict) -> Path:
    """A copy of stories260K's tokenizer.json with the given config files."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOKENIZER_DIRS["stories260K"] / "tokenizer.json", tmp_path / "tokenizer.json")
    if tokenizer_config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in json_files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


def _backend_ids(text: str) -> list[int]:
    # What the tokenizers library itself gives without special tokens: the independent reference.
    backend = tokenizers.Tokenizer.from_file(str(TOKENIZER_DIRS["stories260K"] / "tokenizer.json"))
    return backend.encode(text, add_special_tokens=False).ids


def test_add_bos_add_eos_flags_override_post_processor(tmp_path):
    # stories260K's tokenizer.json post-processor adds <s>; explicit flags in tokenizer_config win.
    plain = _backend_ids("hello")
    base = {"bos_token": "<s>", "eos_token": "</s>"}

    no_bos = Tokenizer.from_dir(_tokenizer_dir(tmp_path / "a", {**base, "add_bos_token": False}))
    assert no_bos.encode("hello") == plain

    both = Tokenizer.from_dir(
        _tokenizer_dir(tmp_path / "b", {**base, "add_bos_token": True, "add_eos_token": True})
    )
    assert both.encode("hello") == [1, *plain, 2]  # one BOS although the post-processor also adds one
    assert both.encode("hello", add_special_tokens=False) == plain

    default = Tokenizer.from_dir(_tokenizer_dir(tmp_path / "c", base))
    assert default.encode("hello") == [1, *plain]


@pytest.fixture
def no_post_processor_dir(tmp_path):
    spec = json.loads((TOKENIZER_DIRS["stories260K"] / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return tmp_path


def test_add_bos_token_without_post_processor(no_post_processor_dir):
    path = no_post_processor_dir
    assert Tokenizer.from_dir(path).encode("hello") == _backend_ids("hello")
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": True}))
    assert Tokenizer.from_dir(path).encode("hello") == [1, *_backend_ids("hello")]


def test_config_special_tokens_become_special(tmp_path):
    # A tokenizer.json whose </s> is only a vocabulary entry: tokenizer_config's eos_token makes it special, as in
    # transformers (matched whole in text, skipped by decode).
    spec = json.loads((TOKENIZER_DIRS["stories260K"] / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "</s>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    ours = Tokenizer.from_dir(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    ids = ours.encode("x</s>y")
    assert ids == hf.encode("x</s>y")
    assert 2 in ids and ours.is_special(2)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_eos_ids_are_the_union_of_all_configs(tmp_path):
    path = _tokenizer_dir(
        tmp_path,
        {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "pad_token": "<unk>"},
        generation_config={"bos_token_id": 1, "eos_token_id": [5, 2]},
        config={"eos_token_id": 7, "bos_token_id": 1},
    )
    tok = Tokenizer.from_dir(path)
    assert tok.eos_token_ids == [5, 2, 7]
    assert tok.bos_token_id == 1
    assert tok.pad_token_id == 0


def test_ids_from_model_configs_alone(tmp_path):
    tok = Tokenizer.from_dir(
        _tokenizer_dir(
            tmp_path, generation_config={"eos_token_id": 2, "pad_token_id": 0}, config={"bos_token_id": 1}
        )
    )
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (1, [2], 0)


# ------------------------------------------------------------------ incremental detokenizer


def _stream(tok: Tokenizer, ids: list[int], prompt_ids=None, skip_special_tokens=True) -> list[str]:
    det = tok.detokenizer(prompt_ids, skip_special_tokens=skip_special_tokens)
    pieces = [det.add(i) for i in ids]
    pieces.append(det.flush())
    assert det.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS + ["Once upon a time"])
def test_detokenizer_streams_complete_characters(pair, text):
    ours, hf = pair
    ids = hf.encode(text)
    pieces = _stream(ours, ids)
    assert "".join(pieces) == hf.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[-1] == ""  # nothing was left held at the end


def test_detokenizer_byte_fallback_emits_character_on_last_byte(stories):
    ids = [stories.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    det = stories.detokenizer()
    assert [det.add(i) for i in ids] == ["", "", "€"]
    assert det.text == "€"


@pytest.mark.parametrize("text", ["Once upon a time there was a girl", "Tom said: «très bien» 😀 and left"])
def test_detokenizer_after_prompt_keeps_leading_space(pair, text):
    ours, hf = pair
    full = hf.encode(text)
    for split in range(2, len(full)):
        prompt, generated = full[:split], full[split:]
        prompt_text = hf.decode(prompt, skip_special_tokens=True)
        if prompt_text.endswith("\ufffd"):
            continue  # a prompt encoded from text never ends inside a character
        expected = hf.decode(full, skip_special_tokens=True)[len(prompt_text) :]
        pieces = _stream(ours, generated, prompt_ids=prompt)
        assert "".join(pieces) == expected, (split, pieces)
        assert not any("\ufffd" in p for p in pieces)


def test_first_generated_token_keeps_leading_space(pair):
    ours, hf = pair
    prompt, full = hf.encode("Once upon a"), hf.encode("Once upon a time")
    assert full[: len(prompt)] == prompt
    pieces = _stream(ours, full[len(prompt) :], prompt_ids=prompt)
    assert pieces[0].startswith(" t")
    assert "".join(pieces) == " time"


def test_detokenizer_first_token_without_prompt(pair):
    ours, hf = pair
    ids = hf.encode("Once upon")
    assert "".join(_stream(ours, ids)) == hf.decode(ids, skip_special_tokens=True) == "Once upon"
    # A prompt of just <s> decodes as no context at all when special tokens are skipped.
    assert "".join(_stream(ours, ids[1:], prompt_ids=ids[:1])) == "Once upon"


def test_detokenizer_special_tokens(pair):
    ours, hf = pair
    ids = hf.encode("The end.") + [hf.eos_token_id]
    assert "".join(_stream(ours, ids)) == hf.decode(ids, skip_special_tokens=True)
    assert "".join(_stream(ours, ids, skip_special_tokens=False)) == hf.decode(ids, skip_special_tokens=False)


def test_detokenizer_random_unicode_text(pair):
    ours, hf = pair
    rng = random.Random(0)
    alphabet = "abc xyz ,.!\n" + "éüñßøå" + "日本語中文한국어" + "€£∑≤∞" + "😀👍🏽🚀🎉" + "\u200d"
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = hf.encode(text)
        pieces = _stream(ours, ids)
        assert "".join(pieces) == hf.decode(ids, skip_special_tokens=True), text
        assert not any("\ufffd" in p for p in pieces), text


def test_detokenizer_long_stream_keeps_a_small_window(stories):
    text = (DATA / "text" / "tinystories_valid.txt").read_text(encoding="utf-8")[:8000]
    ids = stories.encode(text)
    det = stories.detokenizer()
    longest_window = 0
    for token_id in ids:
        det.add(token_id)
        longest_window = max(longest_window, len(det._ids))
    assert (
        det.text
        == stories.decode(ids)
        == transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIRS["stories260K"]).decode(
            ids, skip_special_tokens=True
        )
    )
    assert longest_window <= det.PROMPT_CONTEXT + det.MAX_HELD_TOKENS


def test_detokenizer_invalid_bytes_do_not_stall(stories):
    # 0xFF never occurs in UTF-8: held text must come out once it cannot be the start of a character.
    bad = stories.token_to_id("<0xFF>")
    det = stories.detokenizer()
    for _ in range(20):
        det.add(bad)
    assert det.text.startswith("\ufffd")
    det.flush()
    assert det.text == stories.decode([bad] * 20)


def test_detokenizer_flush_emits_trailing_incomplete_character(stories):
    lead = stories.token_to_id("<0xE2>")
    det = stories.detokenizer()
    assert det.add(stories.encode("hi", add_special_tokens=False)[0]) != ""
    assert det.add(lead) == ""
    det.flush()
    assert det.text == stories.decode(stories.encode("hi", add_special_tokens=False)[:1] + [lead])


# ------------------------------------------------------------------ chat templates

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And <b>3+3</b> & 'more'? Ünïcode 😀"},
]
NO_SYSTEM_CONVERSATION = CONVERSATION[1:]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city, e.g. 'Zürich' <b>now</b>",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def hf_stories():
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIRS["stories260K"])


def _ours_with_template(tmp_path: Path, template: str) -> Tokenizer:
    path = _tokenizer_dir(
        tmp_path, json.loads((TOKENIZER_DIRS["stories260K"] / "tokenizer_config.json").read_text())
    )
    (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    return Tokenizer.from_dir(path)


def _hf_render(hf, template, messages, **kwargs):
    try:
        return hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure in the reference means there is nothing to compare
        pytest.skip(f"transformers cannot render this template: {exc}")


@pytest.mark.parametrize("template_path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_chat_template_matches_transformers(tmp_path, hf_stories, template_path):
    template = template_path.read_text(encoding="utf-8")
    ours = _ours_with_template(tmp_path, template)
    messages = NO_SYSTEM_CONVERSATION if "gemma" in template_path.stem else CONVERSATION
    expected = _hf_render(hf_stories, template, messages, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == expected
    assert "What is 2+2?" in expected
    expected_no_prompt = _hf_render(hf_stories, template, messages, add_generation_prompt=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == expected_no_prompt


@pytest.mark.parametrize(
    "template_path",
    [p for p in TEMPLATES if "Qwen" in p.stem or "Llama-3.1" in p.stem or "Mistral" in p.stem],
    ids=lambda p: p.stem,
)
def test_chat_template_with_tools_matches_transformers(tmp_path, hf_stories, template_path):
    template = template_path.read_text(encoding="utf-8")
    ours = _ours_with_template(tmp_path, template)
    expected = _hf_render(hf_stories, template, CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert "get_weather" in expected
    assert ours.apply_chat_template(CONVERSATION, tools=TOOLS) == expected


def test_chat_template_kwargs_reach_the_template(tmp_path, hf_stories):
    template = (DATA / "chat_templates" / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    ours = _ours_with_template(tmp_path, template)
    expected = _hf_render(
        hf_stories, template, CONVERSATION, add_generation_prompt=True, enable_thinking=False
    )
    assert "<think>" in expected
    assert ours.apply_chat_template(CONVERSATION, enable_thinking=False) == expected


def test_chat_template_without_content_none(tmp_path, hf_stories):
    template = (DATA / "chat_templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8")
    ours = _ours_with_template(tmp_path, template)
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": "sunny"},
    ]
    expected = _hf_render(hf_stories, template, messages, tools=TOOLS, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tools=TOOLS) == expected


@pytest.mark.parametrize(
    "template",
    [
        # lstrip_blocks/trim_blocks decide the whitespace around these indented tags
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n  U: {{ m.content }}\n    {% endif %}\n{% endfor %}",
        # a None content is dropped, so the template sees it undefined rather than printing "None"
        "{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}",
        "{{ messages | tojson(indent=2) }}{{ raise_exception('stop') if messages | length > 9 }}",
    ],
)
def test_small_templates_match_transformers(tmp_path, hf_stories, template):
    messages = [{"role": "user", "content": "<q> é"}, {"role": "assistant", "content": None}]
    expected = _hf_render(hf_stories, template, messages, add_generation_prompt=True)
    assert _ours_with_template(tmp_path, template).apply_chat_template(messages) == expected


def test_chat_template_from_tokenizer_config_and_named_templates(tmp_path):
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": [
            {
                "name": "default",
                "template": "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}",
            },
            {"name": "tool_use", "template": "{{ tools | tojson }}|{{ messages | length }}{{ eos_token }}"},
        ],
    }
    tok = Tokenizer.from_dir(_tokenizer_dir(tmp_path, config))
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "<s>[hi]"
    assert tok.apply_chat_template(messages, tools=[{"name": "<f>"}]) == '[{"name": "<f>"}]|1</s>'


def test_chat_template_jinja_file_takes_precedence(tmp_path):
    path = _tokenizer_dir(tmp_path, {"chat_template": "from config"})
    assert Tokenizer.from_dir(path).chat_template == "from config"
    (path / "chat_template.jinja").write_text("{% generation %}from file{% endgeneration %}")
    tok = Tokenizer.from_dir(path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "from file"


def test_chat_template_errors(tmp_path, stories):
    with pytest.raises(TokenizerError, match="no chat template"):
        stories.apply_chat_template([{"role": "user", "content": "hi"}])
    gemma = (DATA / "chat_templates" / "google-gemma-2-2b-it.jinja").read_text(encoding="utf-8")
    with pytest.raises(TokenizerError, match="System role not supported"):
        _ours_with_template(tmp_path, gemma).apply_chat_template(CONVERSATION)


# ------------------------------------------------------------------ errors


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(TokenizerError, match="not found") as info:
        Tokenizer.from_dir(missing)
    assert str(missing) in str(info.value)


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="missing tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_bad_json_names_the_file(tmp_path):
    path = _tokenizer_dir(tmp_path)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_dir(path)
    assert str(path / "tokenizer_config.json") in str(info.value)


def test_unreadable_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)
