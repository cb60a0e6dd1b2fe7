"""`arbor show-tree`: one problem's search tree as a self-contained HTML page.

Each node shows its step text, visits, Q, score and reward; subtrees collapse (`<details>`); the greedy-by-Q
path (the search's answer) is highlighted, correct terminals are green and wrong ones red. No JavaScript, no
external assets: the page opens anywhere.
"""

from __future__ import annotations

import argparse
import html
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from arbor.pipeline.config import ArborInputError
from arbor.pipeline.io import atomic_path
from arbor.pipeline.manifest import verified_files
from arbor.tasks.base import is_solved

CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1100px}
details{margin-left:1.2em;border-left:1px solid #ccc;padding-left:.4em}
summary{cursor:pointer;white-space:pre;font-family:ui-monospace,monospace}
.best>summary{background:#fff3b0;font-weight:bold}.ok>summary{color:#0a7d22}.bad>summary{color:#b3261e}
.stats{color:#666;font-family:system-ui,sans-serif;font-size:.85em}"""


def load_tree(trees: str | Path, problem_id: str | None) -> list[dict[str, Any]]:
    """The node rows of one problem (the first problem if `problem_id` is None).

    A tree directory is read only after it matches its manifest (`verified_files`): a truncated or altered
    shard is reported (`CorruptOutputError`), never rendered. A single parquet file is read as given.
    """
    path = Path(trees)
    if path.is_dir():
        files = verified_files(path)
    elif path.exists():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: file or directory not found (a tree directory or parquet file; "
                                "run `arbor search` first)")
    for f in files:
        table = pq.read_table(f)
        ids = table.column("problem_id").to_pylist()
        want = problem_id or ids[0]
        rows = [r for r in table.to_pylist() if r["problem_id"] == want]
        if rows:
            return sorted(rows, key=lambda r: r["node"])
    raise ArborInputError(f"{path}: problem {problem_id!r} not found")


def best_path(rows: list[dict[str, Any]]) -> set[int]:
    """Greedy-by-Q path from the root (visited children only; ties: more visits)."""
    kids: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        kids[r["parent"]].append(r)
    node, path = 0, {0}
    while True:
        visited = [c for c in kids[node] if c["visits"] > 0 and c["q"] is not None]
        if not visited:
            return path
        node = max(visited, key=lambda c: (c["q"], c["visits"]))["node"]
        path.add(node)


def render(rows: list[dict[str, Any]]) -> str:
    """The HTML page of one tree."""
    kids: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        kids[r["parent"]].append(r)
    best = best_path(rows)

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)

    def node_html(r: dict[str, Any]) -> str:
        cls = ["best"] if r["node"] in best else []
        if r["terminal"] and r["reward"] is not None:
            cls.append("ok" if is_solved(r["reward"]) else "bad")
        text = r["step_text"].rstrip("\n") or "(empty)"
        if r["node"] == 0:
            text = "PROMPT: " + text
        stats = (f'node {r["node"]} · visits {r["visits"]} · Q {fmt(r["q"])} · score {fmt(r["critic_score"])}'
                 f' · reward {fmt(r["reward"])}' + (" · terminal" if r["terminal"] else ""))
        inner = "".join(node_html(c) for c in kids[r["node"]])
        open_attr = " open" if r["node"] in best else ""
        return (f'<details class="{" ".join(cls)}" data-node="{r["node"]}"{open_attr}><summary>'
                f'{html.escape(text)}  <span class="stats">{html.escape(stats)}</span></summary>{inner}</details>')

    root = next(r for r in rows if r["node"] == 0)
    n_term = sum(r["terminal"] for r in rows)
    n_ok = sum(1 for r in rows if r["terminal"] and r["reward"] is not None and is_solved(r["reward"]))
    head = (f"<h1>Search tree: {html.escape(root['problem_id'])}</h1><p>{len(rows)} nodes, {n_term} terminals "
            f"({n_ok} correct). Highlighted: the greedy-by-Q path.</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>arbor tree {html.escape(root['problem_id'])}"
            f"</title><style>{CSS}</style></head><body>{head}{node_html(root)}</body></html>\n")


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="arbor show-tree", description=__doc__)
    p.add_argument("--trees", default="trees/iter_0", help="Tree directory or parquet file.")
    p.add_argument("--problem", default=None, help="Problem id (default: the first).")
    p.add_argument("--out", default=None, help="HTML file (default plots/tree_<problem>.html).")
    a = p.parse_args(argv)
    rows = load_tree(a.trees, a.problem)
    out = Path(a.out or f"plots/tree_{rows[0]['problem_id']}.html")
    with atomic_path(out) as tmp:
        tmp.write_text(render(rows))
    print(out)
    return out


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
