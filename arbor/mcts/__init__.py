"""Tree search over reasoning steps: the array tree and its numba kernels, growth through the `Policy`
protocol, eta-MCTS, Tree-GRPO and chain samplers, node scorers, and tree (de)serialization."""

from arbor.mcts.grow import TreeBuilder
from arbor.mcts.kernels import PUCT, UCT, backup_values, select, sibling_stats
from arbor.mcts.samplers import chain_tree, expand_tree, sample_chains, tree_grpo
from arbor.mcts.scoring import LikelihoodScorer, NodeScorer, RewardScorer
from arbor.mcts.search import SearchResult, SearchTiming, eta_mcts, readouts
from arbor.mcts.tree import NO_PARENT, ROOT, Tree, TreeFullError, add_child, new_tree

__all__ = [
    "NO_PARENT", "PUCT", "ROOT", "UCT", "LikelihoodScorer", "NodeScorer", "RewardScorer", "SearchResult",
    "SearchTiming", "Tree", "TreeBuilder", "TreeFullError", "add_child", "backup_values", "chain_tree", "eta_mcts",
    "expand_tree", "new_tree", "readouts", "sample_chains", "select", "sibling_stats", "tree_grpo",
]
