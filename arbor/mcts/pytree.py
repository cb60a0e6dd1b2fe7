"""A straightforward pure-Python object tree with the same semantics as the numba kernels.

Two uses: the reference that the kernels are tested against (golden trees, hypothesis), and the lean Python
baseline of `bench/kernels.py` (beside an AlphaLLM-style object tree there). Not used by search. Same semantics
includes the sibling-normalised PUCT prior from log priors and NaN Q counting as 0 (see kernels.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

UCT, PUCT = 0, 1


@dataclass(eq=False)
class PyNode:
    index: int
    parent: PyNode | None
    log_prior: float = 0.0
    prior: float = 1.0  # softmax of log_prior over the siblings (as `Tree.prior`)
    terminal: bool = False
    expanded: bool = False
    visits: int = 0
    value_sum: float = 0.0
    virtual: int = 0
    children: list[PyNode] = field(default_factory=list)


class PyTree:
    """Nodes in creation order; root = index 0."""

    def __init__(self) -> None:
        self.nodes = [PyNode(0, None)]

    def add_child(self, parent: int, log_prior: float = 0.0, terminal: bool = False) -> int:
        p = self.nodes[parent]
        node = PyNode(len(self.nodes), p, log_prior, terminal=terminal)
        p.children.append(node)
        self.nodes.append(node)
        m = max(ch.log_prior for ch in p.children)
        if not math.isfinite(m):
            for ch in p.children:
                ch.prior = 1.0 / len(p.children)
        else:
            total = 0.0
            for ch in p.children:
                total += math.exp(ch.log_prior - m)
            for ch in p.children:
                ch.prior = math.exp(ch.log_prior - m) / total
        return node.index

    @staticmethod
    def _score(ch: PyNode, parent_term: float, c: float, rule: int, vl_value: float) -> float:
        n = ch.visits + ch.virtual
        if rule == UCT:
            if n == 0:
                return math.inf
            q = (ch.value_sum - ch.virtual * vl_value) / n
            return (0.0 if math.isnan(q) else q) + c * math.sqrt(parent_term / n)
        q = 0.0 if n == 0 else (ch.value_sum - ch.virtual * vl_value) / n
        return (0.0 if math.isnan(q) else q) + c * ch.prior * parent_term / (1.0 + n)

    def select(self, num_select: int, c: float = 1.0, rule: int = UCT, vl_value: float = 1.0) -> list[int]:
        out = []
        for _ in range(num_select):
            node = self.nodes[0]
            while node.expanded and not node.terminal and node.children:
                n_parent = node.visits + node.virtual
                term = math.log(max(n_parent, 1)) if rule == UCT else math.sqrt(n_parent)
                best, best_score = node.children[0], -math.inf
                for ch in node.children:
                    s = self._score(ch, term, c, rule, vl_value)
                    if s > best_score:
                        best, best_score = ch, s
                node = best
            out.append(node.index)
            x: PyNode | None = node
            while x is not None:
                x.virtual += 1
                x = x.parent
        return out

    def backup(self, leaves: list[int], values: list[float]) -> None:
        for leaf, v in zip(leaves, values, strict=True):
            x: PyNode | None = self.nodes[leaf]
            while x is not None:
                x.visits += 1
                x.value_sum += v
                x.virtual -= 1
                x = x.parent

    def greedy_path(self) -> list[int]:
        node, out = self.nodes[0], [0]
        while True:
            best, key = None, None
            for ch in node.children:
                if ch.visits > 0:
                    k = (ch.value_sum / ch.visits, ch.visits)
                    if key is None or k > key:
                        best, key = ch, k
            if best is None:
                return out
            node = best
            out.append(node.index)
