"""Calibration and ranking metrics of a critic on held-out labels: AUROC, precision, recall, ECE, reliability.

AlphaLLM reports precision, recall and ECE per critic (Table 8: value P 0.82 R 0.79 ECE 0.032; PRM P 0.62
R 0.90 ECE 0.375); we add AUROC, which does not depend on a threshold. Scores are probabilities in [0, 1];
labels are binary (a soft label is binarised by the caller, e.g. `label >= 0.5`).

- AUROC = P(score of a random positive > score of a random negative), ties counted 1/2 (the Mann-Whitney U
  statistic divided by n_pos * n_neg, computed from average ranks).
- Precision / recall of the decision `score >= threshold` (default 0.5).
- ECE (Guo et al. 2017, eq. 3): `sum_b |B_b|/n * |mean(label in B_b) - mean(score in B_b)|` over `n_bins`
  equal-width bins of the score; bin b = [b/n_bins, (b+1)/n_bins), the last bin closed at 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` [n] against binary `labels` [n]; NaN if one class is absent.

    >>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    # average rank (1-based) within each run of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = 0.5 * (a + 1 + b)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def precision_recall(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """(precision, recall) of predicting positive where `score >= threshold`; NaN where undefined."""
    pred = np.asarray(scores) >= threshold
    y = np.asarray(labels).astype(bool)
    tp = int((pred & y).sum())
    precision = tp / int(pred.sum()) if pred.any() else float("nan")
    recall = tp / int(y.sum()) if y.any() else float("nan")
    return float(precision), float(recall)


def reliability_bins(scores: np.ndarray, labels: np.ndarray, n_bins: int = 10,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width score bin: (count [n_bins], mean score [n_bins], mean label [n_bins]); NaN means where a
    bin is empty. `labels` may be soft (fractions), then the bin's mean label is the observed frequency."""
    s = np.clip(np.asarray(scores, np.float64), 0.0, 1.0)
    y = np.asarray(labels, np.float64)
    idx = np.minimum((s * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=s, minlength=n_bins) / count
        freq = np.bincount(idx, weights=y, minlength=n_bins) / count
    return count, conf, freq


def ece(scores: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error over `n_bins` equal-width bins (module docstring); NaN for no samples.

    >>> round(ece(np.array([0.05, 0.15, 0.95, 0.95]), np.array([0, 1, 1, 1])), 4)
    0.25
    """
    count, conf, freq = reliability_bins(scores, labels, n_bins)
    n = count.sum()
    if n == 0:
        return float("nan")
    full = count > 0
    return float(np.sum(count[full] / n * np.abs(freq[full] - conf[full])))


def critic_metrics(name: str, scores: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5,
                   n_bins: int = 10) -> dict[str, float]:
    """`<name>_auroc`, `<name>_precision`, `<name>_recall`, `<name>_ece` and `<name>_n` (binary labels)."""
    p, r = precision_recall(scores, labels, threshold)
    return {f"{name}_auroc": auroc(scores, labels), f"{name}_precision": p, f"{name}_recall": r,
            f"{name}_ece": ece(scores, labels, n_bins), f"{name}_n": len(scores)}


def grouped_auroc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Mean AUROC within groups (problems) that hold both classes, and how many do: how well a critic ranks the
    candidates of one problem, which is what best-of-N reranking and search need. A pooled AUROC also rewards
    telling easy problems from hard ones. (NaN, 0) when no group has both classes."""
    per = [auroc(scores[m], labels[m]) for g in np.unique(groups) if 0 < (labels[m := groups == g]).sum() < m.sum()]
    return (float(np.mean(per)) if per else float("nan")), len(per)


def reliability_diagram(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
                        n_bins: int = 10) -> None:
    """One PNG: for each critic name -> (scores, binary labels), observed frequency vs mean score per bin,
    with the diagonal (perfect calibration). Written atomically (matplotlib Agg, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from arbor.pipeline.io import atomic_path

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for name, (scores, labels) in curves.items():
        count, conf, freq = reliability_bins(scores, labels, n_bins)
        full = count > 0
        ax.plot(conf[full], freq[full], marker="o", label=f"{name} (ECE {ece(scores, labels, n_bins):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean critic score in bin")
    ax.set_ylabel("fraction correct in bin")
    ax.set_title("critic reliability (held-out problems)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
