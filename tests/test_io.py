"""Artifact IO (atomic, durable writes) and output manifests (damage is detected, never read as valid)."""

import json
import os
import struct
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arbor.pipeline import io as aio
from arbor.pipeline import manifest as mf
from arbor.pipeline.config import ArborInputError
from arbor.pipeline.io import atomic_path, read_json, write_json, write_jsonl
from arbor.pipeline.seeds import derive_seed


def test_atomic_file_write_keeps_old_content_on_crash(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"a": 2, "trunc')
        raise RuntimeError("killed")
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_dir_replaces_whole_directory(tmp_path, monkeypatch, exchange):
    if not exchange:  # a system without renameat2(RENAME_EXCHANGE): two renames
        monkeypatch.setattr(aio, "_exchange", lambda a, b: False)
    target = tmp_path / "policy"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    with pytest.raises(KeyboardInterrupt), atomic_path(target, is_dir=True) as tmp:
        (tmp / "c.txt").write_text("3")
        raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_temps_of_dead_writers_are_cleaned(tmp_path):
    dead = tmp_path / f".tmp-x.jsonl-{_dead_pid()}-abcd1234"
    dead.write_text("half")
    legacy = tmp_path / ".tmp-x.jsonl-abc"  # an older arbor's temp name, without an owner
    legacy.write_text("half")
    live = tmp_path / f".tmp-x.jsonl-{os.getppid()}-0123abcd"  # a concurrent writer that is still running
    live.write_text("in progress")
    assert write_jsonl(tmp_path / "x.jsonl", [{"i": 1}, {"i": 2}]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.jsonl", live.name])
    assert live.read_text() == "in progress"


def test_outputs_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_path(tmp_path / "d", is_dir=True) as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_file_and_directory_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("rename", str(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_json(tmp_path / "m.json", {"a": 1})
    kinds = [(k, os.path.basename(p)) for k, p in events]
    rename = kinds.index(("rename", "m.json"))
    assert any(k == "fsync" and p.startswith(".tmp-m.json-") for k, p in kinds[:rename])  # the data first
    assert ("fsync", tmp_path.name) in kinds[rename:]  # then the directory entry


def test_read_json_errors_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ArborInputError, match="bad.json: invalid JSON"):  # one line, exit 2 in a stage
        read_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="none.json"):
        read_json(tmp_path / "none.json")


def test_derive_seed_stable_and_distinct():
    assert derive_seed(1, "a") == derive_seed(1, "a")
    assert len({derive_seed(1, "a"), derive_seed(1, "b"), derive_seed(2, "a"), derive_seed(1, "a", 0)}) == 4
    assert 0 <= derive_seed(123456789, "x") < 2**31


# ---------------------------------------------------------------------------------------------------------------
# manifests

def _safetensors(path, payload: bytes = b"\0" * 4096) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(payload) // 4], "data_offsets": [0, len(payload)]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + payload)


@pytest.fixture()
def output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"x": list(range(100))}), out / "part-0.parquet")
    _safetensors(out / "model.safetensors")
    (out / "_work").mkdir()
    (out / "_work" / "scratch.parquet").write_text("bookkeeping, not data")
    m = mf.write_manifest(out, meta={"problems": 3})
    assert set(m["files"]) == {"part-0.parquet", "model.safetensors"}
    assert m["files"]["part-0.parquet"]["rows"] == 100
    return out


def test_manifest_verifies_an_intact_output(output):
    assert mf.verify(output)["meta"] == {"problems": 3}
    assert mf.verified_files(output) == [output / "part-0.parquet"]
    assert mf.verify(output, checksums=False) is not None


@pytest.mark.parametrize("name", ["part-0.parquet", "model.safetensors"])
def test_truncated_file_is_detected_with_and_without_checksums(output, name):
    os.truncate(output / name, 1000 if name.endswith("parquet") else 40)
    for checksums in (True, False):
        with pytest.raises(mf.CorruptOutputError, match=f"{name}: size"):
            mf.verify(output, checksums=checksums)


def test_altered_byte_unlisted_file_and_missing_manifest_are_detected(output):
    data = bytearray((output / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (output / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(mf.CorruptOutputError, match="model.safetensors: content differs"):
        mf.verify(output)
    pq.write_table(pa.table({"x": [1]}), output / "part-9.parquet")
    assert set(mf.find_damage(output)) == {"model.safetensors", "part-9.parquet"}
    (output / mf.MANIFEST).write_text('{"files": {')
    with pytest.raises(mf.CorruptOutputError, match="invalid manifest"):
        mf.verify(output)
    (output / mf.MANIFEST).unlink()
    with pytest.raises(mf.CorruptOutputError, match="_manifest.json: missing"):
        mf.verified_files(output)
    assert mf.verify(output, required=False) is None  # e.g. a user's own model directory


def test_input_key_does_not_read_large_files(tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "SMALL_FILE", 1024)
    model = tmp_path / "policy"
    model.mkdir()
    _safetensors(model / "model.safetensors", b"\1" * 8192)
    (model / "config.json").write_text("{}")
    read = []
    real = mf.sha256_file
    monkeypatch.setattr(mf, "sha256_file", lambda p: read.append(os.path.basename(p)) or real(p))
    key = mf.input_key(model)
    assert read == ["config.json"] and mf.input_key(model) == key
    _safetensors(model / "model.safetensors", b"\2" * 8192)  # same header, new weights: a retrained model
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert mf.input_key(model) != key
    mf.write_manifest(model)
    read.clear()
    keyed = mf.input_key(model)  # with a manifest: its recorded checksums, nothing is read
    assert read == [] and keyed == mf.input_key(model)
