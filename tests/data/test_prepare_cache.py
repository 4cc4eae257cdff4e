"""Prepared data follows its source: data.prepare keys a folder on the source files' contents and the tokenizer
settings (data_fingerprint), training's out_dir/data is prepared again when they change, and `minimax-gpt prepare`
never replaces a folder it did not prepare from the same source unless --overwrite."""

import json
import logging
import os

import numpy as np
import pytest

import minimax_gpt.data.fingerprint as data_fingerprint
from minimax_gpt.__main__ import main
from minimax_gpt.data.dataset import prepare
from minimax_gpt.training.run_config import TrainConfig
from minimax_gpt.data.tokenizer import Tokenizer
from minimax_gpt.training.trainer import prepare_data

TEXT = "to be or not to be, that is the question\n" * 20


def _tokens(data_dir):
    return np.concatenate([np.fromfile(data_dir / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])


def _snapshot(folder):
    """Every path under folder with its bytes (files) and mtime_ns: equal snapshots = nothing changed."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _hidden_siblings(folder):
    """Temporary siblings atomic.py would leave next to folder (.NAME.tmp-..., .NAME.old-...)."""
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    return tmp_path / "corpus.txt"


def _tc(tmp_path, corpus, **kwargs):
    return TrainConfig(out_dir=str(tmp_path / "out"), data=str(corpus), **kwargs)


# --- training's out_dir/data ----------------------------------------------------------------------------------------


def test_an_edited_source_is_prepared_again_and_the_log_says_what_changed(tmp_path, corpus, caplog):
    caplog.set_level(logging.INFO)
    data_dir = prepare_data(_tc(tmp_path, corpus), tmp_path / "out")
    before = _tokens(data_dir)
    corpus.write_text(TEXT + "whether 'tis nobler\n")
    prepare_data(_tc(tmp_path, corpus), tmp_path / "out")
    after = _tokens(data_dir)
    assert bytes(after.astype(np.uint8)).decode() == TEXT + "whether 'tis nobler\n"  # the new text, not the old
    assert len(after) == len(before) + 20
    assert (f"the source changed since it was prepared (corpus.txt: size {len(TEXT)} -> {len(TEXT) + 20}); "
            "preparing again") in caplog.text
    # same size, other content, mtime moved: the sha256 tells
    caplog.clear()
    corpus.write_text(TEXT.replace("question", "QUESTION") + "whether 'tis nobler\n")
    st = corpus.stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    prepare_data(_tc(tmp_path, corpus), tmp_path / "out")
    assert "(corpus.txt: content changed, same size)" in caplog.text
    assert b"QUESTION" in bytes(_tokens(data_dir).astype(np.uint8))
    assert _hidden_siblings(data_dir) == []


def test_an_identical_source_is_reused_without_tokenizing_or_hashing(tmp_path, corpus, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    data_dir = prepare_data(_tc(tmp_path, corpus), tmp_path / "out")
    snapshot = _snapshot(data_dir)
    hashed = []
    real_sha256 = data_fingerprint.file_sha256
    monkeypatch.setattr(data_fingerprint, "file_sha256", lambda p: hashed.append(p.name) or real_sha256(p))
    monkeypatch.setattr(Tokenizer, "encode", lambda *a: pytest.fail("the reused data was tokenized again"))
    caplog.clear()
    assert prepare_data(_tc(tmp_path, corpus), tmp_path / "out") == data_dir
    assert f"reusing the prepared data in {data_dir}" in caplog.text
    assert hashed == [] and _snapshot(data_dir) == snapshot  # size + mtime unchanged: not even read
    # a moved mtime alone (touch) is no change: hashed again, still reused
    st = corpus.stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert prepare_data(_tc(tmp_path, corpus), tmp_path / "out") == data_dir
    assert hashed == ["corpus.txt"] and _snapshot(data_dir) == snapshot


@pytest.mark.parametrize("change, expected", [
    ({"tokenizer": "char"}, "the tokenizer settings changed since it was prepared (tokenizer 'bytes' -> 'char')"),
    ({"val_fraction": 0.2}, "(val_fraction 0.1 -> 0.2)"),
])
def test_other_tokenizer_settings_prepare_again(tmp_path, corpus, caplog, change, expected):
    caplog.set_level(logging.INFO)
    data_dir = prepare_data(_tc(tmp_path, corpus), tmp_path / "out")
    prepare_data(_tc(tmp_path, corpus, **change), tmp_path / "out")
    assert expected in caplog.text
    meta = json.loads((data_dir / "meta.json").read_text())
    assert all(meta["fingerprint"]["settings"][k] == v for k, v in change.items())
    assert meta["tokenizer"] == change.get("tokenizer", "bytes")


def test_a_meta_json_without_fingerprint_is_prepared_again(tmp_path, corpus, caplog):
    caplog.set_level(logging.INFO)
    data_dir = prepare_data(_tc(tmp_path, corpus), tmp_path / "out")
    meta = json.loads((data_dir / "meta.json").read_text())
    del meta["fingerprint"]  # as written before fingerprints
    (data_dir / "meta.json").write_text(json.dumps(meta))
    prepare_data(_tc(tmp_path, corpus), tmp_path / "out")
    assert "records no source fingerprint (it was prepared by an older version); preparing again" in caplog.text
    assert "fingerprint" in json.loads((data_dir / "meta.json").read_text())


def test_a_folder_source_notices_added_and_removed_files(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.txt").write_text(TEXT.upper())
    data_dir = prepare_data(_tc(tmp_path, folder), tmp_path / "out")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.md").write_text("more text\n" * 10)
    prepare_data(_tc(tmp_path, folder), tmp_path / "out")
    assert "(sub/c.md added)" in caplog.text
    (folder / "b.txt").unlink()
    prepare_data(_tc(tmp_path, folder), tmp_path / "out")
    assert "(b.txt removed)" in caplog.text
    assert bytes(_tokens(data_dir).astype(np.uint8)).decode() == TEXT + "more text\n" * 10


def test_a_failure_while_preparing_again_keeps_the_old_data_and_no_temporary_folder(tmp_path, corpus, monkeypatch):
    data_dir = prepare_data(_tc(tmp_path, corpus), tmp_path / "out")
    snapshot = _snapshot(data_dir)
    corpus.write_text(TEXT * 2)

    def disk_full(self, directory):
        (directory / "partial").mkdir(parents=True)  # something half-written inside the temporary folder
        raise OSError("No space left on device")

    monkeypatch.setattr(Tokenizer, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare_data(_tc(tmp_path, corpus), tmp_path / "out")
    assert _snapshot(data_dir) == snapshot and _hidden_siblings(data_dir) == []
    # a tokenizer error (a saved char tokenizer that lacks a character), before anything is written
    monkeypatch.undo()
    char_dir = tmp_path / "char"
    prepare(corpus, char_dir, tokenizer_kind="char")
    corpus.write_text(TEXT + "Z")
    with pytest.raises(ValueError, match="'Z'"):
        prepare_data(_tc(tmp_path, corpus, tokenizer="char", tokenizer_path=str(char_dir / "tokenizer")),
                     tmp_path / "out")
    assert _snapshot(data_dir) == snapshot and _hidden_siblings(data_dir) == []
    # a fresh folder that fails is not created at all
    monkeypatch.setattr(Tokenizer, "save", disk_full)
    with pytest.raises(OSError):
        prepare(corpus, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and _hidden_siblings(tmp_path / "fresh") == []


# --- minimax-gpt prepare ----------------------------------------------------------------------------------------------


def test_prepare_refuses_a_folder_it_did_not_prepare_and_changes_nothing(tmp_path, corpus, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me\n")
    snapshot = _snapshot(out)
    assert main(["prepare", "--data", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"minimax-gpt prepare: error: {out} is not empty") and "--overwrite" in err[-1]
    assert "no meta.json" in err[-1] and _snapshot(out) == snapshot
    # data prepared from another source (or with other settings) is refused just the same
    assert main(["prepare", "--data", str(corpus), "--out", str(tmp_path / "p")]) == 0
    (tmp_path / "other.txt").write_text(TEXT.upper())
    snapshot = _snapshot(tmp_path / "p")
    for argv in (["--data", str(tmp_path / "other.txt")], ["--data", str(corpus), "--tokenizer", "char"]):
        assert main(["prepare", *argv, "--out", str(tmp_path / "p")]) == 2
        assert "--overwrite" in capsys.readouterr().err.strip().splitlines()[-1]
        assert _snapshot(tmp_path / "p") == snapshot
    assert _hidden_siblings(out) == []


def test_prepare_overwrite_replaces_the_folder_and_says_so(tmp_path, corpus, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me\n")
    assert main(["prepare", "--data", str(corpus), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer", "train.bin", "val.bin"]
    assert f"{out}: it has no meta.json" in caplog.text and f"replaced {out}" in caplog.text
    printed = json.loads(capsys.readouterr().out)
    assert printed["fingerprint"]["files"].startswith(f"1 file, {len(TEXT):,} bytes")
    assert _hidden_siblings(out) == []


def test_prepare_into_its_own_up_to_date_folder_does_nothing(tmp_path, corpus, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "p"
    assert main(["prepare", "--data", str(corpus), "--out", str(out)]) == 0
    first = json.loads(capsys.readouterr().out)
    snapshot = _snapshot(out)
    assert main(["prepare", "--data", str(corpus), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert f"reusing the prepared data in {out}" in caplog.text and _snapshot(out) == snapshot
