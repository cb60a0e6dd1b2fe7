"""The iteration plan: which models and trees iteration k reads and writes (default paths of the stages).

The convention (index k = iteration):

- `search --iter k` grows `trees/iter_<k>` with policy_{searcher(k)} (policy_0 for k = 0, policy_{k-1} after)
  and, for k >= 1, the critics of iteration k-1 (k = 0 has none: the oracle reward and neutral inner nodes);
- `critics --iter k` trains on `trees/iter_<k>`: extra completions from the policy that grew them
  (policy_{searcher(k)}, so labels stay on-policy), backbones from policy_k -> `models/iter_<k>/critics`;
- `evaluate --iter k` reads policy_k and critics_k -> `metrics/iter_<k>.json`.
"""

from __future__ import annotations


def searcher(k: int) -> int:
    """The iteration whose policy grows `trees/iter_<k>`: 0 for k = 0, else k - 1."""
    if k < 0:
        raise ValueError(f"iteration {k}: expected k >= 0")
    return max(k - 1, 0)


def policy_dir(k: int) -> str:
    return f"models/iter_{k}/policy"


def critics_dir(k: int) -> str:
    return f"models/iter_{k}/critics"


def trees_dir(k: int) -> str:
    return f"trees/iter_{k}"


def search_critics_dir(k: int) -> str | None:
    """The critics that score the nodes of search k by default: none for k = 0, critics_{k-1} after."""
    return None if k == 0 else critics_dir(k - 1)
