import pytest

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


def test_atomic_dir_replaces_whole_directory(tmp_path):
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


def test_stale_temp_from_killed_run_is_cleaned(tmp_path):
    (tmp_path / ".tmp-x.jsonl-abc").write_text("half")
    assert write_jsonl(tmp_path / "x.jsonl", [{"i": 1}, {"i": 2}]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]


def test_read_json_errors_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: invalid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="none.json"):
        read_json(tmp_path / "none.json")


def test_derive_seed_stable_and_distinct():
    assert derive_seed(1, "a") == derive_seed(1, "a")
    assert len({derive_seed(1, "a"), derive_seed(1, "b"), derive_seed(2, "a"), derive_seed(1, "a", 0)}) == 4
    assert 0 <= derive_seed(123456789, "x") < 2**31
