"""Output manifests: size, sha256 and row count of every file of an output, so damage is never read as valid.

A stage that writes a directory output (a tree directory, a model) writes `_manifest.json` into it *last*,
atomically, after every other file has landed:

    {"files": {"part-00000.parquet": {"size": 123, "sha256": "...", "rows": 42}, ...}, "meta": {...}}

Readers call `verify(dir)` (or `verified_files(dir)`) before trusting the directory: a missing manifest, a
missing, truncated or altered file, or an unlisted data file raises `CorruptOutputError` naming the file and
what is wrong. `verify(..., checksums=False)` is the cheap check for large inputs (a 14 GB model): sizes only,
which is what a truncation or an interrupted copy changes, without reading the data.

Names beginning with `_` or `.` are an output's own bookkeeping (`_manifest.json`, a stage's `_work/` dir,
`.tmp-*` files of an atomic write) and are not listed. The same per-file records (`file_record`,
`check_record`) serve as commit records of smaller units, e.g. the search stage's per-problem files.

Also here, because resume fingerprints are made of them: `input_key` (a cheap content key of an input file or
directory) and `code_digest` (a digest of the arbor source).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arbor.pipeline.config import ArborInputError
from arbor.pipeline.io import write_json

MANIFEST = "_manifest.json"
SMALL_FILE = 16 * 2**20  # inputs up to this size are keyed by their full sha256; larger ones by metadata


class CorruptOutputError(ArborInputError):
    """An output is incomplete or damaged; the message names the file and what is wrong with it."""


def is_bookkeeping(name: str) -> bool:
    """Whether a file or directory name is an output's own bookkeeping (not data, not in a manifest)."""
    return name.startswith(("_", "."))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def _safetensors_header(path: Path) -> bytes:
    """The raw header of a safetensors file (8-byte little-endian length, then that much JSON); b"" if absent."""
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        return f.read(min(n, 100 * 2**20))


def count_rows(path: str | os.PathLike[str]) -> int | None:
    """Rows of a parquet (from its footer) or JSON-lines file; None for other files."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """`{"size", "sha256"}` of a file, plus `"rows"` for parquet and JSON-lines files."""
    path = Path(path)
    rec: dict[str, Any] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    rows = count_rows(path)
    if rows is not None:
        rec["rows"] = rows
    return rec


def check_record(path: str | os.PathLike[str], record: Mapping[str, Any], *, checksums: bool = True) -> str | None:
    """What is wrong with `path` compared with its `record` (None when it matches).

    `checksums=False` compares sizes only (what a truncation or an interrupted copy changes), without reading
    the data: the cheap check for large files.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"size {size} bytes, recorded {record.get('size')} (truncated or altered)"
    if checksums and sha256_file(path) != record.get("sha256"):
        return "content differs from its recorded sha256 (altered)"
    return None


def data_files(directory: str | os.PathLike[str]) -> list[str]:
    """Relative paths of every data (non-bookkeeping) file below `directory`, sorted."""
    directory = Path(directory)
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not is_bookkeeping(d)]
        out += [Path(root, f).relative_to(directory).as_posix() for f in files if not is_bookkeeping(f)]
    return sorted(out)


def write_manifest(directory: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Record every data file of `directory` in `directory/_manifest.json` (atomically); returns the manifest.

    Call it last, once every data file is in place: its presence is what marks the output complete.
    """
    directory = Path(directory)
    manifest = {"files": {rel: file_record(directory / rel) for rel in data_files(directory)},
                "meta": dict(meta or {})}
    write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of `directory`, or None when it has none; a malformed one raises CorruptOutputError."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptOutputError(f"{path}: invalid manifest ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptOutputError(f"{path}: invalid manifest (no 'files' mapping)")
    return manifest


def find_damage(directory: str | os.PathLike[str], *, checksums: bool = True) -> dict[str, str]:
    """Every problem of a manifested directory, as {relative path: what is wrong}; {} when it is intact."""
    directory = Path(directory)
    if not directory.is_dir():
        return {".": f"{directory}: not a directory"}
    try:
        manifest = read_manifest(directory)
    except CorruptOutputError as e:
        return {MANIFEST: str(e)}
    if manifest is None:
        return {MANIFEST: "missing (the output was never completed)"}
    bad = {rel: why for rel, rec in manifest["files"].items()
           if (why := check_record(directory / rel, rec, checksums=checksums)) is not None}
    bad |= {rel: "not in the manifest" for rel in data_files(directory) if rel not in manifest["files"]}
    return bad


def verify(directory: str | os.PathLike[str], *, required: bool = True,
           checksums: bool = True) -> dict[str, Any] | None:
    """Check a directory output against its manifest; returns the manifest.

    Raises CorruptOutputError naming every damaged file. A directory without a manifest is an error when
    `required`, else (e.g. a user's own model directory, which no stage wrote) returns None unchecked.
    """
    directory = Path(directory)
    if not required and directory.is_dir() and not (directory / MANIFEST).exists():
        return None
    bad = find_damage(directory, checksums=checksums)
    if bad:
        listing = "; ".join(f"{directory / rel}: {why}" for rel, why in sorted(bad.items()))
        raise CorruptOutputError(f"{directory}: damaged or incomplete output, not read ({listing}); "
                                 "re-run the stage that writes it")
    return read_manifest(directory)


def verified_files(directory: str | os.PathLike[str], pattern: str = "*.parquet") -> list[Path]:
    """The files of a verified directory output that match `pattern` (sorted), e.g. the tree shards.

    Use it to open a stage's output: `datasets.load_dataset("parquet", data_files=[str(f) for f in ...])`.
    """
    verify(directory)
    files = sorted(Path(directory).glob(pattern))
    if not files:
        raise CorruptOutputError(f"{directory}: no files matching {pattern!r}")
    return files


# ---------------------------------------------------------------------------------------------------------------
# cheap content keys for resume fingerprints

def _file_key(path: Path) -> bytes:
    st = path.stat()
    if st.st_size <= SMALL_FILE:
        return bytes.fromhex(sha256_file(path))
    key = f"{st.st_size}:{st.st_mtime_ns}".encode()
    if path.suffix == ".safetensors":  # the header names every tensor, its dtype, shape and offsets
        key += _safetensors_header(path)
    return key


def input_key(path: str | os.PathLike[str]) -> str:
    """A key that changes when the content of an input file or directory changes, without reading large files.

    A directory with a manifest is keyed by its recorded checksums (exact, and free). Otherwise every file up to
    16 MiB is keyed by its sha256; a larger one by its size and mtime, plus the header of a safetensors file.
    (A safetensors header alone is not enough: a retrained model of the same architecture has the same header.)
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        manifest = read_manifest(path) if (path / MANIFEST).exists() else None
        if manifest is not None:
            h.update(json.dumps(manifest["files"], sort_keys=True).encode())
            return h.hexdigest()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + _file_key(f))
    elif path.is_file():
        h.update(_file_key(path))
    else:
        raise FileNotFoundError(f"{path}: input not found")
    return h.hexdigest()


def code_digest() -> str:
    """Digest of the arbor source: resume state written by other code is never reused."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def fingerprint(config: Mapping[str, Any], inputs: Sequence[str | os.PathLike[str]]) -> str:
    """Resume fingerprint: the config that shapes the results, the input contents and the arbor source."""
    h = hashlib.sha256(json.dumps({"config": config, "code": code_digest()}, sort_keys=True).encode())
    for p in inputs:
        h.update(input_key(p).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# resume directories

FINGERPRINT = "_fingerprint.json"


def claim_dir(directory: str | os.PathLike[str], fp: str, own: re.Pattern[str], what: str) -> bool:
    """Make `directory` the resume/output directory of fingerprint `fp`; True when its content can be resumed.

    `own` matches the names of entries the stage writes itself. The directory is created when missing. An
    existing one must hold nothing but such entries (else ArborInputError: it is someone else's directory, e.g.
    `--out models`, and nothing in it is touched). When its `_fingerprint.json` names another fingerprint, the
    stage's own entries are removed (never the directory, never anything else) and the new one is recorded.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ArborInputError(f"{directory}: exists and is not a directory; {what} needs a directory of its own")
    directory.mkdir(parents=True, exist_ok=True)
    entries = list(directory.iterdir())
    foreign = sorted(p.name for p in entries
                     if p.name != FINGERPRINT and not p.name.startswith(".tmp-") and not own.fullmatch(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ArborInputError(f"{directory}: not a {what} directory (it holds {shown}); refusing to write into it "
                         "- give a new or empty directory")
    fp_file = directory / FINGERPRINT
    try:
        same = fp_file.exists() and json.loads(fp_file.read_text()).get("fingerprint") == fp
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        same = False
    if same:
        return True
    for p in entries:
        if own.fullmatch(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    write_json(fp_file, {"fingerprint": fp})
    return False
