"""Training data: text files in, packed token sequences out.

Files are collected from paths, globs and directories, cleaned (binary or non-UTF-8 files
skipped, overly long lines dropped, identical files kept once) and split into training and
validation by a hash of each file's path, so the held-out set never changes between runs.
A byte-level BPE tokenizer (``bpe.py``) is trained on the training files; every document is
preceded by ``<|endoftext|>``, the documents are concatenated into one stream per split and
cut into rows of ``seq_len + 1`` tokens (inputs and their shifted targets). The streams are
cached as ``.npy`` so that a resumed run skips all this.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import itertools
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from effinfer.train.bpe import SEPARATOR, TOKENIZER_FILES, encode_documents, save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

_BINARY_PROBE_BYTES = 8192


@dataclass
class Document:
    name: str  # path relative to the source it was found under: the same on every machine
    text: str


@dataclass
class CorpusStats:
    files_found: int = 0
    skipped_binary: int = 0
    skipped_undecodable: int = 0
    skipped_empty: int = 0
    duplicates: int = 0
    long_lines_dropped: int = 0
    train_documents: int = 0
    val_documents: int = 0
    train_bytes: int = 0
    val_bytes: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    vocab_size: int = 0
    separator_id: int = 0
    val_names: list[str] = field(default_factory=list)


def collect_files(sources: list[str], include: list[str], exclude: list[str]) -> list[tuple[str, Path]]:
    """(name, path) of every file under ``sources``, sorted by name.

    A source is a file (always taken), a directory (searched recursively) or a glob. Files found
    in directories and globs must match one of the ``include`` patterns by file name (all files if
    there are none); ``exclude`` patterns drop a file when they match its relative path or any
    directory on it, so ``test`` removes every ``test/`` directory.
    """
    found: dict[Path, str] = {}  # resolved path -> name; two sources may hold files of the same name
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            found.setdefault(path.resolve(), path.name)
            continue
        if path.is_dir():
            root, candidates = path, (p for p in path.rglob("*") if p.is_file())
        elif glob.has_magic(source):
            root = _glob_root(source)
            candidates = (Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        else:
            raise FileNotFoundError(f"training data {source!r} is not a file, directory or glob")
        for file in candidates:
            name = file.relative_to(root).as_posix()
            if include and not any(fnmatch.fnmatch(file.name, pattern) for pattern in include):
                continue
            if _excluded(name, exclude):
                continue
            found.setdefault(file.resolve(), name)
    return sorted((name, path) for path, name in found.items())


def _glob_root(pattern: str) -> Path:
    """The directory a glob searches from: its leading parts without wildcards."""
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), Path(pattern).expanduser().parts))
    return Path(*fixed) if fixed else Path(".")


def _excluded(name: str, patterns: list[str]) -> bool:
    parts = name.split("/")
    return any(
        fnmatch.fnmatch(name, pattern) or any(fnmatch.fnmatch(part, pattern) for part in parts[:-1])
        for pattern in patterns
    )


def clean_text(raw: bytes, max_line_chars: int) -> tuple[str | None, int, str]:
    """(cleaned text or None, number of lines dropped, why it was rejected)."""
    if b"\0" in raw[:_BINARY_PROBE_BYTES]:
        return None, 0, "binary"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, 0, "undecodable"
    lines = text.replace("\r\n", "\n").split("\n")
    kept = [line for line in lines if len(line) <= max_line_chars]
    text = "\n".join(kept)
    if not text.strip():
        return None, len(lines) - len(kept), "empty"
    return text, len(lines) - len(kept), ""


def is_validation(name: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def load_corpus(
    files: list[tuple[str, Path]], max_line_chars: int, val_fraction: float
) -> tuple[list[Document], list[Document], CorpusStats]:
    """Read, clean and dedupe ``files``; split them into (train, val) by a hash of each name."""
    stats = CorpusStats(files_found=len(files))
    seen: set[bytes] = set()
    train: list[Document] = []
    val: list[Document] = []
    for name, path in files:
        text, dropped, reason = clean_text(path.read_bytes(), max_line_chars)
        if text is None:
            setattr(stats, f"skipped_{reason}", getattr(stats, f"skipped_{reason}") + 1)
            continue
        digest = hashlib.sha256(text.encode()).digest()
        if digest in seen:
            stats.duplicates += 1
            continue
        seen.add(digest)
        stats.long_lines_dropped += dropped
        (val if is_validation(name, val_fraction) else train).append(Document(name, text))
    if val_fraction > 0 and not val and len(train) > 1:
        # A tiny corpus may draw no validation file at all; hold out the one whose hash is lowest.
        first = min(train, key=lambda d: hashlib.sha256(d.name.encode()).digest())
        train.remove(first)
        val.append(first)
    if not train:
        raise ValueError("no usable training files (all were binary, undecodable, empty or held out)")
    stats.train_documents, stats.val_documents = len(train), len(val)
    stats.train_bytes = sum(len(d.text.encode()) for d in train)
    stats.val_bytes = sum(len(d.text.encode()) for d in val)
    stats.val_names = [d.name for d in val]
    return train, val, stats


@dataclass
class DataSettings:
    """Everything the cached token streams depend on; a cache made with other settings is rebuilt."""

    sources: list[str]
    include: list[str]
    exclude: list[str]
    vocab_size: int
    max_line_chars: int
    val_fraction: float
    seq_len: int
    init: str | None


def prepare_data(settings: DataSettings, cache_dir: Path) -> CorpusStats:
    """Build (or reuse) ``cache_dir`` with train.npy, val.npy, the tokenizer files and stats.json."""
    stats_file = cache_dir / "stats.json"
    if stats_file.is_file():
        cached = json.loads(stats_file.read_text())
        if cached.get("settings") == asdict(settings):
            log.info("reusing tokenized data in %s", cache_dir)
            return CorpusStats(**cached["stats"])
        log.info("data settings changed; rebuilding %s", cache_dir)
    files = collect_files(settings.sources, settings.include, settings.exclude)
    if not files:
        raise FileNotFoundError(f"no training files found in {settings.sources} (include {settings.include})")
    train_docs, val_docs, stats = load_corpus(files, settings.max_line_chars, settings.val_fraction)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if settings.init:
        for name in TOKENIZER_FILES:
            if (Path(settings.init) / name).is_file():
                shutil.copyfile(Path(settings.init) / name, cache_dir / name)
        tokenizer = Tokenizer.from_file(str(cache_dir / "tokenizer.json"))
        separator_id = _init_separator_id(Path(settings.init))
    else:
        tokenizer = train_tokenizer([d.text for d in train_docs], settings.vocab_size)
        save_tokenizer(tokenizer, cache_dir, settings.seq_len)
        separator_id = tokenizer.token_to_id(SEPARATOR)
    train_tokens = encode_documents(tokenizer, [d.text for d in train_docs], separator_id)
    val_tokens = encode_documents(tokenizer, [d.text for d in val_docs], separator_id)
    np.save(cache_dir / "train.npy", train_tokens)
    np.save(cache_dir / "val.npy", val_tokens)
    stats.train_tokens, stats.val_tokens = len(train_tokens), len(val_tokens)
    stats.vocab_size = tokenizer.get_vocab_size()
    stats.separator_id = separator_id
    # Written last: its presence means the cache is complete.
    stats_file.write_text(json.dumps({"settings": asdict(settings), "stats": asdict(stats)}, indent=1))
    return stats


def _init_separator_id(init_dir: Path) -> int:
    from effinfer.tokenizer import Tokenizer as EffinferTokenizer

    tokenizer = EffinferTokenizer.from_dir(init_dir)
    if not tokenizer.eos_token_ids:
        raise ValueError(f"the tokenizer in {init_dir} has no EOS token to separate documents with")
    return tokenizer.eos_token_ids[0]


class PackedTokens:
    """A token stream seen as rows of ``seq_len + 1`` tokens; row i starts at token i * seq_len."""

    def __init__(self, path: Path, seq_len: int) -> None:
        self.tokens = np.load(path, mmap_mode="r")
        self.seq_len = seq_len
        self.num_rows = max(0, (len(self.tokens) - 1) // seq_len)

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        """[len(indices), seq_len + 1] int64: inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
        starts = np.asarray(indices, dtype=np.int64)[:, None] * self.seq_len
        return torch.from_numpy(self.tokens[starts + np.arange(self.seq_len + 1)].astype(np.int64))


class RowOrder:
    """Which training rows come at each position of the run: a fresh permutation every epoch.

    The order depends only on the seed, so a run resumed at position p reads exactly what the
    uninterrupted run would have, whatever the number of processes.
    """

    def __init__(self, num_rows: int, seed: int) -> None:
        if num_rows <= 0:
            raise ValueError("the training data is shorter than one sequence; lower --seq-len or add data")
        self.num_rows = num_rows
        self.seed = seed
        self._epoch = -1
        self._permutation = np.zeros(0, dtype=np.int64)

    def take(self, position: int, count: int) -> np.ndarray:
        """Row indices at positions [position, position + count)."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, offset = divmod(position + i, self.num_rows)
            if epoch != self._epoch:
                self._epoch = epoch
                self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            out[i] = self._permutation[offset]
        return out
