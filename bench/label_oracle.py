"""Diagnostic (issue #7): how well does a perfect arithmetic checker rank the critics' own labels?

    python -m bench.label_oracle --critics models/iter_0/critics --policy models/iter_0/policy [--split heldout]

For every labelled node of a `critics` stage output (`labels/<split>.parquet`), the oracle feature is 1 when
every `a op b = c` step of the node's text so far is arithmetically right (`Task.diagnostics`:
`step_error_rate == 0`; the synthetic task), else 0. Reported: the AUROC of that feature against each critic's
binary label (value: the value label >= 0.5; PRM: Math-Shepherd hard label, steps only; ORM: correct, terminals),
pooled and within problems (`calibration.grouped_auroc`), and the label rates with and without correct steps.
A critic that learnt exactly "are the steps so far right" would score these AUROCs, so they bound what step
checking alone can reach against labels that also carry the policy's future failures (value, PRM) and wrong
operands copied from the question (ORM). Writes bench/results/label_oracle.json and prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--critics", default="models/iter_0/critics", help="A `critics` stage output directory.")
    ap.add_argument("--policy", default="models/iter_0/policy", help="Its policy (the tokenizer of the labels).")
    ap.add_argument("--split", default="heldout", choices=("train", "val", "heldout"))
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from arbor.critics.calibration import auroc, grouped_auroc
    from arbor.pipeline.config import load_config
    from arbor.tasks import build_task

    from .common import save, table

    cfg = load_config(args.params if Path(args.params).exists() else None)
    task = build_task(cfg.task)
    tok = AutoTokenizer.from_pretrained(args.policy, trust_remote_code=False, local_files_only=True)
    t = pq.read_table(Path(args.critics) / "labels" / f"{args.split}.parquet").to_pydict()
    errors = [task.diagnostics([tok.decode(ids)]).get("step_error_rate", float("nan")) for ids in t["tokens"]]
    steps_ok = np.array([e == 0 for e in errors])  # NaN (no step yet) is not "all right"
    depth, pid, term = np.asarray(t["depth"]), np.asarray(t["problem_id"]), np.asarray(t["terminal"])
    orm = np.asarray([np.nan if x is None else x for x in t["orm"]], np.float64)
    labels = {"value": (np.ones(len(depth), bool), np.asarray(t["value"]) >= 0.5),
              "prm": (depth > 0, np.asarray(t["prm_hard"]) >= 0.5),
              "orm": (term & ~np.isnan(orm), orm >= 0.5)}
    rows = []
    for kind, (keep, y) in labels.items():
        f, yk = steps_ok[keep].astype(float), y[keep]
        rows.append({"critic": kind, "nodes": int(keep.sum()), "steps_ok_share": float(f.mean()),
                     "auroc": auroc(f, yk), "auroc_within_problem": grouped_auroc(f, yk, pid[keep])[0],
                     "label_rate_steps_ok": float(yk[f == 1].mean()) if (f == 1).any() else None,
                     "label_rate_steps_wrong": float(yk[f == 0].mean()) if (f == 0).any() else None})
    print(table(rows, list(rows[0])))
    path = save("label_oracle", {"critics": args.critics, "split": args.split, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
