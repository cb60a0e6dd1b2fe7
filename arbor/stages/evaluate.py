"""Stage `evaluate`: greedy pass@1, pass@k and majority@k of a policy on the eval split.

pass@k counts a problem solved if any of k samples (temperature `evaluate.temperature`) is correct; maj@k if
the most frequent final answer among the k samples is correct (self-consistency, Wang et al. 2022). Forward
tokens are counted at the policy boundary. Writes `metrics/iter_<k>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arbor.lm.base import Policy, StopRule
from arbor.pipeline.config import ArborConfig, ArborInputError, EtaMCTSConfig
from arbor.pipeline.seeds import derive_seed
from arbor.pipeline.tracking import NullTracker, Tracker
from arbor.tasks import Problem, Task, build_task, is_terminal_step, parse_number, read_problems
from arbor.tasks.answers import final_answer_line


def vote_key(completion: str) -> str | None:
    """What majority voting compares: the parsed number of the answer line, else its stripped text."""
    line = final_answer_line(completion)
    if line is None:
        return None
    num = parse_number(line)
    return str(num) if num is not None else line.strip()


def majority_correct(task: Task, problem: Problem, completions: Sequence[str]) -> bool:
    """Whether the most common final answer (ties: first seen) among `completions` is correct."""
    keys = [vote_key(c) for c in completions]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return False
    best = max(counts, key=lambda k: (counts[k], -keys.index(k)))
    return task.is_correct(problem, completions[keys.index(best)])


def evaluate_policy(policy: Policy, task: Task, problems: Sequence[Problem], *, k: int, temperature: float,
                    max_new_tokens: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Greedy pass@1, pass@k, maj@k and token counts of `policy` on `problems`."""
    stop = StopRule(at_newline=False, max_new_tokens=max_new_tokens)
    prompts = [policy.encode_prompt(task.prompt(p)) for p in problems]
    before = policy.counters.snapshot()
    t0 = time.perf_counter()
    greedy = policy.sample(prompts, stop=stop, temperature=0.0, seed=seed, batch_size=batch_size)
    greedy_tokens = policy.counters.since(before).forward_tokens
    samples = policy.sample([p for p in prompts for _ in range(k)], stop=stop, temperature=temperature,
                            seed=seed + 1, batch_size=batch_size)
    used = policy.counters.since(before)
    n = len(problems)
    g_ok = [task.is_correct(p, c.text) for p, c in zip(problems, greedy, strict=True)]
    per = [[c.text for c in samples[i * k : (i + 1) * k]] for i in range(n)]
    s_ok = [[task.is_correct(p, t) for t in texts] for p, texts in zip(problems, per, strict=True)]
    return {
        "greedy_pass1": sum(g_ok) / n,
        "pass_at_k": sum(any(r) for r in s_ok) / n,
        "maj_at_k": sum(majority_correct(task, p, t) for p, t in zip(problems, per, strict=True)) / n,
        "sample_accuracy": sum(map(sum, s_ok)) / (n * k),
        "k": k,
        "temperature": temperature,
        "eval_problems": n,
        "forward_tokens": used.forward_tokens,
        "padded_positions": used.padded_positions,
        "greedy_forward_tokens": greedy_tokens,
        "wall_seconds": time.perf_counter() - t0,
    }


def search_decode(policy: Policy, task: Task, problems: Sequence[Problem], *, eta: EtaMCTSConfig,
                  simulations: int, seed: int, kv_budget_mb: float) -> dict[str, Any]:
    """Decode each problem with eta-MCTS under the likelihood scorer (no oracle).

    Reported per read-out: `search_pass1` (greedy walk by Q, AlphaLLM's decoding), `search_best_pass1` (best
    terminal by Q), `search_vote_pass1` (Q-weighted vote over terminals). The search never sees the gold
    answer: the scorer is the policy's own confidence. Correctness is checked afterwards, here.

    Prefix states live in one KV store of `kv_budget_mb` (the search stage's `search.kv_budget_mb`), emptied
    after each problem; terminal steps store none (the builder tells the policy they end a trajectory).
    Token work (`search_forward_tokens`, `search_padded_kv_positions`) and the store's peak are reported.
    """
    from arbor.lm.kvcache import KVStore
    from arbor.mcts.scoring import LikelihoodScorer
    from arbor.mcts.search import eta_mcts

    eta = dataclasses.replace(eta, num_simulations=simulations)
    store = KVStore(int(kv_budget_mb * 2**20))
    before = policy.counters.snapshot()
    t0 = time.perf_counter()
    ok = Counter()
    for i, p in enumerate(problems):
        res = eta_mcts(policy, policy.encode_prompt(task.prompt(p)), scorer=LikelihoodScorer(policy),
                       is_terminal=is_terminal_step, cfg=eta, seed=seed + i, store=store)
        store.clear()  # another problem's prefixes are never reused
        for name, leaf in (("search_pass1", res.greedy_leaf), ("search_best_pass1", res.best_leaf)):
            ok[name] += leaf >= 0 and task.is_correct(p, res.builder.text(leaf))
        ok["search_vote_pass1"] += res.vote_answer is not None and task.is_correct(p, f"Answer: {res.vote_answer}\n")
    n = len(problems)
    used = policy.counters.since(before)
    return {**{k: ok[k] / n for k in ("search_pass1", "search_best_pass1", "search_vote_pass1")},
            "search_forward_tokens": used.forward_tokens, "search_padded_kv_positions": used.padded_kv_positions,
            "search_cache_misses": used.cache_misses, "search_kv_evictions": store.evictions,
            "search_kv_peak_mb": store.peak_nbytes / 2**20,
            "search_simulations": simulations, "search_wall_seconds": time.perf_counter() - t0}


def run(cfg: ArborConfig, *, policy_dir: str | Path = "models/iter_0/policy",
        eval_file: str | Path = "data/eval.jsonl", tracker: Tracker | None = None) -> dict[str, Any]:
    """Load the policy and evaluate it; returns the metrics dict."""
    from arbor.lm.loading import load_policy

    tracker = tracker or NullTracker()
    e = cfg.evaluate
    problems = read_problems(eval_file)[: e.n_problems]
    if not problems:
        raise ArborInputError(f"{eval_file}: no evaluation problems")
    policy = load_policy(policy_dir, cfg)
    task = build_task(cfg.task)
    seed = derive_seed(cfg.seed, "evaluate", str(policy_dir))
    metrics = evaluate_policy(policy, task, problems, k=e.k, temperature=e.temperature,
                              max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=seed)
    if e.search:
        metrics |= search_decode(policy, task, problems, eta=cfg.search.eta, simulations=e.search_simulations,
                                 seed=seed + 2, kv_budget_mb=cfg.search.kv_budget_mb)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from arbor.pipeline.io import write_json
    from arbor.stages.common import stage_cli

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--iter", type=int, default=0, help="Iteration: evaluates models/iter_<k>/policy.")
        p.add_argument("--policy", default=None, help="Policy dir (default models/iter_<iter>/policy).")
        p.add_argument("--eval", default="data/eval.jsonl", help="Evaluation problems.")
        p.add_argument("--metrics", default=None, help="Metrics JSON (default metrics/iter_<iter>.json).")

    def go(cfg: ArborConfig, a: argparse.Namespace, tr: Tracker) -> dict[str, Any]:
        m = run(cfg, policy_dir=a.policy or f"models/iter_{a.iter}/policy", eval_file=a.eval, tracker=tr)
        m["iteration"] = a.iter
        write_json(a.metrics or f"metrics/iter_{a.iter}.json", m)
        return m

    return stage_cli("evaluate", __doc__ or "", paths, go, argv)


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
