"""Diagnostic (issue #7): how do the critics rank the policy's *own* samples, where best-of-N uses them?

    python -m bench.critic_samples --critics models/iter_0/critics --policy models/iter_0/policy \
        [--problems 100] [--k 16] [--threads 2]

The critics' held-out AUROC is measured on tree nodes; evaluate's `orm_best_of_n` reranks the k samples the
policy draws for each eval problem. This draws k samples per problem as evaluate does (`sample_policy`,
temperature 1, `--seed`), scores them with the critics as evaluate does (`score_samples`: ORM at the answer
line, PRM per step), keeps the samples that state an answer, and reports the AUROC of the ORM and of the PRM's
minimum against correctness, pooled and within problems (`calibration.grouped_auroc`), the share of right
samples, and what the ORM's top pick per problem is: right; wrong and answering before the question's last
operation ("premature": fewer step lines than the problem's operations); wrong with a step whose arithmetic is
wrong (`Task.diagnostics` step_error_rate > 0: a slip or the borrow misconception); or wrong otherwise (right
steps, wrong answer line or operands). Beside them, the policy's own confidence in each sample, needing no
critic: the mean and the minimum token log-prob of the sample up to its answer line (`lik_mean_*`,
`lik_min_*`), and their top picks. The synthetic task only (its problems carry their operations).
Writes bench/results/<--name>.json and prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--critics", default="models/iter_0/critics", help="A `critics` stage output directory.")
    ap.add_argument("--policy", default="models/iter_0/policy")
    ap.add_argument("--eval", default="data/eval.jsonl")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="critic_samples")
    args = ap.parse_args()


    import torch

    from arbor.critics.calibration import auroc, grouped_auroc
    from arbor.critics.labels import token_pieces
    from arbor.critics.readouts import score_samples, step_ends
    from arbor.critics.scorer import load_critics
    from arbor.lm.loading import load_policy
    from arbor.pipeline.config import load_config
    from arbor.stages.evaluate import sample_policy
    from arbor.tasks import build_task, is_terminal_step, read_problems

    from .common import save, table

    torch.set_num_threads(args.threads)
    cfg = load_config(args.params if Path(args.params).exists() else None)
    policy = load_policy(args.policy, cfg)
    task = build_task(cfg.task)
    problems = read_problems(args.eval)[: args.problems]
    _, samples = sample_policy(policy, task, problems, k=args.k, temperature=1.0,
                               max_new_tokens=cfg.evaluate.max_new_tokens, batch_size=cfg.evaluate.batch_size,
                               seed=args.seed)
    critics = load_critics(args.critics, ["prm", "orm"])
    piece = token_pieces(policy.decode)
    if not all("ops" in p.meta for p in problems):
        raise ValueError(f"{args.eval}: problems without meta['ops']; this diagnostic needs the synthetic task")
    orm, prm_min, right, group, steps, slips, lik_mean, lik_min = [], [], [], [], [], [], [], []
    for j, (p, conts) in enumerate(zip(problems, samples, strict=True)):
        sc = score_samples(critics, policy.encode_prompt(task.prompt(p)), conts, piece=piece,
                           step_tokens=cfg.search.eta.step_tokens, is_terminal=is_terminal_step,
                           eos_token_id=policy.eos_token_id)
        for i, c in enumerate(conts):
            if task.vote_key(c.text) is None:  # states no answer: not a best-of-N candidate
                continue
            orm.append(sc.orm[i])
            toks = list(c.token_ids)
            if toks and c.finish == "eos" and toks[-1] == policy.eos_token_id:
                toks = toks[:-1]  # as score_samples cuts a sample: no trailing EOS, through the answer line
            cut = step_ends(toks, piece, step_tokens=cfg.search.eta.step_tokens, is_terminal=is_terminal_step)
            lp = np.asarray(c.logprobs[: cut[-1] if cut else 0], np.float64)
            lik_mean.append(float(lp.mean()) if lp.size else -np.inf)
            lik_min.append(float(lp.min()) if lp.size else -np.inf)
            prm_min.append(float(sc.prm[i].min()))
            right.append(bool(task.is_correct(p, c.text)))
            group.append(j)
            steps.append(len(sc.prm[i]) - 1)  # step lines (the answer line excluded)
            slips.append(task.diagnostics([c.text]).get("step_error_rate", 0.0) > 0)
    o, m, y, g, n, e = map(np.asarray, (orm, prm_min, right, group, steps, slips))
    lm, ln = np.asarray(lik_mean), np.asarray(lik_min)
    operators = [len(p.meta["ops"]) for p in problems]
    picks = {"right": 0, "wrong_premature": 0, "wrong_step_error": 0, "wrong_other": 0}
    lik_right = {"mean": 0, "min": 0}
    for j in sorted(set(g.tolist())):
        idx = np.flatnonzero(g == j)
        lik_right["mean"] += int(y[idx[np.argmax(lm[idx])]])
        lik_right["min"] += int(y[idx[np.argmax(ln[idx])]])
        best = int(idx[np.argmax(o[idx])])
        kind = ("right" if y[best] else "wrong_premature" if n[best] < operators[j]
                else "wrong_step_error" if e[best] else "wrong_other")
        picks[kind] += 1
    row = {"problems": len(problems), "k": args.k, "complete_samples": len(y), "right_share": float(y.mean()),
           "orm_auroc": auroc(o, y), "orm_auroc_within_problem": grouped_auroc(o, y, g)[0],
           "prm_min_auroc": auroc(m, y), "prm_min_auroc_within_problem": grouped_auroc(m, y, g)[0],
           **{f"orm_pick_{k}": v for k, v in picks.items()},
           "lik_mean_auroc_within_problem": grouped_auroc(lm, y, g)[0],
           "lik_min_auroc_within_problem": grouped_auroc(ln, y, g)[0],
           "lik_mean_pick_right": lik_right["mean"], "lik_min_pick_right": lik_right["min"],
           "premature_share_of_wrong": float(np.mean([n[i] < operators[g[i]] for i in np.flatnonzero(~y)]))
           if (~y).any() else None}
    print(table([row], list(row)))
    path = save(args.name, {"critics": args.critics, "policy": args.policy, "seed": args.seed, "rows": [row]})
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
