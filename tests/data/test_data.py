import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from minimax_gpt.data.dataset import TokenDataset, default_corpus, prepare, read_texts, token_dtype
from minimax_gpt.data.tokenizer import load_tokenizer

DOCS = ["first document\n", "second döcument, with ünïcode\n", "third one 🙂\n"]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _prepared(tmp_path, n_tokens=2000, **kwargs):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(n_tokens))
    (tmp_path / "data.txt").write_text(text)
    meta = prepare(tmp_path / "data.txt", tmp_path / "prepared", **kwargs)
    return tmp_path / "prepared", text, meta


# --- reading -------------------------------------------------------------------------------------------


def test_read_text_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    assert read_texts(tmp_path / "a.txt") == [DOCS[0]]
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text(DOCS[1], encoding="utf-8")
    (folder / "sub" / "a.py").write_text(DOCS[2], encoding="utf-8")
    (folder / "c.txt").write_text("", encoding="utf-8")  # empty files in a folder are skipped
    (folder / "image.png").write_bytes(b"\x89PNG")  # other suffixes are skipped
    (folder / ".hidden.txt").write_text("secret")
    _write_jsonl(folder / "d.jsonl", [{"text": "from jsonl"}])
    assert read_texts(folder) == [DOCS[1], "from jsonl", DOCS[2]]  # sorted: b.md, c.txt, d.jsonl, sub/a.py


def test_read_jsonl_and_missing_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write_jsonl(path, [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    assert read_texts(path) == DOCS
    _write_jsonl(path, [{"text": "ok"}, {"text": "ok"}, {"content": "no text field"}])
    with pytest.raises(ValueError, match=r"docs\.jsonl:3: .*\"text\""):
        read_texts(path)
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: invalid JSON"):
        read_texts(path)


def test_read_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install pyarrow)")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS, "id": [0, 1, 2]}), tmp_path / "docs.parquet")
    assert read_texts(tmp_path / "docs.parquet") == DOCS
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: no \"text\" column \(columns: body\)"):
        read_texts(tmp_path / "bad.parquet")


def test_empty_inputs_are_errors_naming_the_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt: no text"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="folder: no text found"):
        read_texts(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")


def test_invalid_utf8_names_file_and_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("abc café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: invalid UTF-8 at byte offset 7"):
        read_texts(tmp_path / "latin1.txt")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid UTF-8 at byte offset 28"):
        read_texts(tmp_path / "bad.jsonl")


def test_default_corpus_is_stdlib_sorted_capped_and_deterministic():
    files = default_corpus()
    assert files == default_corpus() and len(files) > 50
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(stdlib).as_posix() for f in files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/"))
    assert 1_000_000 < sum(f.stat().st_size for f in files) <= 4 * 2**20


# --- prepare -------------------------------------------------------------------------------------------


def test_prepare_writes_token_files_and_meta(tmp_path):
    out, text, meta = _prepared(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 256 and meta["tokenizer"] == "bytes"
    assert (meta["train_tokens"], meta["val_tokens"]) == (1800, 200)  # nanoGPT: int(n * 0.9) train, rest val
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert bytes(np.concatenate([train, val]).astype(np.uint8)).decode() == text  # the split is the stream's tail
    assert load_tokenizer(out / "tokenizer").kind == "bytes"
    assert prepare(tmp_path / "data.txt", tmp_path / "again") == meta  # deterministic
    assert (tmp_path / "again" / "val.bin").read_bytes() == (out / "val.bin").read_bytes()


def test_prepare_separates_documents_with_eos(tmp_path):
    _write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS * 20])
    meta = prepare(tmp_path / "docs.jsonl", tmp_path / "out", tokenizer_kind="bpe", vocab_size=300, val_fraction=0.2)
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    stream = np.concatenate([np.fromfile(tmp_path / "out" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert meta["eos_between_docs"] and int((stream == tok.eos_token_id).sum()) == len(DOCS) * 20 - 1
    assert tok.decode(stream.tolist()) == "<|endoftext|>".join(DOCS * 20)
    # the bytes tokenizer has no end-of-text id: documents are concatenated, and meta.json says so
    assert prepare(tmp_path / "docs.jsonl", tmp_path / "bytes")["eos_between_docs"] is False


def test_prepare_reuses_a_saved_tokenizer(tmp_path):
    out, _, meta = _prepared(tmp_path, tokenizer_kind="char")
    (tmp_path / "new.txt").write_text("abcabc" * 10)
    again = prepare(tmp_path / "new.txt", tmp_path / "eval", tokenizer_kind="char", tokenizer_path=out / "tokenizer")
    assert again["vocab_size"] == meta["vocab_size"] == 26
    (tmp_path / "other.txt").write_text("ABC" * 20)
    with pytest.raises(ValueError, match="'A'.*not in the vocabulary"):
        prepare(tmp_path / "other.txt", tmp_path / "x", tokenizer_kind="char", tokenizer_path=out / "tokenizer")


def test_token_dtype_switches_to_uint32_above_65536():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_064) == np.uint32


def test_prepare_uint32_for_large_vocabulary(tmp_path):
    import base64

    ranks = {bytes([b]): b for b in range(256)} | {b"a" * 2: 70_000}  # sparse ranks: ids up to 70,000
    (tmp_path / "big.tiktoken").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    (tmp_path / "data.txt").write_text("aaaa bbb " * 50)
    meta = prepare(tmp_path / "data.txt", tmp_path / "out", tokenizer_kind="tiktoken",
                   tokenizer_path=tmp_path / "big.tiktoken")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    ds = TokenDataset(tmp_path / "out", "train")
    assert ds.tokens.dtype == np.uint32 and int(ds.tokens.max()) == 70_000


def test_prepare_rejects_bad_arguments(tmp_path):
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(ValueError, match="too few to split"):
        prepare(tmp_path / "tiny.txt", tmp_path / "out")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(tmp_path / "tiny.txt", tmp_path / "out", val_fraction=1.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        prepare(tmp_path / "tiny.txt", tmp_path / "out", tokenizer_kind="words")


# --- TokenDataset --------------------------------------------------------------------------------------


def test_get_batch_is_reproducible_and_shifted(tmp_path):
    out, _, _ = _prepared(tmp_path)
    ds = TokenDataset(out, "train")
    assert len(ds) == 1800 and ds.vocab_size == 256 and isinstance(ds.tokens, np.memmap)
    g = torch.Generator().manual_seed(0)
    x, y = ds.get_batch(4, 16, g)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):  # each row is a window of the token file
        start = next(i for i in range(len(ds) - 16) if np.array_equal(ds.tokens[i : i + 16], row_x.numpy()))
        assert np.array_equal(ds.tokens[start + 1 : start + 17], row_y.numpy())
    state = g.get_state()
    x2, _ = ds.get_batch(4, 16, g)
    assert torch.equal(ds.get_batch(4, 16, torch.Generator().manual_seed(0))[0], x)  # same seed, same batch
    g.set_state(state)
    assert torch.equal(ds.get_batch(4, 16, g)[0], x2)  # a checkpointed generator state resumes the stream


def test_too_short_split_is_an_error(tmp_path):
    out, _, _ = _prepared(tmp_path, n_tokens=100)
    val = TokenDataset(out, "val")
    assert len(val) == 10
    val.get_batch(2, 9, torch.Generator().manual_seed(0))  # 10 tokens hold exactly one (x, y) of length 9
    with pytest.raises(ValueError, match=r"val split .* 10 tokens, fewer than one sequence of seq_len \+ 1 = 11"):
        val.get_batch(2, 10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="split must be"):
        TokenDataset(out, "test")
    with pytest.raises(FileNotFoundError, match="prepare"):
        TokenDataset(tmp_path / "nowhere", "train")


def test_eval_batches_are_deterministic_non_overlapping_windows(tmp_path):
    out, _, _ = _prepared(tmp_path)
    val = TokenDataset(out, "val")  # 200 tokens -> (200 - 1) // 16 = 12 windows
    batches = list(val.iter_eval_batches(5, 16))
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    tokens = torch.from_numpy(val.tokens.astype(np.int64))
    assert torch.equal(x.flatten(), tokens[: 12 * 16]) and torch.equal(y.flatten(), tokens[1 : 12 * 16 + 1])
    assert len(list(val.iter_eval_batches(5, 16, max_batches=2))) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, val.iter_eval_batches(5, 16)))


def test_capped_eval_windows_are_spread_over_the_whole_split(tmp_path):
    out, _, _ = _prepared(tmp_path)
    val = TokenDataset(out, "val")  # 200 tokens -> 12 windows of 16
    tokens = torch.from_numpy(val.tokens.astype(np.int64))
    # 2 batches of 2 = 4 of the 12 windows: the middle one of each quarter of the split
    assert val.eval_windows(2, 16, max_batches=2).tolist() == [1, 4, 7, 10]
    batches = list(val.iter_eval_batches(2, 16, max_batches=2))
    assert [b[0].shape for b in batches] == [(2, 16), (2, 16)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    for row, k in enumerate([1, 4, 7, 10]):  # start, middle and end of the split, in order, not overlapping
        assert torch.equal(x[row], tokens[k * 16 : k * 16 + 16])
        assert torch.equal(y[row], tokens[k * 16 + 1 : k * 16 + 17])
    uncapped = torch.cat([b[0] for b in val.iter_eval_batches(5, 16)])
    assert torch.equal(uncapped.flatten(), tokens[: 12 * 16])  # uncapped: every window
    for cap in (3, 100):  # a cap of at least every window is every window
        assert val.eval_windows(4, 16, max_batches=cap).tolist() == list(range(12))
    for n_windows in range(1, 60):  # any split and cap: increasing, in range, first and last stretch both covered
        val.tokens = np.zeros(n_windows * 16 + 1, dtype=np.uint16)
        for used in range(1, n_windows + 1):
            k = val.eval_windows(1, 16, max_batches=used)
            assert len(k) == used and k[0] >= 0 and k[-1] < n_windows and (np.diff(k) >= 1).all()
            assert k[0] * used < n_windows and k[-1] * used >= n_windows * (used - 1)
    with pytest.raises(ValueError, match="max_batches"):
        val.eval_windows(1, 16, max_batches=0)


def test_shards_are_disjoint_and_contiguous(tmp_path):
    out, _, _ = _prepared(tmp_path)
    ds = TokenDataset(out, "train")  # 1800 tokens
    shards = [ds.shard(r, 4) for r in range(4)]
    assert [len(s) for s in shards] == [450] * 4
    assert np.array_equal(np.concatenate([s.tokens for s in shards]), ds.tokens)
    # disjoint positions: each shard is a view at its own offset of the same memory map
    offsets = [s.tokens.ctypes.data - ds.tokens.ctypes.data for s in shards]
    assert offsets == [r * 450 * 2 for r in range(4)]
    assert shards[1].get_batch(2, 8, torch.Generator().manual_seed(0))[0].shape == (2, 8)
    with pytest.raises(ValueError, match="rank < world_size"):
        ds.shard(4, 4)


# --- errors a training run meets (issue 9) ---------------------------------------------------------------
def test_char_tokenizer_on_invalid_utf8_and_missing_text_field_name_file_and_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"bad\.txt: invalid UTF-8 at byte offset 5"):
        prepare(tmp_path / "bad.txt", tmp_path / "out", tokenizer_kind="char")
    folder = tmp_path / "docs"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", [{"text": "ok"}, {"text": "ok"}])
    _write_jsonl(folder / "b.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(ValueError, match=r"b\.jsonl:2: expected a JSON object with a string \"text\" field"):
        prepare(folder, tmp_path / "out", tokenizer_kind="char")  # one bad line fails the set, naming it
    assert not (tmp_path / "out" / "meta.json").exists()


def test_training_on_a_corpus_shorter_than_one_sequence_fails_before_the_first_step(tmp_path, monkeypatch):
    from minimax_gpt import EnhancedMiniMaxGPT
    from minimax_gpt.training.run_config import load_run_config
    from minimax_gpt.training.trainer import train
    from train_helpers import write_config

    cfg = write_config(tmp_path, tmp_path / "out")
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n")  # 44 chars
    built = []
    monkeypatch.setattr(EnhancedMiniMaxGPT, "__init__", lambda *a, **k: built.append(1))
    # phase 2's seq_len 16 does not fit the 5 validation tokens: reported before the model is built
    with pytest.raises(ValueError, match=r"val split of .*data \(from .*corpus\.txt\) has 5 tokens, fewer than one "
                                         r"sequence of seq_len \+ 1 = 17"):
        train(load_run_config(cfg))
    assert not built
