"""Critic training (value, PRM, ORM) with Lightning on packed tree paths, held-out early stopping.

Data: a label table (arbor/critics/labels.py) is packed per problem into one token trie of its labelled rows'
paths (`pack_problems`): each distinct token prefix is one position, attending to its own path only (a 4D
mask, `collate`), so one forward over the trie gives every labelled node its score at its step end and computes
each token of the tree once, as prefix-cached scoring does in search (tree attention, as in SpecInfer's token
tree verification, arXiv 2305.09781 §4). On the tiny default's trees_0 one sequence per leaf path (the earlier
packing) held 465k tokens, the tries 74k (6.3x). A batch holds `problems_per_batch` tries (one
per problem unless `max_trie_tokens` cuts it), so sibling steps share a batch.

Losses, each a mean over the labelled positions of its kind, summed over kinds (s = sigmoid(logit)):
- value: MSE(s, V_MC) or BCE(logit, V_MC) with soft targets;
- PRM: BCE(logit, y) (or MSE) with y the Math-Shepherd soft (fraction correct) or hard label, steps only;
  optionally + `pairwise_weight` * mean over sibling pairs of -log sigmoid(r+ - r-) (rStar-Math PPM,
  arXiv 2501.04519 §3.3, eq. 5), r the PRM logit, pairs = siblings whose soft labels differ by >= margin;
- ORM: BCE(logit, is_solved) at terminals.
Three separate critics train side by side in one module (one optimizer, summed losses), a shared backbone
with three heads the same way. `freeze_backbone`: only the heads learn (linear probes of the policy's hidden
states; the tiny default fine-tunes the body, 0.1 higher held-out AUROC: arbor/critics/config.py). `lora`
(`freeze_backbone: false`): LoRA adapters on each frozen backbone train at `lr` beside the heads, and are merged
into the backbone when training ends (arbor/lm/lora.py). The weights of the epoch with the lowest validation
loss are restored at the end.

Frozen bodies are run once: with `freeze_backbone` (and no LoRA) nothing upstream of the heads changes during
training, so `cache_features` computes each body's hidden states at the labelled positions of every train and
val item once (body in eval mode, no dropout) and every epoch trains the heads on those [P, H] features; the
losses, the optimizer and the data order are those of the uncached forward (tested equal).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from arbor.critics.config import KINDS, CriticsConfig
from arbor.critics.models import CriticModel
from arbor.lm.lora import apply_lora, checkpoint_activations, merge

Item = dict[str, Any]


class _Trie:
    """A token trie grown path by path: `ids`, `parent`, `depth` [T] in insertion order (a token after its
    parent)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        self.child: dict[tuple[int, int], int] = {}

    def new_tokens(self, path: Sequence[int]) -> int:
        """How many tokens `add(path)` would append."""
        at = -1
        for k, t in enumerate(path):
            nxt = self.child.get((at, t))
            if nxt is None:
                return len(path) - k
            at = nxt
        return 0

    def add(self, path: Sequence[int]) -> int:
        """Insert `path` [L] (its missing tokens); the index of its last token."""
        at = -1
        for t in path:
            nxt = self.child.get((at, t))
            if nxt is None:
                nxt = self.child[(at, t)] = len(self.ids)
                self.ids.append(int(t))
                self.parent.append(at)
                self.depth.append(self.depth[at] + 1 if at >= 0 else 0)
            at = nxt
        return at


def label_targets(d: dict[str, list], prm_label: str = "soft") -> dict[str, np.ndarray]:
    """{kind: [R] float64}: the training target of each row of `d` (a label table as a pydict,
    arbor/critics/labels.py), NaN where the kind has no label: the value at every row, the PRM at steps
    (depth > 0; its `prm_label` soft or hard label), the ORM at scored terminals (the outcome)."""
    depth = np.asarray(d["depth"])
    prm = np.asarray(d["prm_soft" if prm_label == "soft" else "prm_hard"], np.float64)
    return {"value": np.asarray(d["value"], np.float64), "prm": np.where(depth > 0, prm, np.nan),
            "orm": np.asarray([np.nan if x is None else x for x in d["orm"]], np.float64)}


def pack_problems(table: pa.Table, *, prm_label: str = "soft", pair_margin: float = 0.3,
                  max_tokens: int = 4096) -> list[Item]:
    """Items of one token trie each: a problem's labelled rows' token paths merged so that each distinct token
    prefix is one position of the training sequence (a tree's paths share their prompt and early steps: on the
    tiny default's trees_0 one sequence per leaf path held 6.3x the tries' tokens, the labelled rows' own paths
    8.9x). A problem whose trie would pass `max_tokens` is cut, its rows in depth-first order, into tries of at
    most `max_tokens` (a path longer than that is a trie of its own; a subtree may straddle two tries, each
    holding the shared prefix): the attention mask is [T, T].

    Item keys: `problem_id`; `ids` [T] the trie's tokens, each after its trie parent; `parent` [T] (the index of
    the token before it on its path, -1 for a path's first token); `position_ids` [T] (its depth: the position it
    has on its path); `positions` [P] (the index of each labelled row's last token: its step end);
    `targets[kind]` [P] (float, NaN where a kind has no label: PRM at the root, ORM off terminals); `rows` [P]
    (label-table row ids) and `pairs` [(j+, j-)] of sibling steps in the same trie (indices into `positions`).
    `collate` gives each token attention to its own path only, so a forward over the trie computes exactly what
    one forward per path would."""
    d = table.to_pydict()
    by_problem: dict[str, list[int]] = {}
    for i, p in enumerate(d["problem_id"]):
        by_problem.setdefault(p, []).append(i)
    target = label_targets(d, prm_label)
    tokens = d["tokens"]
    items = []
    for pid, rows in by_problem.items():
        rows = sorted(rows, key=lambda r: len(tokens[r]))  # a path after its prefixes
        whole = _Trie()
        chunks = [(rows, whole, [whole.add(tokens[r]) for r in rows])]
        if len(whole.ids) > max_tokens:  # depth-first order keeps subtrees together; a prefix sorts first
            chunks = []
            for r in sorted(rows, key=lambda r: tokens[r]):
                if not chunks or len(chunks[-1][1].ids) + chunks[-1][1].new_tokens(tokens[r]) > max_tokens:
                    chunks.append(([], _Trie(), []))
                chunk, trie, positions = chunks[-1]
                chunk.append(r)
                positions.append(trie.add(tokens[r]))
        for chunk, trie, positions in chunks:
            where = {r: j for j, r in enumerate(chunk)}
            targets = {k: [float(t[r]) for r in chunk] for k, t in target.items()}
            sib: dict[int, list[int]] = {}
            for r in chunk:
                if d["depth"][r] > 0 and d["node"][r] >= 0:
                    sib.setdefault(d["parent"][r], []).append(r)
            pairs = [(where[a], where[b]) for kids in sib.values() for a in kids for b in kids
                     if d["prm_soft"][a] - d["prm_soft"][b] >= pair_margin]
            items.append({"problem_id": pid, "ids": trie.ids, "parent": trie.parent, "position_ids": trie.depth,
                          "positions": positions, "targets": targets, "rows": chunk, "pairs": pairs})
    return items


def path_mask(parent: Sequence[int], width: int) -> np.ndarray:
    """[width, width] bool: token i attends to token j iff j is i or one of its trie ancestors (`parent` [T],
    parents first); rows past T (padding) attend to themselves only (no empty softmax)."""
    m = np.zeros((width, width), np.bool_)
    for i, p in enumerate(parent):
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    idx = np.arange(len(parent), width)
    m[idx, idx] = True
    return m


def collate(items: Sequence[Item], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`/`position_ids` [B, T], the trie attention `attention_mask` [B, 1, T, T] (bool,
    True = attend; `path_mask`; [B, 1, 0, 0] when the items carry cached `features`), `positions`/`pos_mask`
    [B, P], `target_<kind>` [B, P] (NaN = no label) and `pairs` [K, 4] (item, position index, item, position
    index)."""
    b = len(items)
    t = max(len(it["ids"]) for it in items)
    p = max(len(it["positions"]) for it in items)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    pos_ids = torch.zeros((b, t), dtype=torch.long)
    cached = "features" in items[0]  # the heads train on cached hidden states: no forward, no mask
    mask = torch.zeros((b, 1, 0, 0) if cached else (b, 1, t, t), dtype=torch.bool)
    positions = torch.zeros((b, p), dtype=torch.long)
    pos_mask = torch.zeros((b, p), dtype=torch.bool)
    out: dict[str, torch.Tensor] = {}
    for i, it in enumerate(items):
        n, x = len(it["ids"]), it["positions"]
        ids[i, :n] = torch.as_tensor(it["ids"])
        pos_ids[i, :n] = torch.as_tensor(it["position_ids"])
        if not cached:
            mask[i, 0] = torch.from_numpy(path_mask(it["parent"], t))
        positions[i, : len(x)] = torch.as_tensor(x)
        pos_mask[i, : len(x)] = True
    for k in KINDS:
        tgt = torch.full((b, p), float("nan"))
        for i, it in enumerate(items):
            tgt[i, : len(it["targets"][k])] = torch.as_tensor(it["targets"][k], dtype=torch.float32)
        out[f"target_{k}"] = tgt
    pairs = [(i, a, i, c) for i, it in enumerate(items) for a, c in it["pairs"]]
    for j in range(len(items[0].get("features", ()))):  # cached hidden states of frozen body j [B, P, H]
        feats = [it["features"][j] for it in items]
        h = torch.zeros((b, p, feats[0].shape[-1]), dtype=feats[0].dtype)
        for i, f in enumerate(feats):
            h[i, : f.shape[0]] = f
        out[f"features_{j}"] = h
    out.update(input_ids=ids, attention_mask=mask, position_ids=pos_ids, positions=positions, pos_mask=pos_mask,
               pairs=torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 4))
    return out


def distinct_nets(models: dict[str, CriticModel]) -> list[CriticModel]:
    """The distinct `CriticModel`s of `models` in first-use order (a shared backbone once)."""
    return list({id(m): m for m in models.values()}.values())


def critic_logits(models: dict[str, CriticModel], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{kind: logits [B, P]}, one forward per distinct backbone, or its heads on `features_<j>` [B, P, H] where
    the batch carries the cached hidden states of body j (`cache_features`)."""
    out: dict[str, torch.Tensor] = {}
    for j, model in enumerate(distinct_nets(models)):
        feats = batch.get(f"features_{j}")
        if feats is None:
            got = model(batch["input_ids"], batch["attention_mask"], batch["positions"], batch["position_ids"])
        else:
            got = model.head_logits(feats)
        out.update({k: v for k, v in got.items() if models.get(k) is model})
    return out


@torch.no_grad()
def cache_features(models: dict[str, CriticModel], items: list[Item], batch_problems: int = 8) -> list[Item]:
    """`items` with `features` added: per distinct body j, one tensor [P, H], the body's last hidden state at each
    labelled position of the item (one eval-mode forward per `batch_problems` items, no graph)."""
    nets = distinct_nets(models)
    modes = [m.backbone.training for m in nets]
    out: list[Item] = []
    try:
        for m in nets:
            m.backbone.eval()
        for a in range(0, len(items), batch_problems):
            chunk = items[a: a + batch_problems]
            batch = collate(chunk)
            keys = ("input_ids", "attention_mask", "positions", "position_ids")
            per_net = [m.features(*(batch[k].to(m.device) for k in keys)).float().cpu() for m in nets]
            for i, it in enumerate(chunk):
                n = len(it["positions"])
                out.append({**it, "features": [per_net[j][i, :n].clone() for j in range(len(nets))]})
    finally:
        for m, mode in zip(nets, modes, strict=True):
            m.backbone.train(mode)
    return out


def critic_losses(logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], cfg: CriticsConfig,
                  ) -> dict[str, torch.Tensor]:
    """Per-kind losses (module docstring) and `pairwise` when enabled; kinds without labels in the batch are
    left out."""
    losses: dict[str, torch.Tensor] = {}
    for k, z in logits.items():
        y = batch[f"target_{k}"]
        m = batch["pos_mask"] & ~torch.isnan(y)
        if not bool(m.any()):
            continue
        zk, yk = z[m], y[m]
        use_mse = (k == "value" and cfg.value_loss == "mse") or (k == "prm" and cfg.prm_loss == "mse")
        losses[k] = F.mse_loss(torch.sigmoid(zk), yk) if use_mse else F.binary_cross_entropy_with_logits(zk, yk)
    pairs = batch["pairs"]
    if cfg.prm_pairwise and "prm" in logits and pairs.shape[0] > 0:
        z = logits["prm"]
        r_pos, r_neg = z[pairs[:, 0], pairs[:, 1]], z[pairs[:, 2], pairs[:, 3]]
        losses["pairwise"] = cfg.pairwise_weight * -F.logsigmoid(r_pos - r_neg).mean()
    return losses


class CriticModule(L.LightningModule):
    """The critics of `models` ({kind: CriticModel}; one object may serve several kinds) trained together."""

    def __init__(self, models: dict[str, CriticModel], cfg: CriticsConfig) -> None:
        super().__init__()
        self.kind_models = models
        self.nets = torch.nn.ModuleList(distinct_nets(models))
        self.cfg = cfg

    def _common_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor | None:
        losses = critic_losses(critic_logits(self.kind_models, batch), batch, self.cfg)
        if not losses:  # no labelled position of any trained kind: Lightning skips the step
            return None
        loss = torch.stack(list(losses.values())).sum()
        n = int(batch["input_ids"].shape[0])
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=n, on_epoch=True, on_step=False)
        for k, v in losses.items():
            self.log(f"{stage}_{k}_loss", v, batch_size=n, on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        return self._common_step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        heads = [p for m in self.nets for p in m.heads.parameters()]
        groups = [{"params": heads, "lr": self.cfg.head_lr}]
        if not self.cfg.freeze_backbone:  # the whole body, or with LoRA its adapters only
            body = [p for m in self.nets for p in m.backbone.parameters() if p.requires_grad]
            groups.append({"params": body, "lr": self.cfg.lr})
        return torch.optim.AdamW(groups, weight_decay=self.cfg.weight_decay)


class BestWeights(L.Callback):
    """Keep the weights of the epoch with the lowest `val_loss`; put them back when training ends."""

    def __init__(self) -> None:
        self.best = float("inf")
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch = -1

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        v = trainer.callback_metrics.get("val_loss")
        if v is not None and not trainer.sanity_checking and float(v) < self.best:
            self.best, self.epoch = float(v), trainer.current_epoch
            self.state = copy.deepcopy(module.state_dict())

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)


def train_critics(models: dict[str, CriticModel], train: list[Item], val: list[Item], cfg: CriticsConfig, *,
                  seed: int = 0, logger: Any = False, accelerator: str = "cpu", devices: Any = 1,
                  progress: bool = True) -> dict[str, float]:
    """Fit the critics on `train` items with early stopping on `val`; returns summary metrics."""
    from lightning.pytorch.callbacks import EarlyStopping

    body_trains = cfg.lora.enabled or not cfg.freeze_backbone  # in full, or its LoRA adapters
    if not body_trains:  # the body never changes: its hidden states, once
        train, val = cache_features(models, train), cache_features(models, val)
    L.seed_everything(seed, workers=True, verbose=False)
    g = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(train, batch_size=cfg.problems_per_batch, shuffle=True, collate_fn=collate, generator=g)
    val_dl = DataLoader(val, batch_size=cfg.problems_per_batch, collate_fn=collate)
    nets = distinct_nets(models)
    for m in nets:
        m.train()
        if cfg.lora.enabled:  # the body frozen under trainable adapters (CriticsConfig: not with freeze_backbone)
            m.backbone = apply_lora(m.backbone, cfg.lora)
        else:
            m.backbone.requires_grad_(not cfg.freeze_backbone)  # frozen: no graph through the body, heads only
        if cfg.gradient_checkpointing and body_trains:
            checkpoint_activations(m.backbone)
    module = CriticModule(models, cfg)
    best = BestWeights()
    trainer = L.Trainer(max_epochs=cfg.max_epochs, accelerator=accelerator, devices=devices, logger=logger,
                        enable_checkpointing=False, enable_model_summary=False, gradient_clip_val=1.0,
                        num_sanity_val_steps=0, enable_progress_bar=progress, log_every_n_steps=1,
                        callbacks=[EarlyStopping("val_loss", patience=cfg.patience), best])
    trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl)
    for m in nets:
        m.backbone = merge(m.backbone)  # a plain backbone again (float32 with LoRA); itself without
        m.eval()
    return {"critic_epochs": trainer.current_epoch, "critic_best_epoch": best.epoch, "critic_best_val_loss": best.best}


@torch.inference_mode()
def predict(models: dict[str, CriticModel], items: list[Item], batch_problems: int = 8) -> dict[str, np.ndarray]:
    """{kind: [R] scores} of the packed `items`' labelled rows, in packed order; "row" [R] gives each score's
    label-table row id."""
    for m in models.values():
        m.eval()
    out: dict[str, list[float]] = {k: [] for k in models}
    rows: list[int] = []
    for a in range(0, len(items), batch_problems):
        chunk = items[a: a + batch_problems]
        batch = collate(chunk)
        logits = critic_logits(models, batch)
        flat = [r for it in chunk for r in it["rows"]]
        for k, z in logits.items():
            out[k] += torch.sigmoid(z[batch["pos_mask"]]).tolist()
        rows += flat
    return {"row": np.asarray(rows), **{k: np.asarray(v) for k, v in out.items()}}
