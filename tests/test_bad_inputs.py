"""Every bad input a new user might try ends in one clear line and a non-zero exit, never a traceback.

Each case runs the real ``effinfer`` command in a subprocess and checks: the exit status is not 0,
stderr holds no traceback, exactly one line of it is the error (progress bars and log records aside),
and that line names the problem. Where the Python API meets the same input, the exception type is
checked too. The bad checkpoints are made from stories260K (HF directory and GGUF).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from effinfer import LLM, ConfigError
from effinfer.config import EngineConfig, ModelConfig
from effinfer.loading.builder import WeightsError

REPO_ROOT = Path(__file__).resolve().parents[1]
_EFFINFER = Path(sys.executable).with_name("effinfer")
# The installed console script when there is one (what a user types), else the same entry point.
EFFINFER = [str(_EFFINFER)] if _EFFINFER.is_file() else [sys.executable, "-m", "effinfer.cli"]
PROGRESS_BAR = re.compile(r"\d+%\|")
LOG_RECORD = re.compile(r"^(DEBUG|INFO|WARNING) ")


def effinfer(*args: str | Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [*EFFINFER, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with a single error line that contains every fragment; returns that line."""
    err = result.stderr
    assert result.returncode != 0, f"exit status 0\nstdout: {result.stdout}\nstderr: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip()]
    other = [line for line in lines if not PROGRESS_BAR.search(line) and not LOG_RECORD.match(line)]
    assert len(other) == 1, f"expected one error line, got {len(other)}:\n{err}"
    line = other[0]
    assert re.match(r"effinfer( \w+)*: error: ", line), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def _model_copy(source: Path, target: Path, **config_changes) -> Path:
    """A copy of an HF model directory with config.json fields changed (None removes one)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


# -------------------------------------------------------------------- config.json


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"hidden_size": None}, ["missing required field", "hidden_size"]),
        ({"num_attention_heads": 0}, ["num_attention_heads", "got 0"]),
        ({"num_hidden_layers": 0}, ["num_hidden_layers", "got 0"]),
        ({"num_hidden_layers": -3}, ["num_hidden_layers", "got -3"]),
        ({"hidden_size": 0}, ["hidden_size", "got 0"]),
        ({"vocab_size": -1}, ["vocab_size", "got -1"]),
        ({"num_key_value_heads": 3}, ["num_attention_heads (8)", "num_key_value_heads (3)"]),
        ({"head_dim": 7}, ["head_dim", "7"]),
        ({"hidden_act": "relu6"}, ["hidden_act", "relu6"]),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, ["rope_scaling", "yarn"]),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_bad_config_json(stories260k, tmp_path, changes, fragments):
    model = _model_copy(stories260k, tmp_path / "m", **changes)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dir(model)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert str(model / "config.json") in str(info.value)
    assert_one_line_error(effinfer("generate", "--model", model, "hi"), *fragments, "config.json")


def test_config_json_not_an_object(stories260k, tmp_path):
    model = _model_copy(stories260k, tmp_path / "m")
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_dir(model)


def test_head_dim_that_does_not_match_the_weights(stories260k, tmp_path):
    model = _model_copy(stories260k, tmp_path / "m", head_dim=16)  # the checkpoint has 8
    with pytest.raises(WeightsError, match="k_proj"):
        LLM(str(model), show_progress=False)
    assert_one_line_error(effinfer("generate", "--model", model, "hi"), "k_proj", "shape")


# -------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("keep", [0.5, 20 / 1_000_000], ids=["half", "header-cut"])
def test_truncated_safetensors(stories260k, tmp_path, keep):
    model = _model_copy(stories260k, tmp_path / "m")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        LLM(str(model), show_progress=False)
    assert_one_line_error(effinfer("generate", "--model", model, "hi"), str(weights), "safetensors")


@pytest.mark.parametrize(
    "index, fragment",
    [
        ("{not json", "not valid JSON"),
        ("{}", "weight_map"),
        ("[]", "weight_map"),
        (
            json.dumps({"weight_map": {"lm_head.weight": "model-00002.safetensors"}}),
            "model-00002.safetensors",
        ),
        (json.dumps({"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}), "elsewhere"),
    ],
    ids=["bad-json", "no-weight-map", "not-an-object", "missing-shard", "outside-dir"],
)
def test_malformed_safetensors_index(stories260k, tmp_path, index, fragment):
    model = _model_copy(stories260k, tmp_path / "m")
    (model / "model.safetensors.index.json").write_text(index)
    with pytest.raises(WeightsError, match=re.escape(fragment)):
        LLM(str(model), show_progress=False)
    assert_one_line_error(
        effinfer("generate", "--model", model, "hi"), "model.safetensors.index.json", fragment
    )


# -------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def stories_gguf(shared_data) -> Path:
    path = shared_data / "stories260K" / "stories260K.gguf"
    if not path.is_file():
        pytest.skip("stories260K.gguf is not present")
    return path


def _metadata_type(value):
    """The GGUF (type, array item type) to write a value read back by ``GGUFFile`` as."""
    vt = gguf.GGUFValueType
    scalar = {str: vt.STRING, bool: vt.BOOL, float: vt.FLOAT32, int: vt.UINT32}
    if isinstance(value, list):
        item = scalar[type(value[0])]
        return vt.ARRAY, (vt.INT32 if item == vt.UINT32 else item)
    return scalar[type(value)], None


def write_gguf(
    source: Path, target: Path, metadata: dict | None = None, tensor_types: dict | None = None
) -> Path:
    """A copy of the GGUF at ``source`` written with gguf-py's GGUFWriter, with metadata values replaced
    and some tensors stored as other GGML types (random bytes of the right size)."""
    from effinfer.loading.gguf import GGUFFile

    original = GGUFFile(source)
    writer = gguf.GGUFWriter(str(target), original.architecture)
    for key, value in {**original.metadata, **(metadata or {})}.items():
        if key != "general.architecture":
            vtype, sub_type = _metadata_type(value)
            writer.add_key_value(key, value, vtype, sub_type)
    rng = np.random.default_rng(0)
    for name in original.tensors:
        qtype = (tensor_types or {}).get(name)
        if qtype is None:
            writer.add_tensor(name, original.tensor(name).numpy())
        else:
            block_values, block_bytes = gguf.constants.GGML_QUANT_SIZES[qtype]
            rows, cols = original.tensors[name].shape
            raw = rng.integers(0, 256, size=(rows, cols // block_values * block_bytes), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.fixture
def no_allocation(monkeypatch):
    """Fails the test if a GGUF model gets built (the error must come before)."""
    import effinfer.loading.gguf as gguf_loader

    def refuse(*args, **kwargs):
        raise AssertionError("the model was allocated before the bad input was reported")

    monkeypatch.setattr(gguf_loader, "build_model", refuse)


def test_gguf_copy_is_valid(stories_gguf, tmp_path):
    """The writer below makes loadable files: the bad ones differ only in what each test changes."""
    from effinfer.loading.gguf import GGUFFile

    copy = write_gguf(stories_gguf, tmp_path / "copy.gguf")
    config = GGUFFile(copy).model_config()
    assert config == GGUFFile(stories_gguf).model_config()


def test_gguf_unsupported_tensor_type_before_allocation(stories_gguf, tmp_path, no_allocation):
    from effinfer.loading.gguf import GGUFFile, load_model

    qtype = gguf.GGMLQuantizationType.IQ4_NL
    bad = write_gguf(stories_gguf, tmp_path / "iq4.gguf", tensor_types={"blk.1.attn_v.weight": qtype})
    file = GGUFFile(bad)
    with pytest.raises(WeightsError, match="IQ4_NL") as info:
        load_model(file, file.model_config(), torch.float32, torch.device("cpu"), 64, show_progress=False)
    assert "blk.1.attn_v.weight" in str(info.value)
    with pytest.raises(WeightsError, match="IQ4_NL"):
        LLM(str(bad), show_progress=False)
    assert_one_line_error(effinfer("generate", "--model", bad, "hi"), "IQ4_NL", "blk.1.attn_v.weight")


@pytest.mark.parametrize(
    "metadata, fragments",
    [
        ({"general.alignment": 0}, ["general.alignment", "got 0"]),
        ({"general.alignment": 24}, ["general.alignment", "got 24"]),
        ({"llama.attention.head_count": 0}, ["head_count", "got 0"]),
        ({"llama.block_count": 0}, ["num_hidden_layers", "got 0"]),
        ({"llama.attention.head_count_kv": 3}, ["num_key_value_heads (3)"]),
    ],
    ids=["alignment-0", "alignment-24", "heads-0", "layers-0", "kv-heads-3"],
)
def test_gguf_malformed_header(stories_gguf, tmp_path, no_allocation, metadata, fragments):
    bad = write_gguf(stories_gguf, tmp_path / "bad.gguf", metadata=metadata)
    with pytest.raises(ConfigError) as info:
        LLM(str(bad), show_progress=False)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert_one_line_error(effinfer("generate", "--model", bad, "hi"), "bad.gguf", *fragments)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_gguf_truncated(stories_gguf, tmp_path, no_allocation, cut):
    data = stories_gguf.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) - 100] if cut == "data" else data[:200])
    with pytest.raises(ConfigError, match="truncated" if cut == "data" else "not a valid GGUF"):
        LLM(str(bad), show_progress=False)
    assert_one_line_error(effinfer("generate", "--model", bad, "hi"), "cut.gguf")


# -------------------------------------------------------------------- engine settings


def test_kv_budget_smaller_than_one_block(stories260k):
    with pytest.raises(ConfigError, match="smaller than one block"):
        LLM(str(stories260k), kv_cache_memory=1024, show_progress=False)
    result = effinfer("generate", "--model", stories260k, "--kv-cache-memory", "1K", "hi")
    assert_one_line_error(result, "1024 bytes", "smaller than one block")


@pytest.mark.parametrize(
    "flag, value, field",
    [
        ("--device", "tpu", "device 'tpu'"),
        ("--device", "cuda:99", "cuda:99"),
        ("--threads", "0", "num_threads"),
        ("--threads", "-2", "num_threads"),
        ("--max-model-len", "-1", "max_model_len"),
        ("--max-model-len", "0", "max_model_len"),
    ],
)
def test_bad_engine_flags(stories260k, flag, value, field):
    assert_one_line_error(effinfer("generate", "--model", stories260k, flag, value, "hi"), field, value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(stories260k):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        EngineConfig(device="cuda")
    result = effinfer("generate", "--model", stories260k, "--device", "cuda", "hi")
    assert_one_line_error(result, "'cuda'", "CUDA is not available")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"device": "tpu"}, "device"),
        ({"device": "cuda:99"}, "cuda:99"),
        ({"num_threads": 0}, "num_threads"),
        ({"max_model_len": -1}, "max_model_len"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ],
)
def test_bad_engine_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        EngineConfig(**kwargs)


# -------------------------------------------------------------------- eval ppl


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text("Once upon a time there was a little girl. She liked to play in the park with her dog.\n")
    return path


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--ctx", "100000"], ["ctx 100000", "512"]),
        (["--ctx", "1"], ["ctx", "got 1"]),
        (["--ctx", "8", "--stride", "0"], ["stride", "got 0"]),
        (["--ctx", "8", "--stride", "9"], ["stride", "ctx=8", "got 9"]),
        (["--ctx", "8", "--max-windows", "0"], ["max_windows", "got 0"]),
    ],
    ids=["ctx-too-long", "ctx-1", "stride-0", "stride-past-ctx", "max-windows-0"],
)
def test_eval_ppl_bad_window(stories260k, text_file, args, fragments):
    from effinfer.eval import EvalError, perplexity

    llm = _small_llm(stories260k)
    kwargs = dict(zip(("ctx", "stride", "max_windows"), [None] * 3))
    for flag, value in zip(args[::2], args[1::2]):
        kwargs[flag.removeprefix("--").replace("-", "_")] = int(value)
    with pytest.raises(EvalError):
        perplexity(llm, path=text_file, show_progress=False, **kwargs)
    result = effinfer("eval", "ppl", "--model", stories260k, "--data", text_file, *args)
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize("kind", ["empty", "missing", "directory"])
def test_eval_ppl_bad_data_file(stories260k, tmp_path, kind):
    from effinfer.eval import EvalError, perplexity

    data = tmp_path / "data.txt"
    if kind == "empty":
        data.write_text("")
    elif kind == "directory":
        data.mkdir()
    with pytest.raises(EvalError, match="data.txt"):
        perplexity(_small_llm(stories260k), path=data, show_progress=False)
    assert_one_line_error(effinfer("eval", "ppl", "--model", stories260k, "--data", data), "data.txt")


_LLMS: dict = {}


def _small_llm(path: Path) -> LLM:
    if path not in _LLMS:
        _LLMS[path] = LLM(str(path), show_progress=False, kv_cache_memory=1 << 20)
    return _LLMS[path]


# -------------------------------------------------------------------- quantize --out


def test_quantize_out_is_an_existing_file(stories260k, tmp_path):
    from effinfer.compress.quant.pipeline import QuantizeOptions, quantize

    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    with pytest.raises(ConfigError, match="existing file"):
        quantize(stories260k, out, QuantizeOptions(method="rtn", bits=8), show_progress=False)
    result = effinfer("quantize", "--model", stories260k, "--method", "rtn", "--bits", "8", "--out", out)
    assert_one_line_error(result, str(out), "existing file")
    assert out.read_text() == "keep me"


def test_quantize_out_is_a_non_empty_directory(stories260k, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = effinfer("quantize", "--model", stories260k, "--method", "rtn", "--bits", "8", "--out", out)
    assert_one_line_error(result, str(out), "not empty")
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"


def test_quantize_calibration_text_too_short(stories260k, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("Hi.")
    out = tmp_path / "out"
    args = ["--method", "gptq", "--calib", calib, "--num-samples", "2", "--seq-len", "64", "--out", out]
    assert_one_line_error(effinfer("quantize", "--model", stories260k, *args), "calib.txt")
    assert not out.exists()


# -------------------------------------------------------------------- convert


def test_convert_bad_outputs(stories260k, tmp_path):
    from effinfer.convert import ConvertError, convert_to_gguf

    with pytest.raises(ConvertError, match="is a directory"):
        convert_to_gguf(stories260k, tmp_path)
    assert_one_line_error(effinfer("convert", stories260k, "-o", tmp_path), "is a directory")
    missing_dir = tmp_path / "no" / "such" / "x.gguf"
    assert_one_line_error(effinfer("convert", stories260k, "-o", missing_dir), "does not exist")
    model = _model_copy(stories260k, tmp_path / "m")
    before = (model / "model.safetensors").read_bytes()
    result = effinfer("convert", model, "-o", model / "model.safetensors")
    assert_one_line_error(result, "would overwrite")
    assert (model / "model.safetensors").read_bytes() == before


def test_convert_bad_checkpoint(stories260k, tmp_path):
    model = _model_copy(stories260k, tmp_path / "m", num_attention_heads=0)
    assert_one_line_error(effinfer("convert", model, "-o", tmp_path / "x.gguf"), "num_attention_heads")
    model = _model_copy(stories260k, tmp_path / "t")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(effinfer("convert", model, "-o", tmp_path / "y.gguf"), "model.safetensors")
    assert_one_line_error(effinfer("convert", tmp_path / "missing"), "does not exist")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


# -------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and ran to the dog who was happy with a big red ball".split()
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(200)))
    return path


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--threads", "0"], ["--threads", "got 0"]),
        (["--threads", "-1"], ["--threads", "got -1"]),
        (["--vocab-size", "10"], ["--vocab-size", "got 10"]),
        (["--kv-heads", "0"], ["--kv-heads", "got 0"]),
        (["--intermediate-size", "0"], ["--intermediate-size", "got 0"]),
        (["--lr", "-1"], ["--lr", "-1"]),
        (["--warmup-steps", "-1"], ["--warmup-steps", "got -1"]),
        (["--heads", "3"], ["3 heads"]),
        (["--init", "MISSING"], ["--init", "does not exist"]),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None,
)
def test_train_bad_arguments(corpus, tmp_path, args, fragments):
    args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    out = tmp_path / "out"
    result = effinfer("train", "--data", corpus, "--out", out, "--max-steps", "1", "--seq-len", "16",
                      "--hidden-size", "32", "--vocab-size", "300", *args)  # fmt: skip
    assert_one_line_error(result, *fragments)


def test_train_out_is_a_file_and_bad_init_checkpoint(corpus, stories260k, tmp_path):
    from effinfer.train import TrainConfig

    out = tmp_path / "model.bin"
    out.write_text("keep me")
    with pytest.raises(ValueError, match="existing file"):
        TrainConfig(data=[str(corpus)], out=out)
    result = effinfer("train", "--data", corpus, "--out", out, "--max-steps", "1")
    assert_one_line_error(result, "--out", "existing file")
    assert out.read_text() == "keep me"
    init = _model_copy(stories260k, tmp_path / "init")
    data = (init / "model.safetensors").read_bytes()
    (init / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = effinfer("train", "--data", corpus, "--out", tmp_path / "tuned", "--init", init,
                      "--max-steps", "1", "--seq-len", "16", "--batch-size", "2")  # fmt: skip
    assert_one_line_error(result, "model.safetensors")


# -------------------------------------------------------------------- bench


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--device", "tpu"], ["tpu"]),
        (["--threads", "0"], ["num_threads", "got 0"]),
        (["--num-requests", "0"], ["--num-requests", "got 0"]),
    ],
    ids=["device-tpu", "threads-0", "num-requests-0"],
)
def test_bench_bad_arguments(stories260k, args, fragments):
    result = effinfer("bench", "--model", stories260k, "--no-progress", "--batch-decode-tokens", "2",
                      "--concurrent", "0", *args)  # fmt: skip
    assert_one_line_error(result, *fragments)


def test_bench_bad_paths(stories260k, tmp_path):
    assert_one_line_error(
        effinfer("bench", "--model", tmp_path / "missing", "--no-progress"), "does not exist"
    )
    out = tmp_path / "file"
    out.write_text("keep me")
    assert_one_line_error(effinfer("bench", "make-model", "--preset", "tiny", "--out", out), "existing file")
    assert out.read_text() == "keep me"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--rounds", "0"], ["--rounds", "got 0"]),
        (["--threads", "0"], ["--threads", "got 0"]),
        (["--schemes", "int3"], ["int3"]),
    ],
    ids=["rounds-0", "threads-0", "unknown-scheme"],
)
def test_bench_quant_bad_arguments(stories260k, args, fragments):
    assert_one_line_error(effinfer("bench", "quant", "--model", stories260k, *args), *fragments)


# -------------------------------------------------------------------- serve


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--port", "70000"], ["--port", "70000"]),
        (["--port", "-5"], ["--port", "-5"]),
        (["--max-body-bytes", "0"], ["--max-body-bytes", "got 0"]),
        (["--max-queue", "-7"], ["--max-queue", "got -7"]),
        (["--device", "tpu"], ["device 'tpu'"]),
        (["--threads", "0"], ["num_threads"]),
    ],
    ids=["port-high", "port-negative", "max-body-0", "max-queue", "device", "threads"],
)
def test_serve_bad_flags_exit_before_serving(stories260k, args, fragments):
    pytest.importorskip("uvicorn")
    # A server that started would run until the timeout: the test would fail with TimeoutExpired.
    result = effinfer("serve", "--model", stories260k, *args, timeout=120)
    line = assert_one_line_error(result, *fragments)
    assert "http://" not in result.stderr, line


def test_serve_bad_model_path(tmp_path):
    pytest.importorskip("uvicorn")
    result = effinfer("serve", "--model", tmp_path / "missing", timeout=120)
    assert_one_line_error(result, "missing", "does not exist")


def test_unwritable_output_is_one_line(stories260k, tmp_path):
    """An OS error while writing (here: permission denied) is reported, not raised as a traceback."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    target = locked / "x.gguf"
    if os.access(locked, os.W_OK):  # root writes anywhere but in sysfs
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no directory here refuses writes")
        target = Path("/sys/x.gguf")
    try:
        result = effinfer("convert", stories260k, "-o", target)
    finally:
        locked.chmod(0o700)
    assert_one_line_error(result, "Permission denied", "x.gguf")
