"""What a prepared-data folder was made from, so that it is reused only while that is unchanged.

``data.prepare`` stores the fingerprint in meta.json under "fingerprint"::

    {"source":   "/abs/path/corpus.txt" (or a folder, or "default_corpus"),
     "files":    [{"path": "corpus.txt", "size": 1234, "mtime_ns": ..., "sha256": "..."}, ...],
     "settings": {"tokenizer": "bytes", "vocab_size": null, "tokenizer_path": null, "val_fraction": 0.1,
                  "eos_between_docs": true}}

``files`` lists the files ``data.read_texts`` reads, in its order, each path relative to the folder given (a file: its
name; the default corpus: the standard-library directory). Hashing is the cost of a fingerprint, and it is small next
to tokenizing: on 2 CPU cores about 1 ms for tinyshakespeare (1 file, 1.1 MB; 27 ms to prepare with the bytes
tokenizer) and 6-30 ms for the default corpus (241 files, 4 MiB; 0.12 s to prepare). The cheap path: a file whose size
and mtime_ns equal those recorded in the previous fingerprint of the same source keeps its recorded sha256 without
being read (2 ms of stat calls for the default corpus). A content edit that keeps both the size and the nanosecond
mtime would therefore go unnoticed; editors, copies and ``touch`` move the mtime. A moved mtime alone is not a change
(equal contents are equal); such a file is hashed again at each check until the folder is next prepared.
``tokenizer_path`` is recorded as given (a tiktoken name, a file or a folder); the tokenizer files it names are not
hashed.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Any

_CHUNK = 2**20


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_fingerprint(
    data: str | os.PathLike | None, files: list[Path], settings: dict[str, Any], previous: dict | None = None
) -> dict[str, Any]:
    """The fingerprint of ``files`` (the files read from ``data``; None: the default corpus) and the tokenizer
    ``settings``. ``previous``: a fingerprint recorded earlier; its sha256 of a file of the same source is reused
    when the file's size and mtime_ns are unchanged (see the module docstring)."""
    if data is None:
        source, root = "default_corpus", Path(sysconfig.get_paths()["stdlib"])
    else:
        source = os.path.abspath(data)
        root = Path(source) if Path(source).is_dir() else Path(source).parent
    known = {}
    if isinstance(previous, dict) and previous.get("source") == source:
        known = {r.get("path"): r for r in previous.get("files", []) if isinstance(r, dict)}
    records = []
    for file in files:
        stat = file.stat()
        path = Path(os.path.abspath(file)).relative_to(root).as_posix()
        old = known.get(path)
        if old is not None and (old.get("size"), old.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            sha256 = old.get("sha256")
        else:
            sha256 = file_sha256(file)
        records.append({"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256})
    return {"source": source, "files": records, "settings": dict(settings)}


def describe_change(old: dict, new: dict) -> str | None:
    """None when ``old`` and ``new`` fingerprints describe the same data (mtimes aside), else what changed, e.g.
    "the source changed since it was prepared (corpus.txt: size 1234 -> 1300)"."""
    source, settings = [], []
    if old.get("source") != new["source"]:
        source.append(f"source {old.get('source')!r} -> {new['source']!r}")
    before = {r.get("path"): r for r in old.get("files", []) if isinstance(r, dict)}
    after = {r["path"]: r for r in new["files"]}
    for path, record in after.items():
        was = before.get(path)
        if was is None:
            source.append(f"{path} added")
        elif was.get("size") != record["size"]:
            source.append(f"{path}: size {was.get('size')} -> {record['size']}")
        elif was.get("sha256") != record["sha256"]:
            source.append(f"{path}: content changed, same size")
    source += [f"{path} removed" for path in before if path not in after]
    if [r.get("path") for r in old.get("files", []) if isinstance(r, dict)] != list(after) and not source:
        source.append("the files' order changed")
    was_settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    for key in sorted(set(was_settings) | set(new["settings"])):
        if was_settings.get(key) != new["settings"].get(key):
            settings.append(f"{key} {was_settings.get(key)!r} -> {new['settings'].get(key)!r}")
    if not source and not settings:
        return None
    what = " and ".join(w for w, d in (("the source", source), ("the tokenizer settings", settings)) if d)
    details = source + settings
    more = f"; and {len(details) - 3} more" if len(details) > 3 else ""
    return f"{what} changed since it was prepared ({'; '.join(details[:3])}{more})"
