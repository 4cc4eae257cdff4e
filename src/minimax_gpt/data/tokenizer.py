"""Tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size``, ``eos_token_id``, ``save``.

Kinds (``build_tokenizer(kind, ...)``):

=========  ==========================================================================  =============
kind       vocabulary                                                                  end-of-text
=========  ==========================================================================  =============
bytes      the 256 byte values of UTF-8 (the default; exact, no special tokens)        None
char       the sorted set of characters of a training text                             None
bpe        byte-level BPE trained locally on a text with the Hugging Face                ``<|endoftext|>``
           ``tokenizers`` library (256 byte symbols + merges + ``<|endoftext|>``)
tiktoken   an OpenAI encoding from tiktoken's local cache, or a local ``.tiktoken``      ``<|endoftext|>``
           file
hf         a local directory holding a Hugging Face ``tokenizer.json``                 from the files
=========  ==========================================================================  =============

Nothing here downloads. ``save(directory)`` writes the vocabulary files and ``tokenizer_meta.json``;
``load_tokenizer(directory)`` reads them back by parsing JSON and plain-text files only (nothing is
executed or unpickled), so a checkpoint carries a tokenizer that loads on a machine without network or
tiktoken cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from minimax_gpt.atomic import atomic_directory

TOKENIZER_KINDS = ("bytes", "char", "bpe", "tiktoken", "hf")
META_FILE = "tokenizer_meta.json"
EOS_TOKEN = "<|endoftext|>"

# tiktoken's own encodings: name -> (file URL as tiktoken caches it, its sha256). tiktoken keys its cache
# by the sha1 of the URL; the hash is checked here so that a corrupt cache entry raises instead of making
# tiktoken delete it and download again. "gpt2" is left out: it is stored as two data-gym files and has
# the same tokens as r50k_base.
_OPENAI_URL = "https://openaipublic.blob.core.windows.net/encodings/"
_TIKTOKEN_FILES = {
    "r50k_base": ("r50k_base.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    "p50k_base": ("p50k_base.tiktoken", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"),
    "p50k_edit": ("p50k_base.tiktoken", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"),
    "cl100k_base": ("cl100k_base.tiktoken", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    "o200k_base": ("o200k_base.tiktoken", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
    "o200k_harmony": ("o200k_base.tiktoken", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}

# Split pattern used with a local .tiktoken file: the o200k_base pattern (tiktoken_ext.openai_public), the
# one of the 200k-vocabulary encoding this project is designed around.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# end-of-text names looked for in a Hugging Face tokenizer without a tokenizer_config.json
_HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


class Tokenizer(ABC):
    """A text <-> token id mapping. ``encode`` never adds special tokens (nor turns text that spells one into its
    id); ``decode`` maps ids back, replacing invalid UTF-8 with U+FFFD."""

    kind: str
    vocab_size: int  # ids are in [0, vocab_size)
    eos_token_id: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def _meta(self) -> dict:
        """Fields of tokenizer_meta.json beyond kind, vocab_size and eos_token_id."""

    def _write_files(self, directory: Path) -> None:
        """Write vocabulary files other than tokenizer_meta.json (none by default)."""

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer into ``directory`` (replacing it): files go to a temporary sibling, which is
        renamed into place, so an interrupted save never leaves a half-written tokenizer under that name."""
        with atomic_directory(directory) as tmp:
            self._write_files(tmp)
            meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id}
            (tmp / META_FILE).write_text(json.dumps(meta | self._meta(), indent=2, ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        name, eos = type(self).__name__, self.eos_token_id
        return f"{name}(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_token_id={eos})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: token id == byte value, vocabulary exactly 256, no special tokens."""

    kind = "bytes"
    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte tokenizer: ids must be in [0, 256), got {bad[:5]}")
        return bytes(ids).decode("utf-8", errors="replace")

    def _meta(self) -> dict:
        return {}


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (nanoGPT's shakespeare_char): ids follow sorted order."""

    kind = "char"
    eos_token_id = None

    def __init__(self, chars: list[str]):
        if not chars:
            raise ValueError("char tokenizer: the alphabet is empty (the training text has no characters)")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("char tokenizer: the alphabet must be distinct single characters")
        self.chars = list(chars)
        self.vocab_size = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"char tokenizer: character {e.args[0]!r} (U+{ord(e.args[0]):04X}) is not in the vocabulary "
                f"of {self.vocab_size} characters built from the training text"
            ) from None

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"char tokenizer: ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return "".join(self.chars[i] for i in ids)

    def _meta(self) -> dict:
        return {"chars": self.chars}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (kinds "bpe" — trained here — and "hf" — loaded from a directory).

    Like tiktoken's ``encode_ordinary``, text that spells a special token ("<|endoftext|>") is encoded as
    ordinary text, so a document can never inject an end-of-text id; special ids only come from the caller.
    """

    def __init__(self, tokenizer, kind: str, eos_token_id: int | None, source: str | None = None):
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.kind = kind
        self.eos_token_id = eos_token_id
        self.source = source
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _write_files(self, directory: Path) -> None:
        self.tokenizer.save(str(directory / "tokenizer.json"))

    def _meta(self) -> dict:
        return {"source": self.source}


class TiktokenTokenizer(Tokenizer):
    """A ``tiktoken.Encoding``; encodes special-token text as ordinary text (``encode_ordinary``)."""

    kind = "tiktoken"

    def __init__(self, name: str, pat_str: str, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int]):
        import tiktoken

        self.name, self.pat_str = name, pat_str
        self.mergeable_ranks, self.special_tokens = mergeable_ranks, special_tokens
        self.encoding = tiktoken.Encoding(
            name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.vocab_size = self.encoding.n_vocab
        self.eos_token_id = special_tokens.get(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def _write_files(self, directory: Path) -> None:
        (directory / "encoding.tiktoken").write_bytes(_dump_tiktoken_ranks(self.mergeable_ranks))

    def _meta(self) -> dict:
        return {"name": self.name, "pat_str": self.pat_str, "special_tokens": self.special_tokens}


def _parse_tiktoken_ranks(contents: bytes, source: str) -> dict[bytes, int]:
    """The .tiktoken format: one ``<base64 token> <rank>`` per line (what tiktoken.load.load_tiktoken_bpe reads;
    parsed here because load_tiktoken_bpe also copies every local file into tiktoken's cache)."""
    ranks = {}
    for lineno, line in enumerate(contents.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{source}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}") from None
    if not ranks:
        raise ValueError(f"{source}: no tokens in the .tiktoken file")
    return ranks


def _dump_tiktoken_ranks(ranks: dict[bytes, int]) -> bytes:
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    lines = (base64.b64encode(token) + b" " + str(rank).encode() for token, rank in by_rank)
    return b"\n".join(lines) + b"\n"


def tiktoken_cache_dir() -> str:
    """Where tiktoken caches encoding files (same rule as tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _tiktoken_from_cache(name: str) -> TiktokenTokenizer:
    """An OpenAI encoding, only when tiktoken's cache already holds its file (never downloads)."""
    url = _OPENAI_URL + _TIKTOKEN_FILES[name][0]
    cache_dir = tiktoken_cache_dir()
    cache_path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()) if cache_dir else ""
    if not cache_path or not os.path.isfile(cache_path):
        raise FileNotFoundError(
            f"tiktoken encoding {name!r} is not in tiktoken's cache ({cache_dir or 'caching disabled'!s}; expected "
            f"{cache_path or 'a cache file'} for {url}); this project never downloads. Copy the cache from a machine "
            f"where `tiktoken.get_encoding({name!r})` has run, set TIKTOKEN_CACHE_DIR, or pass a local .tiktoken file"
        )
    contents = Path(cache_path).read_bytes()
    if hashlib.sha256(contents).hexdigest() != _TIKTOKEN_FILES[name][1]:
        raise ValueError(f"tiktoken cache file {cache_path} for {name!r} is corrupt (sha256 mismatch); delete it")
    import tiktoken

    # the cache entry is present and valid, so tiktoken reads it instead of downloading
    encoding = tiktoken.get_encoding(name)
    # pattern and special tokens of OpenAI's encodings are only reachable through these attributes
    ranks = _parse_tiktoken_ranks(contents, cache_path)
    return TiktokenTokenizer(name, encoding._pat_str, ranks, dict(encoding._special_tokens))


def _tiktoken_from_file(path: Path) -> TiktokenTokenizer:
    """A local .tiktoken file with the o200k_base split pattern and ``<|endoftext|>`` after the last rank."""
    ranks = _parse_tiktoken_ranks(path.read_bytes(), str(path))
    return TiktokenTokenizer(f"file:{path.stem}", O200K_PATTERN, ranks, {EOS_TOKEN: max(ranks.values()) + 1})


def _train_bpe(text: str, vocab_size: int) -> HFTokenizer:
    from tokenizers import Tokenizer as HFCoreTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFCoreTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    return HFTokenizer(tokenizer, "bpe", tokenizer.token_to_id(EOS_TOKEN), source="trained")


def _hf_eos_token_id(tokenizer, directory: Path) -> int | None:
    config = directory / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            return tokenizer.token_to_id(eos)
    for candidate in _HF_EOS_CANDIDATES:
        if tokenizer.token_to_id(candidate) is not None:
            return tokenizer.token_to_id(candidate)
    return None


def _hf_from_path(name_or_path: str) -> HFTokenizer:
    from tokenizers import Tokenizer as HFCoreTokenizer

    path = Path(name_or_path)
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"hf tokenizer: {name_or_path!r} is not a local directory with a tokenizer.json (nothing is downloaded; "
            f"save one with `AutoTokenizer.from_pretrained(...).save_pretrained(DIR)` where there is network)"
        )
    tokenizer = HFCoreTokenizer.from_file(str(file))
    return HFTokenizer(tokenizer, "hf", _hf_eos_token_id(tokenizer, file.parent), source=str(path))


def build_tokenizer(
    kind: str = "bytes", text: str | None = None, vocab_size: int | None = None, name_or_path: str | None = None
) -> Tokenizer:
    """Build a tokenizer of ``kind``.

    bytes: no arguments. char: ``text`` (its sorted set of characters). bpe: ``text`` and ``vocab_size`` (>= 257:
    the 256 byte symbols and ``<|endoftext|>``; a small text may yield fewer). tiktoken: ``name_or_path`` is an
    encoding name found in tiktoken's cache or a local ``.tiktoken`` file. hf: ``name_or_path`` is a local
    directory with ``tokenizer.json``. ``vocab_size`` only sizes a BPE being trained; for other kinds it must be
    None or equal to the resulting vocabulary size.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {', '.join(TOKENIZER_KINDS)}; got {kind!r}")
    if name_or_path is not None and kind not in ("tiktoken", "hf"):
        raise ValueError(f"tokenizer {kind!r} takes no name_or_path (got {name_or_path!r}); only tiktoken and hf do")
    if kind in ("char", "bpe") and not text:
        raise ValueError(f"tokenizer {kind!r} is built from a training text; none (or an empty one) was given")
    if kind == "bpe":
        if vocab_size is None or vocab_size < 257:
            raise ValueError(f"bpe tokenizer: vocab_size must be >= 257 (256 bytes + <|endoftext|>); got {vocab_size}")
        return _train_bpe(text, vocab_size)

    if kind == "bytes":
        tokenizer = ByteTokenizer()
    elif kind == "char":
        tokenizer = CharTokenizer.from_text(text)
    else:
        if not name_or_path:
            raise ValueError(f"tokenizer {kind!r} needs name_or_path")
        if kind == "hf":
            tokenizer = _hf_from_path(name_or_path)
        elif Path(name_or_path).is_file():
            tokenizer = _tiktoken_from_file(Path(name_or_path))
        elif name_or_path in _TIKTOKEN_FILES:
            tokenizer = _tiktoken_from_cache(name_or_path)
        else:
            raise ValueError(
                f"tiktoken: {name_or_path!r} is neither a local .tiktoken file nor one of the encodings "
                f"{', '.join(_TIKTOKEN_FILES)}"
            )
    if vocab_size is not None and vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} was given, but the {kind!r} tokenizer has {tokenizer.vocab_size} tokens; "
            f"vocab_size only sets the size of a BPE tokenizer being trained"
        )
    return tokenizer


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load what ``Tokenizer.save`` wrote (JSON and .tiktoken text only; nothing is executed or unpickled)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no {META_FILE} in {directory}: not a saved tokenizer")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{meta_path}: not a JSON tokenizer description ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    kind = meta.get("kind")
    if kind == "bytes":
        tokenizer = ByteTokenizer()
    elif kind == "char":
        tokenizer = CharTokenizer(meta["chars"])
    elif kind in ("bpe", "hf"):
        from tokenizers import Tokenizer as HFCoreTokenizer

        try:
            core = HFCoreTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception for unparsable files
            raise ValueError(f"{directory / 'tokenizer.json'}: not a readable tokenizer.json ({e})") from None
        tokenizer = HFTokenizer(core, kind, meta["eos_token_id"], source=meta.get("source"))
    elif kind == "tiktoken":
        path = directory / "encoding.tiktoken"
        ranks = _parse_tiktoken_ranks(path.read_bytes(), str(path))
        tokenizer = TiktokenTokenizer(meta["name"], meta["pat_str"], ranks, meta["special_tokens"])
    else:
        raise ValueError(f"{meta_path}: kind must be one of {', '.join(TOKENIZER_KINDS)}; got {kind!r}")
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise ValueError(
            f"{meta_path}: vocab_size {meta['vocab_size']} does not match the files ({tokenizer.vocab_size})"
        )
    return tokenizer
