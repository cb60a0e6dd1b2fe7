"""Stage `search`: tree search over the train split with the iteration's policy; trees as parquet.

`search.algorithm` picks eta-MCTS (AlphaLLM), Tree-GRPO sampling, or independent chains. Training-time search
knows the gold answer: terminals are valued by the task's outcome reward (the oracle); inner nodes by the
critics of the previous iteration when `--critics` names them (AlphaLLM §4.3 node score, `CriticScorer`: prefix-
cached in the critics' own KV stores, emptied per problem), else by fast rollouts (`search.n_rollouts`; 0 = a
neutral 0.5). The metrics carry `critic_forward_tokens` and `critic_token_ratio` = critic forward tokens /
tokens stored in the trees (each stored token passes a critic at most once: <= 1; terminals take the oracle).
Iteration k searches with policy_0 for k = 0 and policy_{k-1} after (arbor/pipeline/plan.py).
Output: `trees/iter_<k>/part-*.parquet` (one row per node, see arbor/mcts/treeio.py; `search.shard_size`
problems per file), their `part-*.stats.json`, `_manifest.json` (checksums, written last) and
`metrics/search_<k>.json`. Open the trees with `manifest.verified_files(dir)`, which refuses a damaged output.

Lockstep (`search.lockstep`, arbor/lm/lockstep.py): problems are searched in fixed groups by index, their
searches' policy calls merged into one batched call per step (64 problems of the tiny default: 26.4 s one at
a time, 6.8 s at 32; README "Results"); a group's trees depend on which problems share it.
Critic-guided searches run in lockstep too: each problem scores on critic views of its own (`CriticSet.scorer`:
own stores and counters, the models shared), whose forwards count as model time (64 problems, critics_0 of a
fresh run: 36.6 s one at a time, 11.2 s at 32).

Resumable (arbor/pipeline/shards.py): each searched problem is committed as soon as its group ends, so a kill
loses at most the group in flight, and a re-run redoes any damaged or half-written file instead of reading it.
A group with a problem to redo is searched whole again (only the missing problems are committed), and seeds
are per problem, so the result does not depend on where a run was interrupted. `_fingerprint.json`
records the config, policy, train file and arbor source the trees belong to; with a different one the stage's
own files are removed first. `--out` must be a new, empty or trees directory: nothing else is ever deleted.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from arbor.critics.scorer import recorded_heldout
from arbor.lm.base import Policy
from arbor.lm.kvcache import KVStore
from arbor.mcts.accounting import sum_accounting, trie_tokens
from arbor.mcts.grow import TreeBuilder
from arbor.mcts.kernels import backup_values, terminal_nodes
from arbor.mcts.samplers import chain_tree, tree_grpo
from arbor.mcts.scoring import RewardScorer
from arbor.mcts.search import TimedPolicy, eta_mcts, readouts
from arbor.mcts.treeio import tree_rows, write_trees
from arbor.pipeline import plan
from arbor.pipeline.config import ArborConfig, ArborInputError, SearchConfig, to_dict
from arbor.pipeline.executors import EXECUTION_KEYS, Executor
from arbor.pipeline.io import write_json
from arbor.pipeline.manifest import fingerprint
from arbor.pipeline.seeds import derive_seed
from arbor.pipeline.shards import ShardedOutput
from arbor.pipeline.tracking import NullTracker, Tracker
from arbor.tasks import Problem, Task, build_task, is_solved, is_terminal_step, read_problems

log = logging.getLogger("arbor.search")


class CriticSet:
    """The critics of a search run, loaded once (only those `cfg.critics` weighs, on `cfg.device`); each
    problem gets a `CriticScorer` over them that binds its oracle reward."""

    def __init__(self, critics_dir: str | Path, cfg: ArborConfig) -> None:
        from arbor.critics.scorer import load_critics

        c = cfg.critics
        self.cfg = c
        self.critics = load_critics(critics_dir, c.needed(gold=True), device=cfg.device,
                                    budget_bytes=int(c.kv_budget_mb * 2**20), batch_size=c.batch_size,
                                    confidence=c.confidence)
        # a lockstep group's problems hold their critic prefixes at once: they share the budget evenly
        self.view_budget = int(c.kv_budget_mb * 2**20) // max(1, cfg.search.lockstep)

    def scorer(self, reward: Any) -> Any:
        """A `CriticScorer` over these critics with the oracle `reward` at terminals, on views of its own
        (`CachedCritic.view`: empty stores of 1/`search.lockstep` of `critics.kv_budget_mb`, zero counters), so
        that searches run together never share them and hold no more than the budget together."""
        from arbor.critics.scorer import CriticScorer

        views = {id(c): c.view(self.view_budget) for c in self.critics.values()}
        return CriticScorer({k: views[id(c)] for k, c in self.critics.items()}, self.cfg, reward)


def _value_terminals(b: TreeBuilder, reward: Any) -> None:
    """Outcome reward at every terminal, backed up (Tree-GRPO and chains have no scorer of their own)."""
    tree = b.tree
    terms = terminal_nodes(tree)
    values = np.array([reward(b.text(int(t))) for t in terms])
    tree.reward[terms] = values
    tree.critic_score[terms] = values
    backup_values(tree, terms, values, undo_virtual=False)


def search_problem(policy: Policy, task: Task, problem: Problem, cfg: SearchConfig, seed: int,
                   store: KVStore, critics: CriticSet | None = None, *,
                   own_store: bool = True) -> tuple[dict[str, list], dict[str, Any]]:
    """Search one problem; returns its node rows and its stats. `critics` (eta-MCTS): they score the inner
    nodes instead of rollouts; their prefix stores are emptied afterwards. `own_store=False` (a lockstep
    group, `search_group`): the store is shared with the group's other problems, so it is neither reset nor
    emptied here and the KV peak is the group's."""
    prompt = policy.encode_prompt(task.prompt(problem))
    before = policy.counters.snapshot()
    if own_store:
        store.reset_peaks()
    t0 = time.perf_counter()

    def reward(text: str) -> float:
        return task.reward(problem, text)

    group = None
    e = cfg.eta
    critic_tokens = 0
    if cfg.algorithm == "eta_mcts":
        scorer: Any = RewardScorer(reward, n_rollouts=cfg.n_rollouts, rollout_tokens=cfg.rollout_tokens)
        if critics is not None:
            scorer = critics.scorer(reward)
        res = eta_mcts(policy, prompt, scorer=scorer, is_terminal=is_terminal_step, cfg=e, seed=seed, store=store,
                       vote_key=task.vote_key)
    else:
        common = {"step_tokens": e.step_tokens, "max_depth": e.max_depth, "is_terminal": is_terminal_step,
                  "temperature": e.temperature, "seed": seed, "store": store}
        if cfg.algorithm == "tree_grpo":
            b, group = tree_grpo(policy, prompt, m=cfg.grpo_m, l_rounds=cfg.grpo_l, n=cfg.grpo_n, **common)
        else:
            b = chain_tree(policy, prompt, g=cfg.chains, **common)
        _value_terminals(b, reward)
        res = readouts(b, 0, task.vote_key)
    critic_seconds = 0.0
    if critics is not None and cfg.algorithm == "eta_mcts":
        critic_tokens, critic_seconds = scorer.critic_forward_tokens, scorer.model_seconds
        scorer.clear()  # this problem's prefixes are never needed again
    tree = res.builder.tree
    used = policy.counters.since(before)
    terms = terminal_nodes(tree)

    def ok(node: int) -> bool:
        return bool(node >= 0 and is_solved(tree.reward[node]))

    stats = {
        "problem_id": problem.id, "nodes": tree.num_nodes, "terminals": len(terms),
        "forward_tokens": used.forward_tokens, "unique_tokens": tree.num_tokens, "trie_tokens": trie_tokens(tree),
        "kv_peak_bytes": store.peak_nbytes, "kv_token_bytes": store.kv_token_bytes,
        "padded_positions": used.padded_positions, "padded_kv_positions": used.padded_kv_positions,
        "solved_any": any(is_solved(r) for r in tree.reward[terms]), "solved_greedy": ok(res.greedy_leaf),
        "solved_best": ok(res.best_leaf), "solved_rerank": ok(res.rerank_leaf),
        "solved_vote": bool(res.vote_answer is not None and task.is_correct(problem, f"Answer: {res.vote_answer}\n")),
        "merged": res.builder.merged, "critic_forward_tokens": critic_tokens, "critic_seconds": critic_seconds,
        "wall_seconds": time.perf_counter() - t0,
    }
    if cfg.algorithm == "tree_grpo":  # Tree-GRPO §3: expected tokens M*B + M*L*N*B/2, B = mean trajectory length
        prompt_len = int(tree.tok_len[0])
        b_len = float(np.mean([tree.path_tokens(int(t)).size - prompt_len for t in terms])) if len(terms) else 0.0
        stats["grpo_expected_tokens"] = cfg.grpo_m * b_len * (1 + cfg.grpo_l * cfg.grpo_n / 2) + prompt_len
    if own_store:
        store.clear()  # this problem's prefixes are never needed again
    return tree_rows(problem.id, tree, policy.decode, group), stats


def search_group(policy: Policy, task: Task, problems: Sequence[Problem], cfg: SearchConfig,
                 seeds: Sequence[int], store: KVStore,
                 critics: CriticSet | None = None) -> list[tuple[dict[str, list], dict[str, Any]]]:
    """Search `problems` in lockstep (`arbor.lm.lockstep`: one merged policy call per step of all their
    searches), each with its own seed; returns `search_problem`'s (rows, stats) per problem.

    The group's store holds every member's prefixes until the group ends. Per-problem model counters are the
    members' apportioned shares (their sums are exact); `wall_seconds` and the policy's part of `model_seconds`
    (inside `Policy` calls) are the group's split evenly and `kv_peak_bytes` the group's peak split by stored
    tokens, so the stage's sums stay true totals. Critics (eta-MCTS guided by them) score each problem on views
    of their own (`CriticSet.scorer`): a problem's critic forwards, tokens and seconds are its own, and its
    `model_seconds` adds its critic seconds (model time, not tree work). A group of one runs without lockstep.
    """
    from arbor.lm.lockstep import Lockstep, apportion

    clock = TimedPolicy(policy)
    if len(problems) == 1:
        out = []
        for p, s in zip(problems, seeds, strict=True):
            before = clock.seconds
            out.append(search_problem(clock, task, p, cfg, s, store, critics))  # type: ignore[arg-type]
            out[-1][1]["model_seconds"] = clock.seconds - before + out[-1][1]["critic_seconds"]
        return out
    store.reset_peaks()
    t0 = time.perf_counter()
    jobs = [partial(lambda member, p, s: search_problem(member, task, p, cfg, s, store, critics, own_store=False),
                    p=p, s=s) for p, s in zip(problems, seeds, strict=True)]
    out = Lockstep(clock).run(jobs)  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    peaks = apportion(store.peak_nbytes, [st["unique_tokens"] for _, st in out])
    for (_, st), peak in zip(out, peaks, strict=True):
        st["wall_seconds"] = wall / len(out)
        st["model_seconds"] = clock.seconds / len(out) + st["critic_seconds"]
        st["kv_peak_bytes"] = peak
    store.clear()
    return out


def _fingerprint(cfg: ArborConfig, policy_dir: str | Path, train_file: str | Path, iteration: int,
                 critics_dir: str | Path | None = None) -> str:
    """What the trees depend on: search/task config, seeds, the policy, critics and train file contents, the
    source."""
    # not where it ran, nor how many problems (each problem's tree is its own: raising search.n_problems keeps
    # the problems already searched), nor the KV budget (eviction never changes a tree; tests/test_engine.py)
    search = {k: v for k, v in to_dict(cfg.search).items()
              if k not in EXECUTION_KEYS and k not in ("n_problems", "kv_budget_mb")}
    config = {"search": search, "seed": cfg.seed, "task": to_dict(cfg.task), "iteration": iteration,
              "policy": to_dict(cfg.policy)}
    if critics_dir is None:
        return fingerprint(config, [policy_dir, train_file])
    return fingerprint({**config, "critics": to_dict(cfg.critics)}, [policy_dir, train_file, critics_dir])


def summarize(stats: list[dict[str, Any]], algorithm: str) -> dict[str, Any]:
    """Aggregate per-problem stats into the stage metrics. `model_seconds`: wall seconds inside `Policy` calls and
    critic calls (`critic_seconds`, critic-guided searches);
    `bookkeeping_fraction`: the rest's share of the searches' wall time (tree work, scoring glue, accounting;
    issue #9 asks <= 0.3%)."""
    n = len(stats)
    keys = ["nodes", "terminals", "forward_tokens", "unique_tokens", "padded_positions", "padded_kv_positions",
            "merged", "critic_forward_tokens", "wall_seconds"]
    tot = {k: sum(s[k] for s in stats) for k in keys + (["grpo_expected_tokens"] if algorithm == "tree_grpo" else [])}
    model = sum(float(s.get("model_seconds", 0.0)) for s in stats)
    tot["model_seconds"] = model
    tot["critic_seconds"] = sum(float(s.get("critic_seconds", 0.0)) for s in stats)
    tot["bookkeeping_fraction"] = 1.0 - model / tot["wall_seconds"] if tot["wall_seconds"] > 0 else None
    out: dict[str, Any] = {"algorithm": algorithm, "problems": n, **tot, "trajectories": tot["terminals"],
                           **sum_accounting({**s, "stored_tokens": s["unique_tokens"]} for s in stats),
                           "critic_token_ratio": tot["critic_forward_tokens"] / max(1, tot["unique_tokens"])}
    for k in ("solved_any", "solved_greedy", "solved_best", "solved_rerank", "solved_vote"):
        out[k] = sum(s[k] for s in stats) / max(1, n)
    return out


def problem_worker(cfg: ArborConfig, policy_dir: str, critics_dir: str | None, problems: Sequence[Problem],
                   iteration: int, *, policy: Policy | None = None,
                   critics: CriticSet | None = None) -> Callable[[int], list[tuple[int, dict[str, list], dict]]]:
    """The search of lockstep group `g` (`lockstep_groups`) -> [(problem index, node rows, stats)] for one
    process (`Executor.map`): the policy and critics are loaded once (unless given), the KV store is reused (and
    emptied) group after group. A group is always searched whole, even when some of its problems are already
    committed, so that its trees never depend on where a run was interrupted."""
    from arbor.lm.loading import load_policy
    from arbor.lm.lockstep import lockstep_groups

    policy = policy or load_policy(policy_dir, cfg)  # checks the files and manifest
    if critics is None and critics_dir is not None:
        critics = CriticSet(critics_dir, cfg)
    task = build_task(cfg.task)
    store = KVStore(int(cfg.search.kv_budget_mb * 2**20))
    groups = lockstep_groups(len(problems), cfg.search.lockstep)

    def search(g: int) -> list[tuple[int, dict[str, list], dict]]:
        idx = groups[g]
        ps = [problems[i] for i in idx]
        seeds = [derive_seed(cfg.seed, "search", iteration, p.id) for p in ps]
        out = search_group(policy, task, ps, cfg.search, seeds, store, critics)
        return [(i, rows, st) for i, (rows, st) in zip(idx, out, strict=True)]

    return search


def run(cfg: ArborConfig, *, policy_dir: str | Path, train_file: str | Path = "data/train.jsonl",
        out_dir: str | Path = "trees/iter_0", iteration: int = 0, tracker: Tracker | None = None,
        policy: Policy | None = None, critics_dir: str | Path | None = None) -> dict[str, Any]:
    """Search the first `search.n_problems` train problems, resuming every problem already committed.
    `critics_dir`: a `critics` stage output whose critics score the inner nodes (eta-MCTS); None = rollouts."""
    from arbor.lm.hf import check_model_path

    tracker = tracker or NullTracker()
    s = cfg.search
    if policy is None:
        check_model_path(Path(policy_dir))  # bad input fails before any output is touched
    if critics_dir is not None and s.algorithm != "eta_mcts":
        log.warning("search: search.algorithm=%s values no inner nodes; critics %s not used", s.algorithm,
                    critics_dir)
        critics_dir = None
    gate = None if critics_dir is None else cfg.critics.guide_gate(recorded_heldout(critics_dir))
    if gate is not None:
        log.warning("search: critics %s do not guide this search (%s); inner nodes are valued as without critics",
                    critics_dir, gate)
    guide = critics_dir if gate is None else None
    critics = CriticSet(guide, cfg) if guide is not None else None  # bad input fails here too
    executor = Executor.from_config(s)  # and a missing Ray install
    fp = _fingerprint(cfg, policy_dir, train_file, iteration, critics_dir)  # the critics' content, used or not
    problems = read_problems(train_file)[: s.n_problems]
    out = ShardedOutput(out_dir, n_items=len(problems), shard_size=s.shard_size, fingerprint=fp,
                        what="search trees")
    todo = out.todo()
    log.info("search: %d of %d problems already done, %d to search", len(problems) - len(todo), len(problems),
             len(todo))
    if todo:
        make = partial(problem_worker, cfg, str(Path(policy_dir).resolve()),
                       None if guide is None else str(Path(guide).resolve()), problems, iteration)
        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"search[{s.algorithm}]",
                   unit="problem")
        wanted = set(todo)
        groups = sorted({i // s.lockstep for i in todo})
        for _, found in executor.map(groups, make, lambda: make(policy=policy, critics=critics)):
            for i, rows, st in found:
                if i not in wanted:  # committed before; searched again only as part of its group
                    continue
                if out.commit(i, lambda path, rows=rows: write_trees(path, [rows]), st):
                    tracker.log_metrics(summarize(out.stats(), s.algorithm), step=i // s.shard_size)
                bar.update(1)
            done = out.stats()
            bar.set_postfix(solved=f"{sum(x['solved_any'] for x in done)}/{len(done)}")
        bar.close()
    return {**summarize(out.finish(), s.algorithm), "critics": None if critics_dir is None else str(critics_dir),
            "critics_guide": guide is not None, "critics_gate": gate}



def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from arbor.stages.common import stage_cli

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--iter", type=int, default=0, help="Iteration k >= 0: searches with models/iter_0/policy "
                                                           "for k = 0, models/iter_<k-1>/policy after.")
        p.add_argument("--policy", default=None, help="Policy dir (default: as --iter says).")
        p.add_argument("--critics", default=None, metavar="DIR|none",
                       help="Critics that score inner nodes (eta-MCTS): a `critics` stage output, or `none` for "
                            "rollouts / a neutral 0.5. Default: none for k = 0, models/iter_<k-1>/critics after.")
        p.add_argument("--train", default="data/train.jsonl", help="Training problems.")
        p.add_argument("--out", default=None, help="Tree directory (default trees/iter_<k>).")
        p.add_argument("--metrics", default=None, help="Metrics JSON (default metrics/search_<k>.json).")

    def go(cfg: ArborConfig, a: argparse.Namespace, tr: Tracker) -> dict[str, Any]:
        if a.iter < 0:
            raise ArborInputError(f"command line: --iter {a.iter}: expected an iteration >= 0")
        crit = plan.search_critics_dir(a.iter) if a.critics is None else None if a.critics == "none" else a.critics
        m = run(cfg, policy_dir=a.policy or plan.policy_dir(plan.searcher(a.iter)), train_file=a.train,
                out_dir=a.out or plan.trees_dir(a.iter), iteration=a.iter, tracker=tr, critics_dir=crit)
        write_json(a.metrics or f"metrics/search_{a.iter}.json", m)
        return m

    return stage_cli("search", __doc__ or "", paths, go, argv)


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
