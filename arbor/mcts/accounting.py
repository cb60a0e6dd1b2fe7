"""Token accounting against the physical limit (DESIGN.md, "Token accounting"; issue #9, Deliver 3).

- `stored_tokens`: the tokens a tree stores, prompt once plus every node's step (`Tree.num_tokens`).
- `trie_tokens`: the distinct token prefixes over all root-to-node paths, prompt once: siblings that begin with the
  same tokens share them. A token position with the same history needs computing once, so this is the least a
  perfect engine computes for the tree (less the last token of each trajectory end, which is never fed).
- `compute_ratio = forward_tokens / trie_tokens` (goal <= 1.10); `forward_per_stored_token = forward_tokens /
  stored_tokens` is the node-level reuse (1.0 once no node recomputes its prefix; below 1 with token sharing).
- `kv_memory_ratio = peak KV bytes held / (stored_tokens * bytes of one token's KV)` (goal <= 1.2): about 1 when
  each distinct prefix's KV is held once (a radix store); the sum of path lengths over it when every node holds
  its whole prefix.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from arbor.mcts.tree import Tree


def trie_tokens(tree: Tree) -> int:
    """Distinct token prefixes over all root-to-node paths of `tree` (the prompt counted once)."""
    n = tree.num_nodes
    end = np.zeros(n, np.int64)  # trie vertex at the end of each node's path (0 = the empty prefix)
    edges: dict[tuple[int, int], int] = {}
    parent, start, length, tokens = tree.parent, tree.tok_start, tree.tok_len, tree.tokens
    for x in range(n):
        cur = int(end[parent[x]]) if parent[x] >= 0 else 0
        s = int(start[x])
        for t in tokens[s : s + int(length[x])].tolist():
            nxt = edges.get((cur, t))
            if nxt is None:
                nxt = edges[(cur, t)] = len(edges) + 1
            cur = nxt
        end[x] = cur
    return len(edges)


def token_accounting(forward_tokens: int, trie: int, stored: int, peak_kv_bytes: int,
                     kv_token_bytes: int) -> dict[str, float | None]:
    """The ratios of the module docstring from totals (sums over problems; None where a denominator is 0)."""
    return {"trie_tokens": trie, "stored_tokens": stored, "forward_tokens": forward_tokens,
            "compute_ratio": forward_tokens / trie if trie else None,
            "forward_per_stored_token": forward_tokens / stored if stored else None,
            "kv_memory_ratio": peak_kv_bytes / (stored * kv_token_bytes) if stored and kv_token_bytes else None}


def sum_accounting(rows: Iterable[dict]) -> dict[str, float | None]:
    """`token_accounting` over per-problem rows holding forward_tokens, trie_tokens, stored_tokens,
    kv_peak_bytes and kv_token_bytes (peaks are per problem, each problem's store emptied after it)."""
    rows = list(rows)
    tb = max((int(r.get("kv_token_bytes", 0)) for r in rows), default=0)
    return token_accounting(sum(int(r["forward_tokens"]) for r in rows),
                            sum(int(r.get("trie_tokens", 0)) for r in rows),
                            sum(int(r["stored_tokens"]) for r in rows),
                            sum(int(r.get("kv_peak_bytes", 0)) for r in rows), tb)
