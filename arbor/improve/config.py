"""`PrefsConfig`: how stage `prefs` turns search trees into step-level preference pairs (arbor/improve/prefs.py).

Declared like the sections of arbor/pipeline/config.py (arbor/pipeline/fields.py), composed into `ArborConfig`
as the `prefs:` section; every key is a `--prefs.<key>` option and a params.yaml entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from arbor.pipeline.fields import COUNT
from arbor.pipeline.fields import config_field as _f

VALUES = ("policy", "mc", "q", "critic")


@dataclass
class PrefsConfig:
    """Stage `prefs`: step-level preference pairs from sibling subtrees, and the Tree-GRPO trajectory view."""

    value: str = _f("policy", "What a step is worth: policy (expected outcome below it, children weighted by the "
                              "policy's probability) | mc (plain mean outcome reward of the terminals below it) | q "
                              "(the search's backed-up Q) | critic (the node's critic score).", choices=VALUES)
    margin: float = _f(0.3, "Pair two sibling steps when their values differ by at least this.", gt=0.0, max=1.0)
    min_terminals: int = _f(1, "value=policy|mc: a step needs at least this many scored terminals below it.",
                            **COUNT)
    max_pairs_per_node: int = _f(0, "Keep at most this many pairs per node, largest gaps first (0 = all).", min=0)
    min_step_prob: float = _f(0.01, "Use only steps the policy that grew the tree takes at least this often (exp "
                                    "of the step's log-prior; 0 = any): both steps of a pair, every step of a "
                                    "trajectory (module docstring of arbor/improve/prefs.py).", min=0.0, max=1.0)
    replay: bool = _f(True, "Also take pairs and trajectories from the previous iteration's trees (trees/iter_<k-1>; "
                             "search_0's for k = 1): policy_k trains on the last two searches, the older one's "
                             "values and priors as its own search recorded them.")
    step_prob: str = _f("step", "What min_step_prob bounds: step (the whole step's probability) | token (its "
                                "geometric-mean token probability, for multi-token natural-language steps).",
                        choices=("step", "token"))
