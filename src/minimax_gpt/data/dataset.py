"""Training data: read texts, tokenize once into memory-mapped token files, sample batches.

``prepare`` writes a directory (nanoGPT's layout)::

    train.bin        raw token ids, np.uint16 when vocab_size <= 65536 else np.uint32
    val.bin          the last val_fraction of the token stream, same dtype
    tokenizer/       the tokenizer (tokenizer.Tokenizer.save)
    meta.json        {"dtype", "vocab_size", "train_tokens", "val_tokens", "tokenizer", "source", ...,
                     "fingerprint"}: the fingerprint (data_fingerprint) decides whether the folder can be reused

The folder is built in a temporary sibling and renamed into place whole.

``TokenDataset(dir, split)`` memory-maps one split and hands out (x, y) int64 batches of shape (B, T) with
y = x shifted by one token.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from minimax_gpt.atomic import atomic_directory
from minimax_gpt.data.fingerprint import describe_change, source_fingerprint
from minimax_gpt.data.tokenizer import META_FILE, Tokenizer, build_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
FOLDER_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")

# The default corpus: the running interpreter's standard library, .py files in sorted relative-path order,
# without tests, installed packages, and modules that are data tables rather than code (encodings: codec
# tables; pydoc_data: one big help string), capped so that preparing it takes about a second.
DEFAULT_CORPUS_MAX_BYTES = 4 * 2**20
_DEFAULT_CORPUS_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data"}
)


def default_corpus() -> list[Path]:
    """The standard library's ``.py`` sources of this interpreter, sorted by path relative to the stdlib
    directory, skipping empty files and the excluded directories, up to the first file that would take the
    total past DEFAULT_CORPUS_MAX_BYTES (4 MiB). Same Python build -> same list."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _DEFAULT_CORPUS_EXCLUDED_DIRS]  # prune, do not descend
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".py") and path.is_file():
                candidates.append((path.relative_to(root).as_posix(), path))
    files, total = [], 0
    for _, path in sorted(candidates):
        size = path.stat().st_size
        if size == 0:
            continue
        if total + size > DEFAULT_CORPUS_MAX_BYTES:
            break
        files.append(path)
        total += size
    if not files:
        raise ValueError(f"no standard-library .py sources found under {root}")
    return files


def _decode_utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 at byte offset {e.start} ({e.reason})") from None


def _read_jsonl(path: Path) -> list[str]:
    texts, offset = [], 0
    for lineno, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid UTF-8 at byte offset {offset + e.start} ({e.reason})") from None
        offset += len(raw)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
        if record["text"]:
            texts.append(record["text"])
    return texts


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        columns = table.column_names
        column = table.column("text").to_pylist() if "text" in columns else None
    except ImportError:
        try:
            import pandas as pd

            frame = pd.read_parquet(path)
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow) or pandas") from None
        columns, column = list(frame.columns), (frame["text"].tolist() if "text" in frame.columns else None)
    if column is None:
        raise ValueError(f'{path}: no "text" column (columns: {", ".join(map(str, columns))})')
    for row, value in enumerate(column):
        if not isinstance(value, str):
            raise ValueError(f'{path}: row {row}: "text" must be a string, got {type(value).__name__}')
    return [t for t in column if t]


def _read_file(path: Path) -> list[str]:
    """The documents of one file: one per text file, one per JSONL line, one per parquet row."""
    if path.suffix == ".jsonl":
        texts = _read_jsonl(path)
    elif path.suffix == ".parquet":
        texts = _read_parquet(path)
    else:
        text = _decode_utf8(path.read_bytes(), path)
        texts = [text] if text else []
    return texts


def _files_in(folder: Path) -> list[Path]:
    files, skipped = [], 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in FOLDER_SUFFIXES:
            files.append(path)
        else:
            skipped += 1
    if skipped:
        logger.info("%s: skipped %d files not ending in %s", folder, skipped, ", ".join(FOLDER_SUFFIXES))
    return files


def source_files(data: str | os.PathLike | None) -> list[Path]:
    """The files read_texts(data) reads, in its order: default_corpus() for None, the file itself, or a folder's
    files (see read_texts). Raises FileNotFoundError when ``data`` does not exist."""
    if data is None:
        return default_corpus()
    path = Path(data)
    if path.is_dir():
        return _files_in(path)
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"data path {path} does not exist")


def read_texts(path: str | os.PathLike | None) -> list[str]:
    """Documents from ``path``: None -> default_corpus(); a text file (one document); a folder (recursively,
    sorted, files ending in .txt .md .rst .py .text .jsonl .parquet, hidden ones skipped, empty files skipped);
    a ``.jsonl`` file with a string "text" field per line; a ``.parquet`` file with a "text" column.
    Raises ValueError naming the file for invalid UTF-8 (with byte offset), a JSONL line without "text" (with
    line number), or when a file or the whole set holds no text."""
    return _texts_of(path, source_files(path))


def _texts_of(data: str | os.PathLike | None, files: list[Path]) -> list[str]:
    """read_texts(data) given its source_files(data)."""
    if data is not None and Path(data).is_file():
        texts = _read_file(files[0])
        if not texts:
            raise ValueError(f"{data}: no text (the file is empty or all its documents are)")
        return texts
    where = "the default corpus" if data is None else str(data)
    texts = [text for file in files for text in _read_file(file)]
    if not texts:
        raise ValueError(f"{where}: no text found (no non-empty files ending in {', '.join(FOLDER_SUFFIXES)})")
    return texts


def token_dtype(vocab_size: int) -> np.dtype:
    """np.uint16 when every id fits (vocab_size <= 65536), else np.uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _tokenizer_for(texts: list[str], kind: str, vocab_size: int | None, tokenizer_path) -> Tokenizer:
    if tokenizer_path is not None and (Path(tokenizer_path) / META_FILE).is_file():
        tokenizer = load_tokenizer(tokenizer_path)  # a tokenizer saved earlier, e.g. with a checkpoint
        if tokenizer.kind != kind:
            raise ValueError(f"tokenizer_path {tokenizer_path} holds a {tokenizer.kind!r} tokenizer, not {kind!r}")
        if vocab_size is not None and vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} but the tokenizer in {tokenizer_path} has {tokenizer.vocab_size} tokens"
            )
        return tokenizer
    text = "".join(texts) if kind in ("char", "bpe") else None
    name_or_path = None if tokenizer_path is None else str(tokenizer_path)
    return build_tokenizer(kind, text=text, vocab_size=vocab_size, name_or_path=name_or_path)


def _prepared_meta(out_dir: Path) -> tuple[dict | None, str | None]:
    """(meta.json's dict, None) when ``out_dir`` is a complete prepared-data folder with a fingerprint; (None, None)
    when it does not exist or is empty; else (None, why it is not one)."""
    if not out_dir.exists():
        return None, None
    if not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory; choose a folder to prepare into")
    if not any(out_dir.iterdir()):
        return None, None
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        return None, "it has no meta.json, so it is not a prepared-data folder"
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "its meta.json is not valid JSON"
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), dict):
        return None, "its meta.json records no source fingerprint (it was prepared by an older version)"
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        complete = (out_dir / "tokenizer" / META_FILE).is_file() and all(
            (out_dir / f"{s}.bin").is_file() and (out_dir / f"{s}.bin").stat().st_size == meta[f"{s}_tokens"] * itemsize
            for s in ("train", "val"))
    except (KeyError, TypeError, ValueError):
        complete = False
    if not complete:
        return None, "its token files or tokenizer do not match its meta.json"
    return meta, None


def _tokenize(texts: list[str], tokenizer: Tokenizer, where, tokenizer_path, val_fraction: float,
              eos_between_docs: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """(train tokens, val tokens, whether an end-of-text id separates documents): the documents encoded and
    joined, split nanoGPT's way (the first int(n * (1 - val_fraction)) tokens are train)."""
    dtype = token_dtype(tokenizer.vocab_size)
    use_eos = eos_between_docs and tokenizer.eos_token_id is not None
    if eos_between_docs and not use_eos:
        logger.info("tokenizer %r has no end-of-text token: documents are concatenated without one", tokenizer.kind)
    eos = np.array([tokenizer.eos_token_id], dtype=dtype) if use_eos else None
    pieces = []
    for i, text in enumerate(texts):
        if eos is not None and i > 0:
            pieces.append(eos)
        try:
            pieces.append(np.asarray(tokenizer.encode(text), dtype=dtype))
        except ValueError as e:  # a reused tokenizer (tokenizer_path) that does not cover this text
            by = f"the {tokenizer.kind} tokenizer" + (f" from {tokenizer_path}" if tokenizer_path is not None else "")
            raise ValueError(f"{where}: {e}; {by} cannot encode this text: use text it covers or another "
                             "tokenizer") from None
    tokens = np.concatenate(pieces)
    n_train = int(len(tokens) * (1.0 - val_fraction))
    train, val = tokens[:n_train], tokens[n_train:]
    if len(train) < 2 or (val_fraction > 0 and len(val) < 2):
        raise ValueError(
            f"{where}: {len(tokens)} tokens are too few to split with val_fraction={val_fraction} "
            f"(train {len(train)}, val {len(val)}; each needs at least 2); use more data"
        )
    return train, val, use_eos


def prepare(
    data: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    tokenizer_kind: str = "bytes",
    vocab_size: int | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    eos_between_docs: bool = True,
    overwrite: bool = False,
) -> dict:
    """Tokenize ``data`` (see read_texts; None -> the default corpus) once into ``out_dir``; return meta.json's dict.

    The tokenizer is built by ``build_tokenizer(tokenizer_kind, ...)``: char and bpe are trained on the
    concatenated documents; ``tokenizer_path`` is the tiktoken name/file or hf directory, or a directory a
    tokenizer was saved to (then that tokenizer is reused, e.g. to evaluate a checkpoint on new data).
    The split is nanoGPT's: of n tokens, the first int(n * (1 - val_fraction)) are train, the rest val.
    With ``eos_between_docs`` the tokenizer's end-of-text id separates documents; tokenizers without one
    (bytes, char keep their exact vocabularies) concatenate documents, which is logged and recorded as
    ``"eos_between_docs": false`` in meta.json.

    meta.json records a fingerprint (data_fingerprint: every source file's size, mtime and sha256, and these
    tokenizer settings). When ``out_dir`` already holds data with an equal fingerprint nothing is written and its
    meta.json's dict is returned. A missing or empty ``out_dir`` is prepared; any other (another source, changed
    files, other settings, an older meta.json without a fingerprint, unrelated files) raises FileExistsError and is
    left as it is, unless ``overwrite``: then it is replaced, and the log says why. The folder is built in a
    temporary sibling and renamed into place, so ``out_dir`` holds the old data or the new, never a mix, and the
    temporary folder is removed on any failure.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    out_dir = Path(out_dir)
    where = "the default corpus" if data is None else data
    files = source_files(data)
    settings = {"tokenizer": tokenizer_kind, "vocab_size": vocab_size,
                "tokenizer_path": None if tokenizer_path is None else str(tokenizer_path),
                "val_fraction": val_fraction, "eos_between_docs": eos_between_docs}
    old, why = _prepared_meta(out_dir)
    fingerprint = source_fingerprint(data, files, settings, previous=old and old["fingerprint"])
    if old is not None:
        why = describe_change(old["fingerprint"], fingerprint)
        if why is None:
            logger.info("reusing the prepared data in %s (%s and the tokenizer settings are unchanged)", out_dir, where)
            return old  # nothing is written, not even moved mtimes: a reused folder may be read-only
    if why is not None and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty and holds no data prepared from {where} with these settings: "
                              f"{why}; nothing was changed. Pass --overwrite (overwrite=True) to replace it, or "
                              f"choose another output folder")
    if why is not None:
        logger.info("%s: %s; preparing again, replacing it", out_dir, why)
    else:
        logger.info("preparing %s with the %s tokenizer into %s", where, tokenizer_kind, out_dir)

    texts = _texts_of(data, files)
    tokenizer = _tokenizer_for(texts, tokenizer_kind, vocab_size, tokenizer_path)
    train, val, use_eos = _tokenize(texts, tokenizer, where, tokenizer_path, val_fraction, eos_between_docs)
    dtype = train.dtype
    meta = {
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "tokenizer": tokenizer.kind,
        "source": "default_corpus" if data is None else str(data),
        "documents": len(texts),
        "eos_between_docs": use_eos,
        "eos_token_id": tokenizer.eos_token_id,
        "val_fraction": val_fraction,
        "fingerprint": fingerprint,
    }
    with atomic_directory(out_dir) as tmp:  # renamed to out_dir only once every file is written
        for name, split in (("train.bin", train), ("val.bin", val)):
            with open(tmp / name, "wb") as f:
                split.tofile(f)
        tokenizer.save(tmp / "tokenizer")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if why is not None:
        logger.info("replaced %s with %d train and %d val tokens from %s", out_dir, len(train), len(val), where)
    return meta


class TokenDataset:
    """One split of a prepared directory, memory-mapped.

    ``get_batch`` draws random windows from a CPU ``torch.Generator`` (save ``generator.get_state()`` to resume
    the same data order); ``iter_eval_batches`` walks fixed, non-overlapping windows spread over the split.
    """

    def __init__(self, prepared_dir: str | os.PathLike, split: str):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
        prepared_dir = Path(prepared_dir)
        meta_path = prepared_dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: run `minimax-gpt prepare` (data.prepare) first")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e}); prepare the data again") from None
        if not isinstance(self.meta, dict) or not {"vocab_size", "dtype", f"{split}_tokens"} <= set(self.meta):
            raise ValueError(f"{meta_path}: not a prepared-data description (needs vocab_size, dtype and "
                             f"{split}_tokens); prepare the data again")
        self.prepared_dir, self.split = prepared_dir, split
        self.vocab_size: int = self.meta["vocab_size"]
        path, dtype = prepared_dir / f"{split}.bin", np.dtype(self.meta["dtype"])
        expected = self.meta[f"{split}_tokens"]
        if path.stat().st_size != expected * dtype.itemsize:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, meta.json says {expected} {dtype.name} tokens")
        self.tokens: np.ndarray = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)

    def __len__(self) -> int:
        return len(self.tokens)

    def check_length(self, seq_len: int) -> None:
        """Raise ValueError (naming the prepared directory and its source) unless one window of seq_len + 1 fits."""
        if len(self.tokens) < seq_len + 1:
            raise ValueError(
                f"{self.split} split of {self.prepared_dir} (from {self.meta.get('source', '?')}) has "
                f"{len(self.tokens)} tokens, fewer than one sequence of seq_len + 1 = {seq_len + 1}; use more data, "
                f"a shorter seq_len or a different val_fraction"
            )

    def _windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
        xy = torch.from_numpy(self.tokens[index].astype(np.int64))  # (B, T+1)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    def get_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (B, T) on CPU; B random window starts drawn from ``generator``; y[:, t] = x[:, t + 1]."""
        self.check_length(seq_len)
        starts = torch.randint(len(self.tokens) - seq_len, (batch_size,), generator=generator).numpy()
        return self._windows(starts, seq_len)

    def eval_windows(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> np.ndarray:
        """Indices k of the evaluation windows tokens[k*T : k*T + T + 1], increasing. The split holds
        n = (len - 1) // T non-overlapping windows; uncapped (max_batches None) every one is used. Capped at
        m = max_batches * batch_size < n windows, the split is cut into m equal stretches and the window in the
        middle of each is used, window (2i + 1) * n // (2m) for i < m: the capped evaluation covers the start,
        middle and end of the split alike, not only its start (a text's opening is not typical of the whole)."""
        if batch_size < 1 or (max_batches is not None and max_batches < 1):
            raise ValueError(f"need batch_size >= 1 and max_batches None or >= 1; got {batch_size}, {max_batches}")
        self.check_length(seq_len)
        n_windows = (len(self.tokens) - 1) // seq_len
        n_used = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
        return (2 * np.arange(n_used) + 1) * n_windows // (2 * n_used)  # consecutive ones >= 1 apart

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, non-overlapping windows in order, window k being tokens[k*T : k*T + T + 1]: every window of the
        split, or with max_batches at most max_batches * batch_size of them spread evenly over the whole split
        (see ``eval_windows``). Every batch has batch_size rows except possibly the last."""
        windows = self.eval_windows(batch_size, seq_len, max_batches)
        for first in range(0, len(windows), batch_size):
            yield self._windows(windows[first : first + batch_size] * seq_len, seq_len)

    def shard(self, rank: int, world_size: int) -> TokenDataset:
        """Rank ``rank``'s contiguous 1/world_size of the tokens (the n % world_size tail tokens are unused)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
        size = len(self.tokens) // world_size
        shard = copy.copy(self)
        shard.tokens = self.tokens[rank * size : (rank + 1) * size]
        return shard
