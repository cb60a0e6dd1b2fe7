"""Stage `search`: tree search over the train split with the iteration's policy; trees as parquet.

`search.algorithm` picks eta-MCTS (AlphaLLM), Tree-GRPO sampling, or independent chains. Training-time search
knows the gold answer: terminals are valued by the task's outcome reward (the oracle), inner nodes by fast
rollouts. Output: `trees/iter_<k>/part-*.parquet` (one row per node, see arbor/mcts/treeio.py) and
`metrics/search_<k>.json`.

Resumable: problems are searched in shards; each shard's stats JSON is written, then its parquet file, both
atomically, so a shard is done exactly when its parquet exists. A killed run restarts after the last done
shard; a half-written file is never taken as done. `_fingerprint.json` records the config, policy, train file
and arbor source a shard set belongs to; a different one clears the directory first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from arbor.lm.base import Policy
from arbor.lm.kvcache import KVStore
from arbor.mcts.grow import TreeBuilder
from arbor.mcts.kernels import backup_values, terminal_nodes
from arbor.mcts.samplers import chain_tree, tree_grpo
from arbor.mcts.scoring import RewardScorer
from arbor.mcts.search import eta_mcts, readouts
from arbor.mcts.treeio import tree_rows, write_trees
from arbor.pipeline.config import ArborConfig, SearchConfig, to_dict
from arbor.pipeline.io import read_json, write_json
from arbor.pipeline.seeds import derive_seed
from arbor.pipeline.tracking import NullTracker, Tracker
from arbor.tasks import Problem, Task, answers_match, build_task, is_terminal_step, parse_number, read_problems


def _value_terminals(b: TreeBuilder, reward: Any) -> None:
    """Outcome reward at every terminal, backed up (Tree-GRPO and chains have no scorer of their own)."""
    tree = b.tree
    terms = terminal_nodes(tree)
    values = np.array([reward(b.text(int(t))) for t in terms])
    tree.reward[terms] = values
    tree.critic_score[terms] = values
    backup_values(tree, terms, values, undo_virtual=False)


def search_problem(policy: Policy, task: Task, problem: Problem, cfg: SearchConfig, seed: int,
                   store: KVStore) -> tuple[dict[str, list], dict[str, Any]]:
    """Search one problem; returns its node rows and its stats."""
    prompt = policy.encode_prompt(task.prompt(problem))
    before = policy.counters.snapshot()
    t0 = time.perf_counter()

    def reward(text: str) -> float:
        return task.reward(problem, text)

    group = None
    e = cfg.eta
    if cfg.algorithm == "eta_mcts":
        scorer = RewardScorer(reward, n_rollouts=cfg.n_rollouts, rollout_tokens=cfg.rollout_tokens)
        res = eta_mcts(policy, prompt, scorer=scorer, is_terminal=is_terminal_step, cfg=e, seed=seed, store=store)
    else:
        common = {"step_tokens": e.step_tokens, "max_depth": e.max_depth, "is_terminal": is_terminal_step,
                  "temperature": e.temperature, "seed": seed, "store": store}
        if cfg.algorithm == "tree_grpo":
            b, group = tree_grpo(policy, prompt, m=cfg.grpo_m, l_rounds=cfg.grpo_l, n=cfg.grpo_n, **common)
        else:
            b = chain_tree(policy, prompt, g=cfg.chains, **common)
        _value_terminals(b, reward)
        res = readouts(b, 0)
    tree = res.builder.tree
    used = policy.counters.since(before)
    terms = terminal_nodes(tree)

    def ok(node: int) -> bool:
        return bool(node >= 0 and tree.reward[node] == 1.0)

    stats = {
        "problem_id": problem.id, "nodes": tree.num_nodes, "terminals": len(terms),
        "forward_tokens": used.forward_tokens, "unique_tokens": tree.num_tokens,
        "padded_positions": used.padded_positions,
        "solved_any": bool(np.any(tree.reward[terms] == 1.0)), "solved_greedy": ok(res.greedy_leaf),
        "solved_best": ok(res.best_leaf), "solved_rerank": ok(res.rerank_leaf),
        "solved_vote": bool(res.vote_answer is not None and answers_match(parse_number(res.vote_answer),
                                                                          problem.answer)),
        "merged": res.builder.merged, "wall_seconds": time.perf_counter() - t0,
    }
    if cfg.algorithm == "tree_grpo":  # Tree-GRPO §3: expected tokens M*B + M*L*N*B/2, B = mean trajectory length
        prompt_len = int(tree.tok_len[0])
        b_len = float(np.mean([tree.path_tokens(int(t)).size - prompt_len for t in terms])) if len(terms) else 0.0
        stats["grpo_expected_tokens"] = cfg.grpo_m * b_len * (1 + cfg.grpo_l * cfg.grpo_n / 2) + prompt_len
    store.clear()  # this problem's prefixes are never needed again
    return tree_rows(problem.id, tree, policy.decode, group), stats


def code_digest() -> str:
    """Digest of the arbor source: shards written by other code are not resumed from."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _fingerprint(cfg: ArborConfig, policy_dir: str | Path, train_file: str | Path) -> str:
    h = hashlib.sha256(json.dumps({"search": to_dict(cfg.search), "seed": cfg.seed, "task": to_dict(cfg.task),
                                   "code": code_digest()}, sort_keys=True).encode())
    for f in [*sorted(Path(policy_dir).glob("*")), Path(train_file)]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def summarize(stats: list[dict[str, Any]], algorithm: str) -> dict[str, Any]:
    """Aggregate per-problem stats into the stage metrics."""
    n = len(stats)
    keys = ["nodes", "terminals", "forward_tokens", "unique_tokens", "padded_positions", "merged", "wall_seconds"]
    tot = {k: sum(s[k] for s in stats) for k in keys + (["grpo_expected_tokens"] if algorithm == "tree_grpo" else [])}
    out: dict[str, Any] = {"algorithm": algorithm, "problems": n, **tot, "trajectories": tot["terminals"],
                           "reuse_ratio": tot["forward_tokens"] / max(1, tot["unique_tokens"])}
    for k in ("solved_any", "solved_greedy", "solved_best", "solved_rerank", "solved_vote"):
        out[k] = sum(s[k] for s in stats) / max(1, n)
    return out


def run(cfg: ArborConfig, *, policy_dir: str | Path, train_file: str | Path = "data/train.jsonl",
        out_dir: str | Path = "trees/iter_1", iteration: int = 1, tracker: Tracker | None = None,
        policy: Policy | None = None) -> dict[str, Any]:
    """Search the first `search.n_problems` train problems, shard by shard, resuming finished shards."""
    from arbor.lm.hf import HFPolicy

    tracker = tracker or NullTracker()
    s = cfg.search
    out_dir = Path(out_dir)
    fp = _fingerprint(cfg, policy_dir, train_file)
    fp_file = out_dir / "_fingerprint.json"
    if out_dir.exists() and (not fp_file.exists() or read_json(fp_file).get("fingerprint") != fp):
        shutil.rmtree(out_dir)  # shards of another config or policy: never mix them
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(fp_file, {"fingerprint": fp})
    problems = read_problems(train_file)[: s.n_problems]
    policy = policy or HFPolicy.from_pretrained(policy_dir, cfg.device)
    task = build_task(cfg.task)
    store = KVStore(int(s.kv_budget_mb * 2**20))
    stats: list[dict[str, Any]] = []
    shards = [problems[i : i + s.shard_size] for i in range(0, len(problems), s.shard_size)]
    bar = tqdm(total=len(problems), desc=f"search[{s.algorithm}]", unit="problem")
    for si, shard in enumerate(shards):
        part, side = out_dir / f"part-{si:05d}.parquet", out_dir / f"part-{si:05d}.stats.json"
        if part.exists() and side.exists():
            stats += read_json(side)
            bar.update(len(shard))
            continue
        rows, shard_stats = [], []
        for p in shard:
            r, st = search_problem(policy, task, p, s, derive_seed(cfg.seed, "search", iteration, p.id), store)
            rows.append(r)
            shard_stats.append(st)
            bar.update(1)
            done = stats + shard_stats
            bar.set_postfix(solved=f"{sum(x['solved_any'] for x in done)}/{len(done)}")
        write_json(side, shard_stats)
        write_trees(part, rows)
        stats += shard_stats
        tracker.log_metrics(summarize(stats, s.algorithm), step=si)
    bar.close()
    return summarize(stats, s.algorithm)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from arbor.stages.common import stage_cli

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--iter", type=int, default=1, help="Iteration k: searches with models/iter_<k-1>/policy.")
        p.add_argument("--policy", default=None, help="Policy dir (default models/iter_<k-1>/policy).")
        p.add_argument("--train", default="data/train.jsonl", help="Training problems.")
        p.add_argument("--out", default=None, help="Tree directory (default trees/iter_<k>).")
        p.add_argument("--metrics", default=None, help="Metrics JSON (default metrics/search_<k>.json).")

    def go(cfg: ArborConfig, a: argparse.Namespace, tr: Tracker) -> dict[str, Any]:
        m = run(cfg, policy_dir=a.policy or f"models/iter_{a.iter - 1}/policy", train_file=a.train,
                out_dir=a.out or f"trees/iter_{a.iter}", iteration=a.iter, tracker=tr)
        write_json(a.metrics or f"metrics/search_{a.iter}.json", m)
        return m

    return stage_cli("search", __doc__ or "", paths, go, argv)


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
