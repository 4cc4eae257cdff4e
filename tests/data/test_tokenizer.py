import base64
import hashlib
import json

import pytest

from minimax_gpt.data.tokenizer import (
    TOKENIZER_KINDS,
    build_tokenizer,
    load_tokenizer,
    tiktoken_cache_dir,
)

SAMPLE = "def f(x):\n    return x + 1  # naïve café, 東京, emoji 🙂\n"
TRAIN_TEXT = (
    "the quick brown fox jumps over the lazy dog. "
    "def train(model, data):\n    for batch in data:\n        loss = model(batch)\n        loss.backward()\n"
    "Lightning attention and softmax attention alternate in the hybrid model. "
) * 40


def _tiny_tiktoken_file(path):
    """All 256 bytes (ranks 0..255) plus merges t+h, th+e, space+t, i+n."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"th", b"the", b" t", b"in"):
        ranks[token] = len(ranks)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return ranks


def _tiny_hf_dir(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "!": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(cleanup=False)  # joins words with spaces
    tok.add_special_tokens(["</s>"])
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


def test_bytes_round_trip_non_ascii():
    tok = build_tokenizer("bytes")
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert tok.vocab_size == 256 and tok.eos_token_id is None and tok.kind == "bytes"
    assert tok.decode(ids) == SAMPLE
    assert tok.decode([0xE6]) == "\ufffd"  # a partial UTF-8 sequence decodes to the replacement character


def test_char_round_trip_and_unknown_character():
    tok = build_tokenizer("char", text="hello world")
    assert tok.vocab_size == len(set("hello world")) and tok.encode("he") == [3, 2]  # sorted: ' ', d, e, h, ...
    assert tok.decode(tok.encode("low drew")) == "low drew"
    with pytest.raises(ValueError, match=r"'z'.*not in the vocabulary"):
        tok.encode("zoo")
    with pytest.raises(ValueError, match="training text"):
        build_tokenizer("char")


def test_bpe_trains_offline_and_round_trips():
    tok = build_tokenizer("bpe", text=TRAIN_TEXT, vocab_size=300)
    assert tok.kind == "bpe" and tok.vocab_size == 300
    assert tok.decode([tok.eos_token_id]) == "<|endoftext|>"
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE  # byte-level: any text, including unseen characters
    assert len(tok.encode("the lazy dog")) < len("the lazy dog".encode())  # merges were learned
    assert max(ids) < 300 and tok.encode("<|endoftext|>") != [tok.eos_token_id]  # text never becomes eos
    again = build_tokenizer("bpe", text=TRAIN_TEXT, vocab_size=300)
    assert again.encode(TRAIN_TEXT[:500]) == tok.encode(TRAIN_TEXT[:500])  # deterministic training
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        build_tokenizer("bpe", text=TRAIN_TEXT, vocab_size=100)


def test_tiktoken_from_local_file(tmp_path):
    ranks = _tiny_tiktoken_file(tmp_path / "tiny.tiktoken")
    tok = build_tokenizer("tiktoken", name_or_path=str(tmp_path / "tiny.tiktoken"))
    assert tok.vocab_size == len(ranks) + 1 and tok.eos_token_id == len(ranks)
    assert tok.encode("the") == [ranks[b"the"]]
    # " the" is one pre-token; the lowest-rank pair merges first: t+h, then th+e (" t" never forms)
    assert tok.encode("in the") == [ranks[b"in"], ord(" "), ranks[b"the"]]
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.decode([tok.eos_token_id]) == "<|endoftext|>"


def test_tiktoken_named_encoding_needs_cache_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert tiktoken_cache_dir() == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="o200k_base.*not in tiktoken's cache.*never downloads"):
        build_tokenizer("tiktoken", name_or_path="o200k_base")
    # a corrupt cache entry is reported, not deleted and fetched again
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        build_tokenizer("tiktoken", name_or_path="o200k_base")
    with pytest.raises(ValueError, match="neither a local .tiktoken file nor one of the encodings"):
        build_tokenizer("tiktoken", name_or_path="no_such_encoding")


def test_tiktoken_o200k_from_real_cache_when_present(tmp_path):
    try:
        tok = build_tokenizer("tiktoken", name_or_path="o200k_base")
    except FileNotFoundError:
        pytest.skip(f"o200k_base is not in tiktoken's cache at {tiktoken_cache_dir()} (no download is attempted)")
    assert tok.vocab_size == 200019 and tok.eos_token_id == 199999
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    tok.save(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").encode(SAMPLE) == tok.encode(SAMPLE)


def test_hf_from_local_directory(tmp_path):
    _tiny_hf_dir(tmp_path / "hf")
    tok = build_tokenizer("hf", name_or_path=str(tmp_path / "hf"))
    assert tok.kind == "hf" and tok.vocab_size == 5 and tok.eos_token_id == 1
    assert tok.encode("hello world !") == [2, 3, 4]
    assert tok.decode(tok.encode("hello world !")) == "hello world !"
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tokenizer("hf", name_or_path=str(tmp_path / "missing"))


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_save_load_round_trip(kind, tmp_path):
    args = {
        "bytes": {},
        "char": {"text": SAMPLE},
        "bpe": {"text": TRAIN_TEXT + SAMPLE, "vocab_size": 300},
        "tiktoken": {"name_or_path": str(tmp_path / "tiny.tiktoken")},
        "hf": {"name_or_path": str(tmp_path / "hf")},
    }[kind]
    _tiny_tiktoken_file(tmp_path / "tiny.tiktoken")
    _tiny_hf_dir(tmp_path / "hf")
    text = "hello world !" if kind == "hf" else SAMPLE
    tok = build_tokenizer(kind, **args)
    tok.save(tmp_path / "saved")
    tok.save(tmp_path / "saved")  # saving over an existing tokenizer replaces it
    assert json.loads((tmp_path / "saved" / "tokenizer_meta.json").read_text())["kind"] == kind
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    loaded = load_tokenizer(tmp_path / "saved")
    assert (loaded.kind, loaded.vocab_size, loaded.eos_token_id) == (tok.kind, tok.vocab_size, tok.eos_token_id)
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text


def test_unknown_kind_and_misplaced_arguments():
    with pytest.raises(ValueError, match="bytes, char, bpe, tiktoken, hf.*'sentencepiece'"):
        build_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="vocab_size only sets the size of a BPE"):
        build_tokenizer("bytes", vocab_size=1000)
    with pytest.raises(ValueError, match="takes no name_or_path"):
        build_tokenizer("bytes", name_or_path="gpt2")


def test_load_rejects_missing_or_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps({"kind": "pickle", "vocab_size": 1}))
    with pytest.raises(ValueError, match="kind must be one of"):
        load_tokenizer(tmp_path)
