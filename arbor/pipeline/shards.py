"""Resumable sharded outputs: per-item parquet results committed one at a time, merged into shards, manifested.

Layout of an output directory (one parquet dataset: `<dir>/*.parquet` opens with `datasets.load_dataset`):

    part-00000.parquet       the rows of items [0, shard_size), in item order
    part-00000.stats.json    {"file": size/sha256/rows of the part, "stats": [one dict per item]}
    _manifest.json           written last (arbor/pipeline/manifest.py): the output is complete
    _fingerprint.json        what the content belongs to (config, inputs, code; see `manifest.claim_dir`)
    _work/i-000007.parquet   one committed item ...
    _work/i-000007.json      ... and its record (stats + the parquet's checksum), written after it

Every file is written atomically, and a record is written only after the file it describes, so a record that
matches its file marks a finished unit: a kill loses at most the item in flight. A shard whose items are all
committed is merged into its part (record second) and its work files are dropped; once every shard is merged
the manifest is written and `_work/` is removed. On a re-run every part and work file is checked against its
record (sha256): a damaged one is reported, deleted and redone, never read. The merged result does not depend
on where a run was interrupted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from arbor.pipeline.io import atomic_path, read_json, write_json
from arbor.pipeline.manifest import MANIFEST, check_record, claim_dir, file_record, find_damage, write_manifest

log = logging.getLogger("arbor.shards")

OWN = re.compile(r"part-\d{5}\.(parquet|stats\.json)|_manifest\.json|_work")
WORK = "_work"
_WORK_FILE = re.compile(r"i-\d{6}\.(parquet|json)")


def _read_committed(data: Path, record: Path) -> list[dict[str, Any]] | None:
    """The stats of a committed unit (`data` + its `record`); None, after deleting both, when absent or damaged."""
    if not record.exists():
        data.unlink(missing_ok=True)  # killed between the data and its record: an unfinished unit
        return None
    try:
        rec = read_json(record)
        why = check_record(data, rec["file"])
        stats = rec["stats"]
        if why is None and not isinstance(stats, list):
            why = "record has no 'stats' list"
    except (ValueError, KeyError, TypeError) as e:
        why, stats = f"unreadable record {record.name} ({e})", None
    if why is None:
        return stats
    log.warning("%s: %s; it is redone", data, why)
    data.unlink(missing_ok=True)
    record.unlink(missing_ok=True)
    return None


class ShardedOutput:
    """A directory of per-item parquet results (see module docstring), resumable item by item."""

    def __init__(self, directory: str | Path, *, n_items: int, shard_size: int, fingerprint: str,
                 what: str, item_key: str = "problem_id") -> None:
        """`item_key`: the column of a unit's rows, and the key of its stats, that names the item (used to
        split a shard back into its items when `n_items` changed since it was merged)."""
        self.dir = Path(directory)
        self.item_key = item_key
        self.meta = {"fingerprint": fingerprint, "items": n_items}
        claim_dir(self.dir, fingerprint, OWN, what)
        self.shards = [range(a, min(a + shard_size, n_items)) for a in range(0, n_items, shard_size)]
        self.shard_size = shard_size
        self._shard_stats: dict[int, list[dict[str, Any]]] = {}
        self._item_stats: dict[int, dict[str, Any]] = {}
        self.complete = self._load()

    def _part(self, si: int) -> tuple[Path, Path]:
        return self.dir / f"part-{si:05d}.parquet", self.dir / f"part-{si:05d}.stats.json"

    def _item(self, i: int) -> tuple[Path, Path]:
        return self.dir / WORK / f"i-{i:06d}.parquet", self.dir / WORK / f"i-{i:06d}.json"

    def _load(self) -> bool:
        """Find what is done: a verified complete output, else every intact part and work item."""
        if (self.dir / MANIFEST).exists():
            bad = find_damage(self.dir)
            meta = (read_json(self.dir / MANIFEST).get("meta") or {}) if not bad else {}
            if not bad and meta == self.meta:
                self._shard_stats = {si: read_json(self._part(si)[1])["stats"] for si in range(len(self.shards))}
                self._remove_work()
                return True
            if bad:
                why = "; ".join(f"{rel}: {w}" for rel, w in sorted(bad.items()))
                log.warning("%s: damaged output (%s); the damaged parts are redone", self.dir, why)
            else:
                log.info("%s: %s items before, %d now; finished items are kept", self.dir, meta.get("items"),
                         self.meta["items"])
            (self.dir / MANIFEST).unlink()
        self._drop_beyond()
        for si, idx in enumerate(self.shards):
            stats = _read_committed(*self._part(si))
            if stats is not None and len(stats) == len(idx):
                self._shard_stats[si] = stats
            elif stats is not None:  # merged when the item count was another: back into its items
                self._split(si, stats)
        for si, idx in enumerate(self.shards):
            if si in self._shard_stats:
                continue
            for i in idx:
                stats = _read_committed(*self._item(i))
                if stats is not None:
                    self._item_stats[i] = stats[0]
            if all(i in self._item_stats for i in idx):  # killed between the last item and the merge
                self._merge(si)
        return False

    def _drop_beyond(self) -> None:
        """Remove the parts and work items of items >= n_items (the count went down): never in the output."""
        n = self.meta["items"]
        for f in self.dir.glob("part-*"):
            if OWN.fullmatch(f.name) and int(f.name[5:10]) * self.shard_size >= n:
                f.unlink()
        work = self.dir / WORK
        for f in work.glob("i-*") if work.is_dir() else ():
            if _WORK_FILE.fullmatch(f.name) and int(f.name[2:8]) >= n:
                f.unlink()

    def _split(self, si: int, stats: list[dict[str, Any]]) -> None:
        """Turn part `si`, merged with another item count, back into committed work items (those still wanted)."""
        part, side = self._part(si)
        table = pq.read_table(part)
        ids = table.column(self.item_key).to_pylist()
        for j, st in enumerate(stats):
            i = si * self.shard_size + j
            if i >= self.meta["items"]:
                break
            rows = table.filter(pa.array([x == st[self.item_key] for x in ids]))
            data, record = self._item(i)
            data.parent.mkdir(exist_ok=True)
            with atomic_path(data) as tmp:
                pq.write_table(rows, tmp)
            write_json(record, {"file": file_record(data), "stats": [st]})
        log.info("%s: %d items, shard now holds %d; its items are kept and re-merged", part, len(stats),
                 len(self.shards[si]))
        side.unlink()
        part.unlink()

    def todo(self) -> list[int]:
        """Items not committed yet, in order."""
        return [i for si, idx in enumerate(self.shards) if si not in self._shard_stats
                for i in idx if i not in self._item_stats]

    def stats(self) -> list[dict[str, Any]]:
        """Per-item stats of every committed item: merged shards in order, then loose items in order."""
        merged = [s for si in sorted(self._shard_stats) for s in self._shard_stats[si]]
        return merged + [self._item_stats[i] for i in sorted(self._item_stats)]

    def commit(self, i: int, write: Callable[[Path], None], stats: dict[str, Any]) -> bool:
        """Commit item `i`: `write(path)` writes its parquet atomically, then its record lands.

        Returns True when this completed (and merged) the item's shard.
        """
        data, record = self._item(i)
        data.parent.mkdir(exist_ok=True)
        write(data)
        write_json(record, {"file": file_record(data), "stats": [stats]})
        self._item_stats[i] = stats
        si = i // self.shard_size
        if all(j in self._item_stats for j in self.shards[si]):
            self._merge(si)
            return True
        return False

    def _merge(self, si: int) -> None:
        idx = self.shards[si]
        part, side = self._part(si)
        with atomic_path(part) as tmp:  # streamed, one item (row group) at a time: memory of one item, not 16
            writer = None
            for i in idx:
                table = pq.read_table(self._item(i)[0])
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
            assert writer is not None  # a shard holds at least one item
            writer.close()
        pa.default_memory_pool().release_unused()  # arrow's pool would keep the tables' pages (RSS)
        stats = [self._item_stats.pop(i) for i in idx]
        write_json(side, {"file": file_record(part), "stats": stats})
        self._shard_stats[si] = stats
        for i in idx:
            for f in self._item(i):
                f.unlink(missing_ok=True)

    def _remove_work(self) -> None:
        work = self.dir / WORK
        if work.is_dir():
            for f in work.iterdir():
                if _WORK_FILE.fullmatch(f.name):
                    f.unlink()
            if not any(work.iterdir()):
                work.rmdir()

    def finish(self) -> list[dict[str, Any]]:
        """Write the manifest (last) once every shard is merged; returns every item's stats in order."""
        if not self.complete:
            missing = self.todo()
            if missing:
                raise RuntimeError(f"{self.dir}: items {missing[:5]} were never committed")
            write_manifest(self.dir, meta=self.meta)
            self._remove_work()
            self.complete = True
        return self.stats()
