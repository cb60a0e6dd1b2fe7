"""Stage `evaluate`: greedy pass@1, pass@k and majority@k of a policy on the eval split.

pass@k counts a problem solved if any of k samples (temperature `evaluate.temperature`) is correct; maj@k if
the most frequent final answer among the k samples is correct (self-consistency, Wang et al. 2022). Forward
tokens are counted at the policy boundary. Writes `metrics/iter_<k>.json`.

With `--critics DIR` (a `critics` stage output; the pipeline passes critics_k for policy_k) the read-outs never
see the gold answer: eta-MCTS decoding scored by the critics (`search_pass1`, AlphaLLM §4.3-4.4, instead of
the policy-likelihood scorer), and the k samples already drawn for pass@k reranked by the ORM (best-of-k,
weighted vote) and the PRM (min / last step best-of-k) (arbor/critics/readouts.py). Every read-out comes with
its policy forward tokens (`samples_forward_tokens` for the k samples, `search_forward_tokens`) and critic
forward tokens (`rerank_critic_forward_tokens`, `search_critic_forward_tokens`).

Search decoding obeys the training search's gate (`critics.guide_min_auroc`, `CriticsConfig.guide_gate`):
critics whose recorded held-out within-problem AUROC is below it do not decode; the `search_*` read-outs then
use the likelihood scorer and `search_critics_gate` says why (None: the critics decoded); with
`evaluate.gated_critic_search` the critics' own decoding is reported beside them as `critic_search_*`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from arbor.lm.base import Continuation, Policy, StopRule
from arbor.pipeline.config import ArborConfig, ArborInputError, EtaMCTSConfig
from arbor.pipeline.seeds import derive_seed
from arbor.pipeline.tracking import NullTracker, Tracker
from arbor.tasks import Problem, Task, build_task, is_terminal_step, read_problems

log = logging.getLogger("arbor.evaluate")


def majority_correct(task: Task, problem: Problem, completions: Sequence[str]) -> bool:
    """Whether the most common final answer (ties: first seen) among `completions` is correct."""
    keys = [task.vote_key(c) for c in completions]  # the task's answer rule (task.answer_rule)
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return False
    best = max(counts, key=lambda k: (counts[k], -keys.index(k)))
    return task.is_correct(problem, completions[keys.index(best)])


def evaluate_policy(policy: Policy, task: Task, problems: Sequence[Problem], *, k: int, temperature: float,
                    max_new_tokens: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Greedy pass@1, pass@k, maj@k and token counts of `policy` on `problems`."""
    return sample_policy(policy, task, problems, k=k, temperature=temperature, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, seed=seed)[0]


def sample_policy(policy: Policy, task: Task, problems: Sequence[Problem], *, k: int, temperature: float,
                  max_new_tokens: int, batch_size: int, seed: int,
                  ) -> tuple[dict[str, Any], list[list[Continuation]]]:
    """`evaluate_policy`'s metrics and the k samples of each problem (reused by the critic read-outs)."""
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
    metrics = {
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
        "samples_forward_tokens": used.forward_tokens - greedy_tokens,
        "wall_seconds": time.perf_counter() - t0,
    }
    for name, texts in (("greedy", [c.text for c in greedy]), ("samples", [c.text for c in samples])):
        for key, value in task.diagnostics(texts).items():  # where accuracy changes come from (task-specific)
            metrics[f"{name}_{key}"] = None if value != value else value
    return metrics, [samples[i * k : (i + 1) * k] for i in range(n)]


def critic_readouts(critics: dict[str, Any], policy: Policy, task: Task, problems: Sequence[Problem],
                    samples: Sequence[Sequence[Continuation]], *, step_tokens: int) -> dict[str, Any]:
    """ORM best-of-k, ORM-weighted vote, PRM (min / last step) best-of-k over the drawn samples
    (arbor/critics/readouts.py); accuracy per read-out and the critics' forward tokens."""
    from arbor.critics.labels import token_pieces
    from arbor.critics.readouts import READOUTS, rerank, score_samples

    piece = token_pieces(policy.decode)
    backbones = list({id(c): c for c in critics.values()}.values())
    before = sum(c.counters.forward_tokens for c in backbones)
    t0 = time.perf_counter()
    ok = Counter()
    for p, conts in zip(problems, samples, strict=True):
        scores = score_samples(critics, policy.encode_prompt(task.prompt(p)), conts, piece=piece,
                               step_tokens=step_tokens, is_terminal=is_terminal_step,
                               eos_token_id=policy.eos_token_id)
        for name, i in rerank(scores, [task.vote_key(c.text) for c in conts]).items():
            ok[name] += i >= 0 and task.is_correct(p, conts[i].text)
    n = len(problems)
    return {**{name: ok[name] / n for name in READOUTS},
            "rerank_critic_forward_tokens": sum(c.counters.forward_tokens for c in backbones) - before,
            "rerank_wall_seconds": time.perf_counter() - t0}


def search_decode(policy: Policy, task: Task, problems: Sequence[Problem], *, eta: EtaMCTSConfig,
                  simulations: int, seed: int, kv_budget_mb: float, scorer: Any = None,
                  complete_walk: bool = True, lockstep: int = 1) -> dict[str, Any]:
    """Decode each problem with eta-MCTS under `scorer` (a `CriticScorer` without gold; default: the policy's
    likelihood). No oracle.

    Reported per read-out: `search_pass1` (greedy walk by Q, AlphaLLM's decoding; with `complete_walk`, a walk
    that stops at an inner node is completed by greedy decoding, `eta_mcts(complete_walk=)`, and
    `search_walk_terminal` is the fraction of problems whose walk reached a terminal by itself),
    `search_best_pass1` (best terminal by Q), `search_vote_pass1` (Q-weighted vote over terminals). The search
    never sees the gold answer: the scorer is the critics or the policy's own confidence. Correctness is checked
    afterwards, here.

    `lockstep` problems are decoded together, their policy calls merged (`arbor.lm.lockstep`, as the search
    stage's `search.lockstep`). Prefix states live in one KV store of `kv_budget_mb` (the search stage's
    `search.kv_budget_mb`), emptied after each group of problems (and the critics' stores with it); terminal
    steps store none (the builder tells the policy they end a trajectory).
    Token work (`search_forward_tokens`, `search_padded_kv_positions`, `search_critic_forward_tokens`), the
    tokens stored in the trees (`search_stored_tokens`, prompt once + every step; `search_critic_token_ratio` =
    critic forward / stored tokens) and the store's peak are reported.
    """
    from arbor.lm.kvcache import KVStore
    from arbor.lm.lockstep import Lockstep, lockstep_groups
    from arbor.mcts.scoring import LikelihoodScorer
    from arbor.mcts.search import eta_mcts

    eta = dataclasses.replace(eta, num_simulations=simulations)
    store = KVStore(int(kv_budget_mb * 2**20))
    before = policy.counters.snapshot()
    critic_before = scorer.critic_forward_tokens if scorer is not None else 0
    t0 = time.perf_counter()
    ok = Counter()
    stored = 0

    def decode(member: Policy, i: int) -> Any:
        return eta_mcts(member, member.encode_prompt(task.prompt(problems[i])),
                        scorer=scorer or LikelihoodScorer(member), is_terminal=is_terminal_step, cfg=eta,
                        seed=seed + i, store=store, vote_key=task.vote_key, complete_walk=complete_walk)

    for idx in lockstep_groups(len(problems), lockstep):
        if len(idx) == 1:
            results = [decode(policy, idx[0])]
        else:
            results = Lockstep(policy).run([partial(decode, i=i) for i in idx])
        store.clear()  # another group's prefixes are never reused
        if scorer is not None:
            scorer.clear()
        for i, res in zip(idx, results, strict=True):
            p = problems[i]
            ok["search_walk_terminal"] += bool(res.builder.tree.terminal[res.walk_end])
            stored += res.builder.tree.num_tokens
            for name, leaf in (("search_pass1", res.greedy_leaf), ("search_best_pass1", res.best_leaf)):
                ok[name] += leaf >= 0 and task.is_correct(p, res.builder.text(leaf))
            ok["search_vote_pass1"] += res.vote_answer is not None and \
                task.is_correct(p, f"Answer: {res.vote_answer}\n")
    n = len(problems)
    used = policy.counters.since(before)
    critic = 0 if scorer is None else scorer.critic_forward_tokens - critic_before
    return {**{k: ok[k] / n for k in ("search_pass1", "search_best_pass1", "search_vote_pass1",
                                      "search_walk_terminal")}, "search_complete_walk": complete_walk,
            "search_forward_tokens": used.forward_tokens, "search_padded_kv_positions": used.padded_kv_positions,
            "search_cache_misses": used.cache_misses, "search_kv_evictions": store.evictions,
            "search_kv_peak_mb": store.peak_nbytes / 2**20,
            "search_simulations": simulations, "search_problems": n,
            "search_scorer": "likelihood" if scorer is None else "critics",
            "search_critic_forward_tokens": critic, "search_stored_tokens": stored,
            "search_critic_token_ratio": critic / max(1, stored),
            "search_wall_seconds": time.perf_counter() - t0}


PARTS = ("sample", "decode", "all")
"""`sample`: greedy, pass@k, maj@k and the critics' read-outs over the k samples (`metrics/iter_<k>.json`);
`decode`: eta-MCTS search decoding (`metrics/decode_<k>.json`); two DVC stages, so that a change of
`evaluate.k` does not redo minutes of search decoding. `all` (by hand): both, in one file."""


def run(cfg: ArborConfig, *, policy_dir: str | Path = "models/iter_0/policy",
        eval_file: str | Path = "data/eval.jsonl", tracker: Tracker | None = None,
        critics_dir: str | Path | None = None, part: str = "all") -> dict[str, Any]:
    """Load the policy (and the critics of `critics_dir`, if given) and evaluate `part` of it (see `PARTS`).

    Every iteration is evaluated on the same eval problems with the same seed (derived from the root seed
    only), so that iterations differ by their policy alone.
    """
    from arbor.lm.loading import load_policy

    if part not in PARTS:
        raise ArborInputError(f"--part {part!r}: expected one of {', '.join(PARTS)}")
    tracker = tracker or NullTracker()
    e = cfg.evaluate
    problems = read_problems(eval_file)[: e.n_problems]
    if not problems:
        raise ArborInputError(f"{eval_file}: no evaluation problems")
    policy = load_policy(policy_dir, cfg)
    task = build_task(cfg.task)
    seed = derive_seed(cfg.seed, "evaluate")
    critics = None
    if critics_dir is not None:
        from arbor.critics.scorer import load_critics

        c = cfg.critics
        kinds = sorted({"prm", "orm", *c.needed(gold=False)}) if part != "decode" else sorted(c.needed(gold=False))
        critics = load_critics(critics_dir, kinds, device=cfg.device, budget_bytes=int(c.kv_budget_mb * 2**20),
                               batch_size=c.batch_size, confidence=c.confidence)
    metrics: dict[str, Any] = {}
    if part in ("sample", "all"):
        metrics, samples = sample_policy(policy, task, problems, k=e.k, temperature=e.temperature,
                                         max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=seed)
        if critics is not None:
            metrics |= critic_readouts(critics, policy, task, problems, samples,
                                       step_tokens=cfg.search.eta.step_tokens)
    if part in ("decode", "all") and (e.search or part == "decode"):
        decode = partial(search_decode, policy, task, problems[: e.search_problems], eta=cfg.search.eta,
                         simulations=e.search_simulations, seed=seed + 2, kv_budget_mb=cfg.search.kv_budget_mb,
                         complete_walk=e.search_complete_walk, lockstep=cfg.search.lockstep)
        gate = None
        if critics is None:
            metrics |= decode()
        else:
            from arbor.critics.scorer import CriticScorer, recorded_heldout

            scorer = CriticScorer(critics, cfg.critics)  # decoding: no gold, terminals by the ORM
            gate = cfg.critics.guide_gate(recorded_heldout(critics_dir))  # type: ignore[arg-type]
            if gate is None:
                metrics |= decode(scorer=scorer)
            else:  # the search's gate: untrusted critics do not decode (on request: their decoding beside)
                log.warning("evaluate: critics %s not used to decode the search_* read-outs: %s%s", critics_dir, gate,
                            " (their decoding is reported as critic_search_*)" if e.gated_critic_search else "")
                metrics |= decode()
                if e.gated_critic_search:
                    metrics |= {f"critic_{k}": v for k, v in decode(scorer=scorer).items()}
        metrics["search_critics_gate"] = gate
    return {**metrics, "critics": None if critics_dir is None else str(critics_dir)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from arbor.pipeline.io import write_json
    from arbor.stages.common import stage_cli

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--iter", type=int, default=0, help="Iteration: evaluates models/iter_<k>/policy.")
        p.add_argument("--policy", default=None, help="Policy dir (default models/iter_<iter>/policy).")
        p.add_argument("--eval", default="data/eval.jsonl", help="Evaluation problems.")
        p.add_argument("--critics", default=None, metavar="DIR|none",
                       help="Critics for the read-outs and search decoding (a `critics` stage output, e.g. "
                            "models/iter_<iter>/critics; they decode only if they pass critics.guide_min_auroc); "
                            "default none: likelihood-scored search only.")
        p.add_argument("--part", default="all", choices=PARTS,
                       help="sample: greedy/pass@k/maj@k/critic read-outs; decode: eta-MCTS decoding; all: both.")
        p.add_argument("--metrics", default=None, help="Metrics JSON (default metrics/iter_<iter>.json, "
                                                       "metrics/decode_<iter>.json for --part decode).")

    def go(cfg: ArborConfig, a: argparse.Namespace, tr: Tracker) -> dict[str, Any]:
        crit = None if a.critics in (None, "none") else a.critics
        policy_dir = a.policy or f"models/iter_{a.iter}/policy"
        m = run(cfg, policy_dir=policy_dir, eval_file=a.eval, tracker=tr, critics_dir=crit, part=a.part)
        m["iteration"] = a.iter
        default = f"metrics/decode_{a.iter}.json" if a.part == "decode" else f"metrics/iter_{a.iter}.json"
        write_json(a.metrics or default, m)
        if a.part != "decode":  # the policy as an MLflow model version, with its eval metrics
            m["registered_version"] = tr.register_policy(policy_dir, a.iter, m)
        return m

    return stage_cli("evaluate", __doc__ or "", paths, go, argv)


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
