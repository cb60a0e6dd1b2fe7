"""`CriticsConfig`: labels, models, training and node-score weights of the three critics (value, PRM, ORM).

Declared like the sections of arbor/pipeline/config.py (`_f(default, help, min=/max=/gt=/choices=)`, checked
generically by `arbor.pipeline.config.build`; cross-field checks in `__post_init__`), so that it composes into
`ArborConfig` as `critics: CriticsConfig = _sub(CriticsConfig)` and every key becomes a `--critics.<key>`
option and a `params.yaml` entry. It imports only arbor/pipeline/fields.py (the shared field declaration) and
arbor/lm/config.py (which imports only fields.py), so arbor/pipeline/config.py can import it without a cycle.

Node score (AlphaLLM §4.3): `s = b_v V(s) + b_prm PRM(s) + b_orm mean_i ORM(rollout_i)`. The weights are
normalised to sum 1 so that the score stays in [0, 1] (the `NodeScorer` contract); a critic whose weight is 0
is never loaded or run. Terminals are scored by the oracle reward when a gold answer exists, else by the ORM
(`orm_at_terminals`), which then runs even with `b_orm = 0` (b_orm weights only the rollouts of inner nodes).

`critics.lora` (arbor/lm/config.py): LoRA adapters on the backbone instead of training it in full (needs
`freeze_backbone: false`); they are merged into the saved backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arbor.lm.config import LoraConfig
from arbor.pipeline.fields import ConfigError, section
from arbor.pipeline.fields import config_field as _f

KINDS = ("value", "prm", "orm")
"""The three critics, in a fixed order (head order of a shared backbone)."""


@dataclass
class CriticsConfig:
    """Stage `critics` and critic-guided search: MC labels, critic models, training, node-score weights."""

    # labels (arbor/critics/labels.py)
    min_completions: int = _f(2, "Extra policy completions from a node with fewer terminal descendants than this "
                                 "(0 = labels from the trees only).", min=0)
    label_estimate: str = _f("policy", "How a node's value and PRM labels are estimated on its tree: policy (its "
                                       "children weighted by the policy's probability of their step: search "
                                       "widens with forced unlikely siblings) | mean (plain mean of the "
                                       "completions below). arbor/critics/labels.py.", choices=("policy", "mean"))
    completion_tokens: int = _f(96, "Longest extra completion, in tokens.", min=1)
    completion_rows: bool = _f(False, "Also train on each extra completion's steps and outcome (one-sample MC "
                                      "labels; several times the outcome labels, no extra policy compute).")
    outcome_problems: int = _f(0, "Train problems without a tree (the first ones after the searched problems in "
                                  "the train file) from which the policy samples `outcome_samples` whole "
                                  "solutions each (decoded as a search path is: search.eta.step_tokens, "
                                  "max_depth); their steps and outcomes train the critics as one-sample Monte "
                                  "Carlo labels (Cobbe et al. 2021's verifier data; training split only, never "
                                  "held out). 0 = off. Tiny default, critics_0 with 2000 problems x 4 samples (40k "
                                  "more rows; 40 s of sampling, training 125 s instead of 31 s): held-out AUROC "
                                  "of the critic alone value/PRM/ORM 0.720/0.695/0.711 -> 0.703/0.661/0.722 "
                                  "(ORM within a problem 0.515 -> 0.596), fused 0.771/0.750/0.736 -> "
                                  "0.773/0.750/0.755; on policy_0's own samples the fused ORM's top pick of 16 "
                                  "is right for 51 of 100 problems against 50 without (the likelihood alone: "
                                  "50 by the mean token log-prob, 51 by the weakest step). README, Critics.",
                               min=0)
    outcome_samples: int = _f(4, "Solutions sampled per outcome problem (outcome_problems).", min=1)
    heldout_fraction: float = _f(0.25, "Fraction of problems held out for the reported metrics (split by "
                                       "problem, never by node).", gt=0.0, max=0.9)
    val_fraction: float = _f(0.15, "Fraction of the remaining problems used for early stopping.", gt=0.0, max=0.9)
    # models (arbor/critics/models.py)
    shared_backbone: bool = _f(True, "One backbone with three heads (true: one forward per token trie trains "
                                     "and scores all three) or three separate models (false: 3x the compute).")
    # training (arbor/train/critic.py)
    prm_label: str = _f("soft", "PRM target: soft (the estimated chance that a completion from the step is "
                                  "right, label_estimate) | hard (any of N completions right).",
                        choices=("soft", "hard"))
    value_loss: str = _f("mse", "Value loss on the MC value: mse | bce (soft targets).", choices=("mse", "bce"))
    prm_loss: str = _f("bce", "PRM loss on step labels: bce | mse.", choices=("bce", "mse"))
    prm_pairwise: bool = _f(False, "Add rStar-Math's PPM pairwise loss -log sigmoid(r+ - r-) over sibling steps.")
    pairwise_weight: float = _f(1.0, "Weight of the pairwise PRM loss.", min=0.0)
    pair_margin: float = _f(0.3, "Sibling steps form a pair when their soft labels differ by at least this.",
                            gt=0.0, max=1.0)
    max_epochs: int = _f(5, "Most training epochs (early stopping on the validation problems ends sooner). Tiny "
                            "default, fine-tuned body at lr 3e-4: 5 epochs (patience 2) gave held-out AUROC "
                            "value/PRM/ORM 0.698/0.679/0.737 in 32 s, 10 (patience 3) 0.686/0.669/0.707 in 57 s: "
                            "means of 3 training seeds, differences within their spread (sd 0.01-0.03; "
                            "bench/results/critics_finetune_5epochs.json, critics_labels_policy.json).", min=1)
    patience: int = _f(2, "Epochs without a better validation loss before stopping.", min=1)
    max_trie_tokens: int = _f(4096, "Most tokens in one training sequence: a problem's labelled paths are merged "
                                     "into one token trie (each distinct prefix once, attention masked to its own "
                                     "path: a [T, T] mask). A larger problem is cut, its paths in depth-first "
                                     "order, into tries of at most this many tokens (a single longer path is a "
                                     "trie of its own); sibling pairs then form within each trie only.",
                              min=1)
    problems_per_batch: int = _f(4, "Problems per training batch: token tries, one per problem unless "
                                    "max_trie_tokens cuts one (sibling pairs form within a trie).", min=1)
    freeze_backbone: bool = _f(False, "Train the scalar heads only (true: linear probes of the policy's hidden "
                                      "states, whose features are computed once) or the body too (false). Tiny "
                                      "default, 154 training problems, 3 training seeds: held-out AUROC value/PRM/"
                                      "ORM 0.587/0.581/0.596 frozen (8 s) vs 0.686/0.669/0.707 fine-tuned (57 s, 10 "
                                      "epochs; bench/results/critics_labels_policy.json).")
    gradient_checkpointing: bool = _f(False, "Recompute the backbone's activations in the backward pass instead of "
                                             "keeping them (body fine-tuning or LoRA): a batch holds the token "
                                             "tries of `problems_per_batch` problems, so kept activations grow with "
                                             "all their tokens (SmolLM2-135M, 4 problems as one sequence per path, "
                                             "before token tries: 18.7 GB peak RSS).")
    lr: float = _f(1e-3, "AdamW learning rate of the backbone. Tiny default, fine-tuned, 3 training seeds "
                         "(heads seeded as the stage seeds them): held-out AUROC value/PRM/ORM 0.731/0.700/0.718 "
                         "at 1e-3, 0.646/0.647/0.677 at 3e-4, 0.613/0.613/0.645 at 1e-4 "
                         "(bench/results/critics_lr_*.json, critics_default_seeded.json).", gt=0.0)
    head_lr: float = _f(1e-2, "AdamW learning rate of the scalar heads.", gt=0.0)
    weight_decay: float = _f(0.1, "AdamW weight decay (the critics overfit problem identity without it).", min=0.0)
    confidence: bool = _f(True, "Fuse each critic's score with the policy's confidence in the path (its token "
                                "log-probs: path mean, weakest step, last step), by a logistic regression fitted "
                                "on the validation problems (arbor/critics/confidence.py). Tiny default, "
                                "critics_0 of a fresh run: held-out AUROC value/PRM/ORM 0.720/0.695/0.711 -> "
                                "0.771/0.750/0.736 (the features alone: 0.751/0.733/0.724), within a problem "
                                "0.599/0.580/0.515 -> 0.731/0.729/0.772. Read by the critics "
                                "stage (fit or not) and by whatever loads critics (false: their own scores, a "
                                "saved fusion ignored).")
    # metrics (arbor/critics/calibration.py)
    threshold: float = _f(0.5, "Decision threshold for precision and recall.", gt=0.0, max=1.0)
    n_bins: int = _f(10, "Equal-width bins of ECE and the reliability diagram.", min=2)
    # node score (arbor/critics/scorer.py)
    b_value: float = _f(0.5, "Weight of V(s) in the node score (0 = the value model is never run).", min=0.0)
    b_prm: float = _f(0.5, "Weight of PRM(s) in the node score (0 = never run).", min=0.0)
    b_orm: float = _f(0.0, "Weight of the mean ORM score of fast rollouts from an inner node (0 = no rollouts).",
                      min=0.0)
    n_rollouts: int = _f(4, "Fast rollouts per new inner node for the ORM term (paper: 4).", min=1)
    rollout_tokens: int = _f(96, "Longest fast rollout, in tokens.", min=1)
    orm_at_terminals: bool = _f(True, "Score terminals with the ORM where no gold answer exists.")
    kv_budget_mb: float = _f(256.0, "Prefix KV-cache budget of each critic backbone (MB, LRU); the problems of a "
                                    "lockstep search group (search.lockstep) split it evenly.", gt=0.0)
    batch_size: int = _f(64, "Nodes per critic forward when scoring.", min=1)
    guide_min_auroc: float = _f(0.6, "Training search (search_k, k >= 1) is guided by the critics of k-1 only when "
                                     "every critic it weighs ranks held-out nodes within a problem better than "
                                     "this (its `<kind>_auroc_within_problem`, recorded in the critics' manifest; "
                                     "0.5 = chance); otherwise inner nodes are valued as in search_0. Evaluate's "
                                     "search decoding uses them under the same rule (else the likelihood scorer; "
                                     "with evaluate.gated_critic_search theirs is reported beside it as "
                                     "critic_search_*). 0 = always.",
                                min=0.0, max=1.0)
    refresh: bool = _f(True, "Retrain the critics every iteration on its own trees (false: keep critics_0 for "
                             "every iteration, as AlphaLLM did).")
    lora: LoraConfig = section(LoraConfig)

    def __post_init__(self) -> None:
        if self.b_value + self.b_prm + self.b_orm <= 0 and not self.orm_at_terminals:
            raise ConfigError("critics.b_value, b_prm and b_orm are all 0 and orm_at_terminals is false: no critic "
                              "would ever run; give at least one a positive weight")
        if self.heldout_fraction + self.val_fraction >= 1.0:
            raise ConfigError(f"critics.heldout_fraction={self.heldout_fraction} + val_fraction={self.val_fraction}"
                              " >= 1 leaves no training problems; lower one of them")
        if self.lora.enabled and self.freeze_backbone:
            raise ConfigError("critics.lora.enabled with critics.freeze_backbone=true: adapters train the backbone, "
                              "which freeze_backbone keeps fixed; set critics.freeze_backbone: false (or disable "
                              "critics.lora)")
        if self.lora.enabled and self.lora.save != "merged":
            raise ConfigError(f"critics.lora.save={self.lora.save}: a critic is saved as one backbone + heads "
                              "directory, with the adapters merged; set critics.lora.save: merged")

    @property
    def weights(self) -> dict[str, float]:
        """{kind: normalised weight} of the node score (all 0 when only terminals are scored)."""
        raw = {"value": self.b_value, "prm": self.b_prm, "orm": self.b_orm}
        total = sum(raw.values())
        return {k: (w / total if total > 0 else 0.0) for k, w in raw.items()}

    def guide_gate(self, heldout: dict[str, Any] | None) -> str | None:
        """Why the critics with held-out metrics `heldout` ({kind: {"auroc_within_problem": x}}, from their
        manifest) must not guide a training search (`guide_min_auroc`), or None when they may."""
        if self.guide_min_auroc <= 0 or heldout is None:  # unmeasured critics (not from `arbor critics`) guide
            return None
        weak = []
        for k in self.needed(gold=True):
            x = (heldout.get(k) or {}).get("auroc_within_problem")
            if x is None or not x >= self.guide_min_auroc:  # None / NaN (no held-out problem with both classes)
                weak.append(f"{k} {x if x is None else round(float(x), 3)}")
        if weak:
            return (f"held-out within-problem AUROC {', '.join(weak)} < critics.guide_min_auroc "
                    f"{self.guide_min_auroc}")
        return None

    def needed(self, *, gold: bool) -> tuple[str, ...]:
        """The critics a search runs: those with a positive weight, plus the ORM at terminals without gold."""
        need = {k for k, w in self.weights.items() if w > 0}
        if not gold and self.orm_at_terminals:
            need.add("orm")
        return tuple(k for k in KINDS if k in need)
