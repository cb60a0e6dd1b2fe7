"""Monte Carlo labels for the critics from search trees (AlphaLLM §4.3; Math-Shepherd, arXiv 2312.08935 §3.3).

A node's *completions* are the terminal nodes below it (itself, if terminal) whose `reward` is known (the
oracle reward written by `search`), plus extra policy completions sampled from the node where the tree gave it
fewer than `min_completions` (a completion from a node is also one from each of its ancestors, so extras are
added like virtual terminal children and summed upward). Per node, the labels estimate what the *policy* gets
from it (`estimate="policy"`, the default; `policy_values`):

- value (MC return):   V(s) = the policy's expected outcome reward from s, estimated on the tree: children
                       weighted by the policy's probability of their step, extra completions for the mass the
                       tree has not explored                                    -> value model (MSE/BCE)
- Math-Shepherd soft:  prm_soft = the same estimate of P(is_solved) from the node  -> PRM (BCE on soft labels)
- Math-Shepherd hard:  prm_hard = 1 if any of N policy completions from the node would be right: drawn with
                       probability 1 - (1 - prm_soft)^N, N = `hard_completions` (seeded); with N = 0, 1 if any
                       completion in the tree is right.
- outcome (terminals): orm = is_solved(reward)                                     -> ORM (BCE)

Why not the plain mean over the n completions below (`estimate="mean"`: V = mean_i r_i, prm_soft = the
fraction solved, prm_hard = any of N of them drawn without replacement, N = 0: any): search widens a node with
steps sampled without replacement, so its children are the likely step plus forced unlikely ones, and the mean
counts each forced wrong sibling as often as the likely step. On the tiny default's trees_0 (256 problems,
14,141 labelled nodes) the mean put 4.3% of nodes at V >= 0.5, the policy estimate 8.7%; an all-right last
step (`24-1=23`, train-000006 node 19) read 1/8 by the mean (its right answer line beside forced wrong ones)
and 0.9986 by the policy estimate. Over all of a node's completions a shallow node (many terminals below)
would also be hard-positive far more often than a deep one of the same success rate (on the default trees
the completion count alone ranked the mean's hard labels at AUROC 0.71), hence N.

When the policy estimate fits: steps short enough that a node's few likely steps hold most of the policy's
mass (the tiny default: a step is a line like `12-3=9`). With a real model's longer steps each step's
probability is tiny (SmolLM2's 12-token steps: median token probability 0.44, about e^-10 a step), the
renormalised weights pick out one child, and extras would
outweigh the tree; there sampling without replacement rarely forces anything (two samples of a long step
seldom coincide), so the plain mean is the estimate to use: the real-model presets set
`critics.label_estimate: mean`.

`arbor.tasks.is_solved` is the one definition of correct. Nodes with no completion are left unlabelled.

One row per labelled node: problem_id, node, parent, depth, terminal, n_completions, n_extra, n_correct,
value, prm_soft, prm_hard, orm (null off terminals), prefix (text before the step: prompt + earlier steps),
step (the node's step text; the prompt for the root), prefix_len (tokens before the step), tokens (every token
id from the prompt through the step) and owner (the leaf reached by following first children, whose token
path contains the node's: `path_owner`; training packs a problem's paths into one token trie instead,
arbor/train/critic.py), confidence ([3] features of the policy's token log-probs along the path,
arbor/critics/confidence.py). Label sets are parquet, open with
`datasets.load_dataset("parquet", data_files=...)`, and are split by problem (`assign_splits`), never by node.

Completion rows (`build_labels(completion_rows=True)`): the extra completions are whole solutions with a known
outcome, so each can also train the critics directly: one row per step of the completion (split as the tree
splits steps, `step_ends`), node = a negative id (never a tree node), value = prm_soft = prm_hard = its outcome
(a one-sample Monte Carlo label: unbiased, noisy), orm at its last step if the completion is complete (an
answer line or EOS; one cut by a limit is no solution to judge); the rows of one completion share one owner
and each row is its own parent (no sibling pairs). They multiply the outcome labels several times at no extra
policy compute; metrics are only ever taken on tree nodes (node >= 0).
Outcome rows (`outcome_labels`, `critics.outcome_problems`) are the same rows for whole solutions sampled from
the prompt of a train problem that has no tree (Cobbe et al. 2021): more problems than the search can afford.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numba as nb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from arbor.critics.confidence import path_features, path_steps, sample_features
from arbor.lm.base import Policy, StopRule
from arbor.lm.kvcache import KVStore, prefix_key
from arbor.tasks import is_solved, is_terminal_step

LABEL_SCHEMA = pa.schema([
    ("problem_id", pa.string()), ("node", pa.int32()), ("parent", pa.int32()), ("depth", pa.int32()),
    ("terminal", pa.bool_()), ("n_completions", pa.int32()), ("n_extra", pa.int32()), ("n_correct", pa.int32()),
    ("value", pa.float32()), ("prm_soft", pa.float32()), ("prm_hard", pa.float32()), ("orm", pa.float32()),
    ("prefix", pa.string()), ("step", pa.string()), ("prefix_len", pa.int32()), ("tokens", pa.list_(pa.int32())),
    ("owner", pa.int32()), ("confidence", pa.list_(pa.float64())),
])

SPLITS = ("train", "val", "heldout")
ESTIMATES = ("policy", "mean")
"""How a node's value and soft label are estimated on its tree (`policy_values` | plain mean of completions)."""


@nb.njit(cache=True)
def mc_counts(parent, terminal, reward, solved, extra_n, extra_correct, extra_sum):  # pragma: no cover - numba
    """Completions below each node: (n [N] int64, n_correct [N] int64, reward_sum [N] float64).

    parent [N] int32 (parent[i] < i, root 0 has -1); terminal [N] bool; reward [N] float (NaN = unknown);
    solved [N] bool (is_solved(reward)); extra_* [N]: extra completions sampled from each node. One pass up the
    tree in reverse creation order adds each node's totals to its parent.
    """
    n_nodes = parent.shape[0]
    n = np.zeros(n_nodes, np.int64)
    correct = np.zeros(n_nodes, np.int64)
    total = np.zeros(n_nodes, np.float64)
    for i in range(n_nodes):
        if terminal[i] and not np.isnan(reward[i]):
            n[i] += 1
            total[i] += reward[i]
            correct[i] += 1 if solved[i] else 0
        n[i] += extra_n[i]
        correct[i] += extra_correct[i]
        total[i] += extra_sum[i]
    for i in range(n_nodes - 1, 0, -1):
        p = parent[i]
        n[p] += n[i]
        correct[p] += correct[i]
        total[p] += total[i]
    return n, correct, total


@nb.njit(cache=True)
def policy_values(parent, log_prior, terminal, reward, extra_n, extra_sum):  # pragma: no cover - numba
    """V [N] float64, the policy's expected outcome from each node estimated on the tree (NaN = no estimate).

    Search widens a node with steps sampled *without replacement*, so a tree holds a node's likely step once
    and as many forced unlikely siblings as it was widened; a plain mean over the terminals below counts each
    forced sibling as often as the step the policy takes (on the tiny default a right last step with 7 forced
    wrong answer lines below it reads 1/8). Here children count by the policy's probability of their step
    instead, pi_a = exp(log_prior[a]):

    - a scored terminal: its reward;
    - an inner node with valued children a and no extra completions: sum_a pi_a V(a) / sum_a pi_a (the policy
      renormalised over the explored steps; a running log-sum-exp, so a 40-token step at -120 nats does not
      underflow, and children whose log-priors are all -inf weigh equally);
    - with valued children and `extra_n[i]` > 0 extra completions sampled from the node (their reward sum
      `extra_sum[i]`): sum_a pi_a V(a) + (1 - sum_a pi_a) * extra mean (the extras stand for the mass the
      tree has not explored);
    - no valued child: the mean of its extra completions (NaN without any).

    parent [N] int32 (parent[i] < i), log_prior [N] float64, terminal [N] bool, reward [N] float (NaN =
    unscored), extra_n [N] int, extra_sum [N] float. With every log-prior 0 (each step certain), the second rule
    is the plain mean over children, not over terminals.
    """
    n = parent.shape[0]
    value = np.full(n, np.nan)
    m = np.full(n, -np.inf)  # running max of the valued children's log-priors
    s = np.zeros(n)  # sum of exp(log_prior - m)
    w = np.zeros(n)  # sum of exp(log_prior - m) * V
    count = np.zeros(n, np.int64)
    for i in range(n - 1, -1, -1):  # children (higher index) are done before their parent
        if terminal[i]:
            if not np.isnan(reward[i]):
                value[i] = reward[i]
        elif count[i] > 0 and s[i] > 0:
            mass = np.exp(m[i]) * s[i]  # the policy's probability of the valued children's steps
            if extra_n[i] > 0 and mass < 1.0:
                value[i] = np.exp(m[i]) * w[i] + (1.0 - mass) * extra_sum[i] / extra_n[i]
            else:  # no extras, or (rounding) the children hold all of the mass
                value[i] = w[i] / s[i]
        elif extra_n[i] > 0:
            value[i] = extra_sum[i] / extra_n[i]
        p = parent[i]
        if p < 0 or np.isnan(value[i]):
            continue
        lp = log_prior[i] if np.isfinite(log_prior[i]) else -1e300  # -inf (underflowed): weight ~0
        if lp > m[p]:
            scale = np.exp(m[p] - lp) if np.isfinite(m[p]) else 0.0
            s[p] *= scale
            w[p] *= scale
            m[p] = lp
        e = np.exp(lp - m[p])
        s[p] += e
        w[p] += e * value[i]
        count[p] += 1
    return value


@nb.njit(cache=True)
def path_owner(parent):  # pragma: no cover - numba
    """owner [N] int32: the leaf reached from each node by following first (lowest-index) children."""
    n_nodes = parent.shape[0]
    first = np.full(n_nodes, -1, np.int32)
    for i in range(n_nodes - 1, 0, -1):
        first[parent[i]] = i  # the last write is the lowest index
    owner = np.empty(n_nodes, np.int32)
    for i in range(n_nodes - 1, -1, -1):
        owner[i] = i if first[i] == -1 else owner[first[i]]
    return owner


def assign_splits(problem_ids: Sequence[str], *, heldout_fraction: float, val_fraction: float,
                  seed: int) -> dict[str, str]:
    """problem_id -> "train" | "val" | "heldout": problems ordered by a seeded hash of their id, the first
    round(heldout_fraction * n) held out, the next round(val_fraction * n) for validation (at least one each
    when there are 3 or more problems). Deterministic in (ids, seed); the split never depends on nodes."""
    ids = sorted(set(problem_ids), key=lambda p: hashlib.blake2b(f"{seed}:{p}".encode(), digest_size=8).digest())
    n = len(ids)
    n_held = round(heldout_fraction * n)
    n_val = round(val_fraction * n)
    if n >= 3:
        n_held, n_val = max(1, n_held), max(1, n_val)
    return {p: ("heldout" if i < n_held else "val" if i < n_held + n_val else "train") for i, p in enumerate(ids)}


class TreeArrays:
    """One problem's tree from its parquet rows (arbor/mcts/treeio.py), nodes in creation order."""

    def __init__(self, rows: pa.Table) -> None:
        rows = rows.sort_by("node")
        col = rows.column
        self.problem_id = str(col("problem_id")[0])
        self.parent = col("parent").to_numpy().astype(np.int32)
        if not np.all(self.parent[1:] < np.arange(1, len(self.parent))):
            raise ValueError(f"{self.problem_id}: parents must precede children (node index = creation order)")
        self.depth = col("depth").to_numpy().astype(np.int32)
        self.terminal = col("terminal").to_numpy(zero_copy_only=False).astype(np.bool_)
        self.reward = col("reward").to_numpy(zero_copy_only=False).astype(np.float64)
        self.step_text = col("step_text").to_pylist()
        self.tok_start = col("tok_start").to_numpy().astype(np.int64)
        self.tok_len = col("tok_len").to_numpy().astype(np.int64)
        self.log_prior = col("log_prior").to_numpy(zero_copy_only=False).astype(np.float64)
        self.tokens = np.asarray(col("tokens")[0].as_py(), np.int32)
        self.solved = np.array([is_solved(float(r)) for r in self.reward], np.bool_)

    def __len__(self) -> int:
        return len(self.parent)

    def path(self, node: int) -> list[int]:
        """Node ids from the root to `node`."""
        out = [node]
        while self.parent[out[-1]] >= 0:
            out.append(int(self.parent[out[-1]]))
        return out[::-1]

    def path_tokens(self, node: int) -> np.ndarray:
        return np.concatenate([self.tokens[self.tok_start[n]: self.tok_start[n] + self.tok_len[n]]
                               for n in self.path(node)])

    def solution_text(self, node: int) -> str:
        """Step texts from the first step through `node` (prompt excluded)."""
        return "".join(self.step_text[n] for n in self.path(node)[1:])


def token_pieces(decode: Callable[[Sequence[int]], str]) -> Callable[[int], str]:
    """`piece(t)`: one token's text, `decode([t])`, cached (what `step_ends` reads to split a path into steps)."""
    from functools import lru_cache

    return lru_cache(maxsize=None)(lambda t: decode([t]))


def step_ends(token_ids: Sequence[int], piece: Callable[[int], str], *, step_tokens: int,
              is_terminal: Callable[[str], bool]) -> list[int]:
    """Exclusive end index of each step of `token_ids` [T] as the search tree splits a path (a step ends after a
    token whose text `piece(t)` holds a newline, unless the step is blank so far: a blank line starts the next
    step, as in `arbor.lm.trie`; or after `step_tokens` tokens), cut after the first step that `is_terminal`
    accepts.

    >>> step_ends([1, 10, 2, 10, 3], lambda t: "\\n" if t == 10 else "x", step_tokens=8, is_terminal=lambda s: False)
    [2, 4, 5]
    >>> step_ends([10, 10, 2, 10, 3], lambda t: "\\n" if t == 10 else "x", step_tokens=8, is_terminal=lambda s: False)
    [4, 5]
    """
    ends: list[int] = []
    start, text = 0, ""
    for i, t in enumerate(token_ids):
        p = piece(int(t))
        text += p
        if ("\n" in p and text.strip()) or i + 1 - start >= step_tokens or i + 1 == len(token_ids):
            ends.append(i + 1)
            if is_terminal(text):
                break
            start, text = i + 1, ""
    return ends


def extra_completions(trees: Sequence[TreeArrays], needs: Sequence[np.ndarray], *, policy: Policy,
                      rewards: Sequence[Callable[[str], float]], max_tokens: int, step_tokens: int, seed: int,
                      rows_per_call: int = 256, progress: bool = False, sink: list | None = None,
                      ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sample `needs[t][i]` completions from node i of tree t, each ended at its first terminal step line (as a
    fast rollout is), batched across trees in `Policy.expand` calls of about `rows_per_call` sequences; scored by
    `rewards[t]`. Returns (extra_n, extra_correct, extra_sum), each [N_t], per tree. `sink`: when given, gets
    one (tree index, node, continuation, reward) per completion."""
    out = [(np.zeros(len(t), np.int64), np.zeros(len(t), np.int64), np.zeros(len(t), np.float64)) for t in trees]
    jobs = [(t, int(i), int(need[i])) for t, need in enumerate(needs) for i in np.flatnonzero(need > 0)]
    # by path length: a call's parents are left-padded to its longest, so similar lengths waste little
    jobs.sort(key=lambda job: int(trees[job[0]].tok_len[trees[job[0]].path(job[1])].sum()))
    stop = StopRule(at_newline=False, max_new_tokens=max_tokens, line_tokens=step_tokens,
                    final_line=is_terminal_step)
    chunk: list[tuple[int, int, int]] = []
    calls = 0
    from tqdm import tqdm

    bar = tqdm(total=sum(n for _, _, n in jobs), desc="extra completions", unit="seq", disable=not progress)
    for k, job in enumerate(jobs):
        chunk.append(job)
        if sum(n for _, _, n in chunk) < rows_per_call and k + 1 < len(jobs):
            continue
        store = KVStore()
        parents = []
        for t, i, _ in chunk:
            ids = trees[t].path_tokens(i)
            parents.append((prefix_key(ids), ids.tolist()))
        conts = policy.expand(parents, [n for _, _, n in chunk], stop=stop, temperature=1.0, seed=seed + calls,
                              store=store, final=lambda _i, _text: True)
        for (t, i, _), cs in zip(chunk, conts, strict=True):
            prefix = trees[t].solution_text(i)
            got = [float(rewards[t](prefix + c.text)) for c in cs]
            if sink is not None:
                sink.extend((t, i, c, r) for c, r in zip(cs, got, strict=True))
            out[t][0][i] = len(got)
            out[t][1][i] = sum(is_solved(r) for r in got)
            out[t][2][i] = float(np.sum(got))
        bar.update(sum(n for _, _, n in chunk))
        chunk, calls = [], calls + 1
    bar.close()
    return out


def hard_label(n: int, correct: int, hard_completions: int, rng: np.random.Generator) -> float:
    """Math-Shepherd hard label: 1 if any of `hard_completions` of the n completions (drawn without replacement)
    is correct, all n when hard_completions is 0 or >= n."""
    if hard_completions <= 0 or n <= hard_completions:
        return float(correct > 0)
    return float(rng.hypergeometric(correct, n - correct, hard_completions) > 0) if correct else 0.0


def tree_labels(tree: TreeArrays, extra: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                decode: Callable[[Sequence[int]], str] | None = None, hard_completions: int = 0,
                seed: int = 0, estimate: str = "policy") -> dict[str, list]:
    """Label columns (LABEL_SCHEMA) of one tree's labelled nodes; `extra` = `extra_completions(...)`.
    `decode` gives the prompt text of the root (default: the root row's step_text); `hard_completions` and
    `estimate` (policy | mean): see the module docstring (draws seeded by `seed` and the problem id)."""
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate={estimate!r}: expected one of {ESTIMATES}")
    n = len(tree)
    ex = extra or (np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float64))
    cnt, correct, total = mc_counts(tree.parent, tree.terminal, tree.reward, tree.solved, *ex)
    if estimate == "policy":
        value = policy_values(tree.parent, tree.log_prior, tree.terminal, tree.reward, ex[0], ex[2])
        solved = np.where(np.isnan(tree.reward), np.nan, tree.solved.astype(np.float64))  # unscored: no label
        soft = policy_values(tree.parent, tree.log_prior, tree.terminal, solved, ex[0], ex[1].astype(np.float64))
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            value, soft = total / cnt, correct / cnt
    owner = path_owner(tree.parent)
    conf = path_features(tree.parent, tree.log_prior, tree.tok_len, np.arange(n, dtype=np.int64))
    prompt = decode(tree.tokens[: tree.tok_len[0]].tolist()) if decode else tree.step_text[0]
    cols: dict[str, list] = {name: [] for name in LABEL_SCHEMA.names}
    pid_hash = int.from_bytes(hashlib.blake2b(tree.problem_id.encode(), digest_size=8).digest())
    rng = np.random.default_rng([seed, pid_hash])
    for i in np.flatnonzero(cnt > 0).tolist():
        path = tree.path(i)
        toks = tree.path_tokens(i)
        if estimate == "policy" and hard_completions > 0:  # any of N policy completions right: 1 - (1 - p)^N
            hard = float(rng.random() < 1.0 - (1.0 - float(soft[i])) ** hard_completions)
        else:
            hard = hard_label(int(cnt[i]), int(correct[i]), hard_completions, rng)
        row = {
            "problem_id": tree.problem_id, "node": i, "parent": int(tree.parent[i]), "depth": int(tree.depth[i]),
            "terminal": bool(tree.terminal[i]), "n_completions": int(cnt[i]), "n_extra": int(ex[0][i]),
            "n_correct": int(correct[i]), "value": float(value[i]), "prm_soft": float(soft[i]), "prm_hard": hard,
            "orm": float(tree.solved[i]) if tree.terminal[i] and not np.isnan(tree.reward[i]) else None,
            "prefix": "" if i == 0 else prompt + "".join(tree.step_text[m] for m in path[1:-1]),
            "step": prompt if i == 0 else tree.step_text[i],
            "prefix_len": int(len(toks) - tree.tok_len[i]) if i else 0, "tokens": toks.tolist(),
            "owner": int(owner[i]), "confidence": conf[i].tolist(),
        }
        for k, v in row.items():
            cols[k].append(v)
    return cols


def continuation_rows(problem_id: str, path: list[int], prefix_steps: np.ndarray, prefix_text: str, depth: int,
                      cont: Any, reward: float, first_id: int, *, piece: Callable[[int], str], step_tokens: int,
                      eos_token_id: int | None) -> dict[str, list]:
    """Label columns of one sampled continuation of the token path `path` (module docstring, "Completion
    rows"): one row per step of `cont` (split by `step_ends`, a trailing EOS left out), node ids first_id,
    first_id - 1, ... (negative), each its own parent, owner = the id of its last row; value = `reward`,
    prm_soft = prm_hard = its outcome; the last step is terminal with the outcome as its ORM label only when the
    continuation is complete (it states an answer line or the policy ended it with EOS): one cut by a token or
    line limit is no solution to judge. Depths from `depth` + 1. `prefix_steps` [d, 2]: (log-prob sum, tokens)
    of the steps `path` holds after the prompt (`path_steps`; none for a prompt), `prefix_text` the text of
    `path`."""
    toks = list(cont.token_ids)
    if toks and cont.finish == "eos" and toks[-1] == eos_token_id:
        toks = toks[:-1]
    ends = step_ends(toks, piece, step_tokens=step_tokens, is_terminal=is_terminal_step)
    cols: dict[str, list] = {name: [] for name in LABEL_SCHEMA.names}
    conf = sample_features(cont.logprobs, ends, prefix_steps) if ends else np.zeros((0, 3))
    solved = float(is_solved(reward))
    prefix = prefix_text
    for j, e in enumerate(ends):
        start = ends[j - 1] if j else 0
        step = "".join(piece(t) for t in toks[start:e])
        last = j + 1 == len(ends) and (cont.finish == "eos" or is_terminal_step(step))
        row = {"problem_id": problem_id, "node": first_id - j, "parent": first_id - j,
               "depth": depth + j + 1, "terminal": last, "n_completions": 1, "n_extra": 0,
               "n_correct": int(solved), "value": float(reward), "prm_soft": solved, "prm_hard": solved,
               "orm": solved if last else None, "prefix": prefix, "step": step, "prefix_len": len(path) + start,
               "tokens": path + toks[:e], "owner": first_id - len(ends) + 1, "confidence": conf[j].tolist()}
        prefix += step
        for k, v in row.items():
            cols[k].append(v)
    return cols


def completion_labels(tree: TreeArrays, node: int, cont: Any, reward: float, first_id: int, *,
                      piece: Callable[[int], str], step_tokens: int, eos_token_id: int | None) -> dict[str, list]:
    """Label columns of one extra completion from `node` of `tree` (`continuation_rows`)."""
    return continuation_rows(tree.problem_id, tree.path_tokens(node).tolist(),
                             path_steps(tree.parent, tree.log_prior, tree.tok_len, node),
                             "".join(tree.step_text[m] for m in tree.path(node)), int(tree.depth[node]), cont,
                             reward, first_id, piece=piece, step_tokens=step_tokens, eos_token_id=eos_token_id)


def outcome_labels(prompts: dict[str, list[int]], rewards: dict[str, Callable[[str], float]], *, policy: Policy,
                   samples: int, step_tokens: int, max_depth: int, seed: int, rows_per_call: int = 256,
                   progress: bool = False) -> tuple[pa.Table, np.ndarray]:
    """Label rows of `samples` whole solutions the policy samples (temperature 1) for each problem of `prompts`
    ({problem_id: prompt token ids}; problems that have no tree): each solution's steps and outcome, scored by
    `rewards[problem_id](solution text)`, as one-sample Monte Carlo labels (`continuation_rows`): the outcome
    supervision of Cobbe et al.'s verifiers (arXiv 2110.14168 §4: an ORM trained on many sampled solutions per
    training problem, labelled by the final answer), here for all three critics. A solution is decoded as a
    root-to-terminal path of the search is (`StopRule.trajectory`: at most `max_depth` steps of `step_tokens`,
    ended by the first answer line); the k samples of a prompt share its prefix state (`Policy.expand`), calls
    of about `rows_per_call` sequences, call c seeded `seed + c`. Returns the rows and the rewards [P * k] of
    all solutions (those without a step included), problem by problem."""
    stop = StopRule.trajectory(step_tokens=step_tokens, max_depth=max_depth, is_terminal=is_terminal_step)
    piece = token_pieces(policy.decode)
    pids = list(prompts)
    per_call = max(1, rows_per_call // max(1, samples))
    parts: list[dict[str, list]] = []
    got: list[float] = []
    from tqdm import tqdm

    for c, a in enumerate(tqdm(range(0, len(pids), per_call), desc="outcome samples", unit="call",
                               disable=not progress)):
        chunk = pids[a: a + per_call]
        conts = policy.expand([(prefix_key(prompts[p]), list(prompts[p])) for p in chunk], samples, stop=stop,
                              temperature=1.0, seed=seed + c, store=KVStore(), final=lambda _i, _text: True)
        for p, cs in zip(chunk, conts, strict=True):
            text = policy.decode(prompts[p])
            next_id = -1
            for cont in cs:
                got.append(float(rewards[p](cont.text)))
                cols = continuation_rows(p, list(prompts[p]), np.zeros((0, 2)), text, 0, cont, got[-1], next_id,
                                         piece=piece, step_tokens=step_tokens, eos_token_id=policy.eos_token_id)
                next_id -= max(1, len(cols["node"]))
                parts.append(cols)
    table = pa.table({name: [v for p in parts for v in p[name]] for name in LABEL_SCHEMA.names}, schema=LABEL_SCHEMA)
    return table, np.asarray(got, np.float64)


def build_labels(trees: pa.Table, *, min_completions: int = 0, policy: Policy | None = None,
                 rewards: dict[str, Callable[[str], float]] | None = None, completion_tokens: int = 96,
                 step_tokens: int = 32, seed: int = 0, rows_per_call: int = 256, progress: bool = False,
                 completion_rows: bool = False, hard_completions: int = 0, estimate: str = "policy") -> pa.Table:
    """The label table of every tree in `trees` (rows of arbor/mcts/treeio.py, any number of problems).

    With `min_completions` > 0, nodes with fewer completions in the tree get extra ones from `policy` (batched
    across problems), scored by `rewards[problem_id](solution text)` (the task's oracle reward); with
    `completion_rows` each of them also becomes labelled rows of its own; `hard_completions`: Math-Shepherd's
    fixed N for the hard labels; `estimate`: how values are estimated on a tree (module docstring).
    """
    if min_completions > 0 and (policy is None or rewards is None):
        raise ValueError("min_completions > 0 needs a policy and the problems' reward functions")
    pids = list(dict.fromkeys(trees.column("problem_id").to_pylist()))
    pid_col = trees.column("problem_id")
    arrays = [TreeArrays(trees.filter(pc.equal(pid_col, pid))) for pid in pids]
    extras: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(arrays)
    if min_completions > 0:
        needs = []
        for t in arrays:
            z = np.zeros(len(t), np.int64)
            cnt, _, _ = mc_counts(t.parent, t.terminal, t.reward, t.solved, z, z, z.astype(np.float64))
            needs.append(np.where(t.terminal, 0, np.maximum(0, min_completions - cnt)))
        sink: list | None = [] if completion_rows else None
        extras = list(extra_completions(arrays, needs, policy=policy, rewards=[rewards[p] for p in pids],  # type: ignore
                                        max_tokens=completion_tokens, step_tokens=step_tokens, seed=seed,
                                        rows_per_call=rows_per_call, progress=progress, sink=sink))
    decode = policy.decode if policy is not None else None
    parts = [tree_labels(t, e, decode=decode, hard_completions=hard_completions, seed=seed, estimate=estimate)
             for t, e in zip(arrays, extras, strict=True)]
    if min_completions > 0 and completion_rows:
        piece = token_pieces(policy.decode)  # type: ignore[union-attr]
        next_id = [-1] * len(arrays)
        for t, node, cont, reward in sink:  # type: ignore[union-attr]
            cols = completion_labels(arrays[t], node, cont, reward, next_id[t], piece=piece, step_tokens=step_tokens,
                                     eos_token_id=policy.eos_token_id)  # type: ignore[union-attr]
            next_id[t] -= len(cols["node"])
            parts.append(cols)
    cols = {name: [v for p in parts for v in p[name]] for name in LABEL_SCHEMA.names}
    return pa.table(cols, schema=LABEL_SCHEMA)


def read_tree_files(files: Sequence[str | Path]) -> pa.Table:
    """Concatenate tree parquet files (`arbor.mcts.treeio.read_trees`, either generation of the format)."""
    from arbor.mcts.treeio import read_trees

    if not files:
        raise FileNotFoundError("no tree files (expected trees/iter_<k>/*.parquet from `arbor search`)")
    return pa.concat_tables([read_trees(f) for f in files], promote_options="default")


def write_labels(path: str | Path, table: pa.Table) -> None:
    """Write a label table as one parquet file, atomically."""
    from arbor.pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def label_counts(table: pa.Table) -> dict[str, int]:
    """Rows and positives per critic over tree nodes: value (V >= 0.5), prm (hard label, steps only), orm
    (terminals); `completion_rows`: the rows of extra completions (not counted above)."""
    node = table.column("node").to_numpy()
    d = table.filter(pc.greater_equal(table.column("node"), 0)).to_pydict()
    depth = np.asarray(d["depth"])
    value = np.asarray(d["value"], np.float64)
    hard = np.asarray(d["prm_hard"], np.float64)
    orm = [x for x in d["orm"] if x is not None]
    return {"value_n": len(value), "value_pos": int((value >= 0.5).sum()),
            "prm_n": int((depth > 0).sum()), "prm_pos": int(hard[depth > 0].sum()),
            "orm_n": len(orm), "orm_pos": int(sum(orm)), "problems": len(set(d["problem_id"])),
            "completion_rows": int((node < 0).sum())}
