"""The policy's confidence beside the critics: features of a path's token log-probs, fused into each critic's score.

A step the policy sampled against its own odds (a slipped digit, an unlikely operation) is where a path most
often goes wrong, and the search already holds the evidence: every node's step log-prob (`log_prior`, the sum
of its tokens' log pi under the untempered policy) and token count. A critic's scalar head reads one hidden state
at the step end and has no direct view of how surprising each token was. So each critic's score is fused with
three features of the path from the root to the node (its steps 1..d, `lp_i` = log-prob sum and `n_i` = tokens
of step i):

    z = [ sum_i lp_i / sum_i n_i,   min_i lp_i / n_i,   lp_d / n_d ]     (path mean, weakest step, last step)

(zeros at the root, which has no step; features clipped to [-50, 0]), by logistic regression ("stacking",
Wolpert 1992):

    p' = sigmoid(a * logit(p) + u . z + c)          (per critic kind; a, u [3], c fitted)

fitted by the `critics` stage on the validation split (not the training split: the fine-tuned body has seen
those labels and its logits are overconfident there), against the same targets the heads train on (soft value
and PRM labels, the ORM's outcome). The coefficients are saved beside the critics (`confidence.json`); the
critics stage's held-out metrics, critic-guided search (`CriticScorer`) and the read-outs over sampled chains
(`score_samples`) all score through them. Measured by the stage in a fresh run of the tiny default
(66d131f, metrics/critics_0.json, held-out problems): AUROC value / PRM / ORM 0.720 / 0.695 / 0.711 for the
critic alone, 0.751 / 0.733 / 0.724 for the same fusion without the critic (`<kind>_auroc_confidence_only`),
0.771 / 0.750 / 0.736 fused; within a problem 0.599 / 0.580 / 0.515 alone, 0.731 / 0.729 / 0.772 fused. Most
of it is the features: at iterations 1-2 the features alone equal the fused scores (README, Critics).
AlphaLLM's critics (§4.3) read text only; the features need nothing the search does not already have, so
they cost no forward pass.

Known limits. (1) The fusion of critics_k is fitted on the log-probs of the policy that grew trees_k
(policy_{k-1}; policy_0 for k = 0) and applied to the policy that uses critics_k afterwards (policy_k in
evaluate_k, decode_k and search_{k+1}), whose log-probs step-DPO has moved; with `critics.refresh: false`
critics_0's fusion serves every later policy. Re-scoring the validation paths under the using policy would
remove the mismatch; not done. (2) A tree node's `log_prior` includes the log-prob of an EOS that ended its
step while its `tok_len` does not count it; a sampled continuation's features (`sample_features`) leave a
trailing EOS out. The two agree except for a path ended by EOS on a step of its own (an empty terminal step,
whose features in the tree are the EOS's log-prob); such terminals state no answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numba as nb
import numpy as np

FEATURES = ("path_mean", "weakest_step", "last_step")
CONFIDENCE_JSON = "confidence.json"
FORMAT = "arbor-confidence/1"


@nb.njit(cache=True)
def path_features(parent, log_prior, tok_len, nodes):  # pragma: no cover - numba
    """[n, 3] features `z` (module docstring) of each of `nodes` [n] in a tree: parent [N] (root -1),
    log_prior [N] (step log-prob sums), tok_len [N] (step token counts; the root's prompt is not a step)."""
    out = np.zeros((nodes.shape[0], 3))
    for i in range(nodes.shape[0]):
        m = nodes[i]
        lp_sum, n_sum, weakest, last = 0.0, 0.0, np.inf, 0.0
        first = True
        while m >= 0 and parent[m] >= 0:
            step = log_prior[m] / max(1, tok_len[m])
            if first:
                last, first = step, False
            lp_sum += log_prior[m]
            n_sum += max(1, tok_len[m])
            weakest = min(weakest, step)
            m = parent[m]
        if not first:
            out[i, 0], out[i, 1], out[i, 2] = lp_sum / n_sum, weakest, last
    return out


def step_features(step_logprob: Sequence[float], step_len: Sequence[int]) -> np.ndarray:
    """[d, 3] features of the d prefixes of one path given its steps' log-prob sums and token counts [d] (row j:
    the path through step j): the same numbers `path_features` gives for the tree nodes of those steps."""
    d = len(step_logprob)
    parent = np.arange(-1, d, dtype=np.int64)  # a chain: root 0, step j is node j + 1
    lp = np.concatenate([[0.0], np.asarray(step_logprob, np.float64)])
    n = np.concatenate([[0], np.asarray(step_len, np.int64)])
    return path_features(parent, lp, n, np.arange(1, d + 1, dtype=np.int64))


def sample_features(logprobs: np.ndarray, ends: Sequence[int], prefix: np.ndarray | None = None) -> np.ndarray:
    """[len(ends), 3] features at each step end of a sampled continuation: `logprobs` [T] its tokens' log-probs,
    `ends` the exclusive step ends (`arbor.critics.labels.step_ends`); `prefix` [k, 2]: (log-prob sum, tokens)
    of the steps of the node it continues (none for a continuation of the prompt)."""
    lp = np.asarray(logprobs, np.float64)
    starts = [0, *ends[:-1]]
    steps = [(float(lp[a:b].sum()), b - a) for a, b in zip(starts, ends, strict=True)]
    before = [] if prefix is None else [(float(a), int(b)) for a, b in prefix]
    both = before + steps
    feats = step_features([s[0] for s in both], [s[1] for s in both])
    return feats[len(before):]


def path_steps(parent: np.ndarray, log_prior: np.ndarray, tok_len: np.ndarray, node: int) -> np.ndarray:
    """[d, 2] (log-prob sum, tokens) of the steps from the root to `node`, root first (the `prefix` of
    `sample_features` for a continuation of `node`)."""
    out = []
    while node >= 0 and parent[node] >= 0:
        out.append((float(log_prior[node]), int(tok_len[node])))
        node = int(parent[node])
    return np.asarray(out[::-1], np.float64).reshape(-1, 2)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


FEATURE_FLOOR = -50.0
"""Features are clipped to [FEATURE_FLOOR, 0] (a step of log-prob -inf, or NaN, reads as the floor)."""


def _design(p: np.ndarray, z: np.ndarray) -> np.ndarray:
    """[n, 5] columns logit(p), z (3, clipped), 1."""
    z = np.nan_to_num(np.asarray(z, np.float64).reshape(len(p), len(FEATURES)), nan=FEATURE_FLOOR,
                      neginf=FEATURE_FLOOR)
    return np.column_stack([_logit(p), np.clip(z, FEATURE_FLOOR, 0.0), np.ones(len(p))])


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> np.ndarray:
    """Coefficients [F] minimising mean BCE(sigmoid(x b), y) + l2/2 |b|^2 for soft targets y in [0, 1] (Newton's
    method; the objective is strictly convex)."""
    b = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ b)))
        g = x.T @ (p - y) / len(y) + l2 * b
        h = (x * (p * (1 - p))[:, None]).T @ x / len(y) + l2 * np.eye(len(b))
        step = np.linalg.solve(h, g)
        b -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return b


@dataclass
class Fusion:
    """Per-kind coefficients [a, u_1, u_2, u_3, c] of p' = sigmoid(a logit(p) + u . z + c) (module docstring)."""

    coef: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def fit(cls, scores: dict[str, np.ndarray], feats: dict[str, np.ndarray], targets: dict[str, np.ndarray],
            ) -> Fusion:
        """Fit each kind on its (critic scores [n], features [n, 3], targets [n] in [0, 1])."""
        coef = {}
        for k, p in scores.items():
            p, y = np.asarray(p, np.float64), np.asarray(targets[k], np.float64)
            ok = np.isfinite(y) & np.isfinite(p)  # an unlabelled row (NaN target) is left out, as in training
            p, y, z = p[ok], y[ok], np.asarray(feats[k], np.float64).reshape(-1, len(FEATURES))[ok]
            if len(y) == 0 or np.all(y == y[0]):  # nothing to separate: keep the critic's own score
                coef[k] = [1.0, 0.0, 0.0, 0.0, 0.0]
                continue
            b = fit_logistic(_design(p, z), y)
            if not np.all(np.isfinite(b)):
                raise ValueError(f"confidence fusion of the {k} critic: non-finite coefficients {b.tolist()}")
            coef[k] = b.tolist()
        return cls(coef)

    def apply(self, kind: str, p: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Fused scores [n] of the critic `kind`'s scores `p` [n] at paths with features `z` [n, 3]; a kind the
        fusion was not fitted for keeps its scores."""
        p = np.asarray(p, np.float64)
        if kind not in self.coef or len(p) == 0:
            return p
        return 1.0 / (1.0 + np.exp(-(_design(p, z) @ np.asarray(self.coef[kind]))))

    def save(self, directory: str | Path) -> None:
        meta = {"format": FORMAT, "features": list(FEATURES), "columns": ["logit(critic)", *FEATURES, "bias"],
                "coef": self.coef}
        (Path(directory) / CONFIDENCE_JSON).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Fusion | None:
        """The fusion saved in `directory`, or None when there is none (critics trained without it)."""
        path = Path(directory) / CONFIDENCE_JSON
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                             f"expected {FORMAT!r}")
        coef = meta.get("coef")
        width = len(FEATURES) + 2
        if not isinstance(coef, dict) or not all(
                isinstance(v, list) and len(v) == width
                and all(isinstance(x, (int, float)) and np.isfinite(x) for x in v) for v in coef.values()):
            raise ValueError(f"{path}: key 'coef' = {coef!r}; expected {{kind: [{width} finite numbers]}}")
        return cls({str(k): [float(x) for x in v] for k, v in coef.items()})
