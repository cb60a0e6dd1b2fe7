"""Critics: calibration metrics by hand, model save/load and batching, prefix-cached scoring == uncached scoring
with critic_forward_tokens == stored tree tokens, and each critic learning a planted rule (held-out AUROC)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arbor.critics import calibration as cal
from arbor.critics.config import CriticsConfig
from arbor.critics.labels import assign_splits, build_labels, read_tree_files
from arbor.critics.models import CriticModel, load
from arbor.critics.scorer import CachedCritic, CriticScorer
from arbor.lm.config import LoraConfig
from arbor.lm.hf import HFPolicy
from arbor.lm.kvcache import KVStore
from arbor.lm.lora import checkpoint_activations as lora_checkpoint
from arbor.mcts.grow import TreeBuilder
from arbor.mcts.tree import add_child, new_tree
from arbor.mcts.treeio import tree_rows, write_trees
from arbor.pipeline.config import ConfigError
from arbor.tasks import is_terminal_step
from arbor.train.critic import collate, pack_problems, predict, train_critics

from .conftest import tiny_model


# -- calibration ---------------------------------------------------------------------------------------------
def test_auroc_by_hand_with_ties_and_degenerate_cases():
    # positives 0.8, 0.4, 0.4; negatives 0.4, 0.1: pairs won 2 + 0.5 + 1 + 0.5 + 1 = 5 of 6
    assert cal.auroc(np.array([0.8, 0.4, 0.4, 0.4, 0.1]), np.array([1, 1, 1, 0, 0])) == pytest.approx(5 / 6)
    assert cal.auroc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0
    assert np.isnan(cal.auroc(np.array([0.3, 0.6]), np.array([1, 1])))


def test_ece_precision_recall_with_known_bins():
    s = np.array([0.05, 0.15, 0.15, 0.72, 0.78, 0.95])
    y = np.array([0, 0, 1, 1, 0, 1])
    # bins (10): [0,.1): conf .05 freq 0 -> 1/6*.05; [.1,.2): .15 vs .5 -> 2/6*.35; [.7,.8): .75 vs .5 -> 2/6*.25;
    # [.9,1]: .95 vs 1 -> 1/6*.05
    expected = (0.05 + 2 * 0.35 + 2 * 0.25 + 0.05) / 6
    assert cal.ece(s, y, n_bins=10) == pytest.approx(expected)
    count, conf, _freq = cal.reliability_bins(s, y, 10)
    assert count.tolist() == [1, 2, 0, 0, 0, 0, 0, 2, 0, 1] and np.isnan(conf[2])
    assert cal.precision_recall(s, y, 0.5) == pytest.approx((2 / 3, 2 / 3))
    m = cal.critic_metrics("orm", s, y)
    assert set(m) == {"orm_auroc", "orm_precision", "orm_recall", "orm_ece", "orm_n"} and m["orm_n"] == 6


def test_reliability_diagram_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    s = rng.random(50)
    cal.reliability_diagram({"value": (s, s > 0.5), "orm": (s, rng.random(50) < s)}, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_weights_and_validation():
    cfg = CriticsConfig(b_value=1.0, b_prm=3.0, b_orm=0.0)
    assert cfg.weights == {"value": 0.25, "prm": 0.75, "orm": 0.0}
    assert cfg.needed(gold=True) == ("value", "prm") and cfg.needed(gold=False) == ("value", "prm", "orm")
    with pytest.raises(ConfigError, match="no critic"):
        CriticsConfig(b_value=0.0, b_prm=0.0, b_orm=0.0, orm_at_terminals=False)
    with pytest.raises(ConfigError, match="no training problems"):
        CriticsConfig(heldout_fraction=0.5, val_fraction=0.5)


def test_config_composes_like_a_params_section():
    """What the lead's `critics: CriticsConfig = _sub(CriticsConfig)` in ArborConfig relies on: the generic
    range checks and `--critics.<key>` options of arbor/pipeline/config.py."""
    import argparse
    import dataclasses

    from arbor.pipeline.config import _sub, add_arguments, build

    assert build(CriticsConfig, {"b_orm": 0.25, "prm_label": "hard"}, "params.yaml", "critics.").b_orm == 0.25
    with pytest.raises(ConfigError, match=r"params.yaml: critics.b_value: expected a finite number >= 0"):
        build(CriticsConfig, {"b_value": -1}, "params.yaml", "critics.")
    with pytest.raises(ConfigError, match="critics.prm_label"):
        build(CriticsConfig, {"prm_label": "fuzzy"}, "params.yaml", "critics.")
    composed = dataclasses.make_dataclass("Composed", [("critics", CriticsConfig, _sub(CriticsConfig))])
    parser = argparse.ArgumentParser()
    add_arguments(parser, composed)
    assert "--critics.b_prm" in parser.format_help()


# -- models and prefix-cached scoring -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy(char_tok):
    return HFPolicy(tiny_model(char_tok, seed=1), char_tok)


def grow(policy: HFPolicy) -> tuple[TreeBuilder, list[list[int]]]:
    """A random tree of the tiny policy (3 levels), and its nodes in batches of creation (parents first)."""
    b = TreeBuilder.start(policy, policy.encode_prompt("Q: 7 +5 *3\n"), store=KVStore(), max_nodes=64,
                          max_tokens=4096, is_terminal=is_terminal_step, step_tokens=5, max_depth=3)
    batches, frontier = [], [0]
    for width in (3, 2, 2):
        kids = [k for ks in b.expand(frontier, width, seed=len(batches)) for k in ks]
        batches.append(kids)
        frontier = [k for k in kids if not b.tree.terminal[k]]
    return b, batches


@pytest.fixture(scope="module")
def grown(policy) -> tuple[TreeBuilder, list[list[int]]]:
    return grow(policy)


def test_cached_scoring_equals_uncached_and_reads_each_stored_token_once(policy, grown):
    check_cached_equals_uncached(policy, *grown)


def test_search_scoring_goes_through_the_fusion_saved_beside_the_critics(policy, grown, tmp_path):
    from arbor.critics.confidence import Fusion, path_features
    from arbor.critics.scorer import load_critics
    from arbor.pipeline.manifest import write_manifest

    b, batches = grown
    tree = b.tree
    model = CriticModel.from_policy(policy.model, ["value", "prm", "orm"])
    model.save(tmp_path / "shared")
    Fusion({"value": [0.5, 2.0, -1.0, 0.5, 0.2], "orm": [1.5, 0.0, 1.0, 0.0, -0.1]}).save(tmp_path)
    write_manifest(tmp_path, {"stage": "critics", "iteration": 0})
    critics = load_critics(tmp_path, ["value", "orm"])
    assert critics["value"].fusion is not None
    scorer = CriticScorer(critics, CriticsConfig(b_value=1.0, b_prm=0.0, b_orm=0.0))
    nodes = [n for batch in batches for n in batch]
    got = np.concatenate([scorer(b, batch, seed=0) for batch in batches])
    ref = model.score([tree.path_tokens(n).tolist() for n in nodes], batch_size=4)
    z = path_features(tree.parent, tree.log_prior, tree.tok_len, np.asarray(nodes, np.int64))
    assert np.abs(z).max() > 0  # the policy's log-probs are in the tree
    fused = {k: Fusion.load(tmp_path).apply(k, ref[k], z) for k in ("value", "orm")}
    answered = np.array([any(is_terminal_step(x) for x in b.text(n).splitlines()) for n in nodes])
    want = np.where(tree.terminal[nodes], np.where(answered, fused["orm"], 0.0), fused["value"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(fused["value"], ref["value"], atol=1e-3)  # the fusion did change the scores


def test_cached_scoring_equals_uncached_gpt2(char_tok):
    policy = HFPolicy(tiny_model(char_tok, arch="gpt2", seed=1), char_tok)
    check_cached_equals_uncached(policy, *grow(policy))


def check_cached_equals_uncached(policy: HFPolicy, b: TreeBuilder, batches: list[list[int]]) -> None:
    model = CriticModel.from_policy(policy.model, ["value", "prm", "orm"])
    tree = b.tree
    assert tree.terminal[: tree.num_nodes].sum() > 0 and tree.num_nodes > 10
    cfg = CriticsConfig(b_value=1.0, b_prm=0.0, b_orm=0.0, batch_size=3)  # batches of 3 mix parents of any length
    critic = CachedCritic(model, batch_size=3)
    scorer = CriticScorer({"value": critic, "orm": critic}, cfg)  # no gold: terminals get the ORM
    got = np.concatenate([scorer(b, batch, seed=0) for batch in batches])
    nodes = [n for batch in batches for n in batch]
    ref = model.score([tree.path_tokens(n).tolist() for n in nodes], batch_size=4)
    answered = np.array([any(is_terminal_step(x) for x in b.text(n).splitlines()) for n in nodes])
    # terminals: the ORM if they state an answer, else 0 (incomplete); inner nodes: the value
    want = np.where(tree.terminal[nodes], np.where(answered, ref["orm"], 0.0), ref["value"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert critic.critic_forward_tokens == tree.num_tokens  # prompt once + every step once
    assert critic.counters.cache_misses == 1  # the prompt, once
    # the cached state of a node also reproduces every head
    path = tree.path_tokens(nodes[-1]).tolist()
    again = critic.score([path], [len(path) - int(tree.tok_len[nodes[-1]])], kinds=["value", "prm", "orm"])
    for k in ("value", "prm", "orm"):
        np.testing.assert_allclose(again[k], ref[k][-1:], atol=1e-5)


def test_zero_weight_critic_is_never_run_and_gold_terminals_use_the_reward(policy, grown):
    b, batches = grown
    value = CachedCritic(CriticModel.from_policy(policy.model, ["value"]))
    prm = CachedCritic(CriticModel.from_policy(policy.model, ["prm"]))
    scorer = CriticScorer({"value": value, "prm": prm}, CriticsConfig(b_value=1.0, b_prm=0.0, b_orm=0.0),
                          reward=lambda text: 1.0)
    for batch in batches:
        out = scorer(b, batch, seed=0)
        terms = b.tree.terminal[batch]
        assert np.all(out[terms] == 1.0) and np.all((out >= 0) & (out <= 1))
    assert prm.critic_forward_tokens == 0 and value.critic_forward_tokens > 0
    assert scorer.uses_oracle


def test_orm_of_fast_rollouts_reads_them_from_the_node_cache(policy, grown):
    b, batches = grown
    orm = CachedCritic(CriticModel.from_policy(policy.model, ["orm"]))
    cfg = CriticsConfig(b_value=0.0, b_prm=0.0, b_orm=1.0, n_rollouts=2, rollout_tokens=8)
    scorer = CriticScorer({"orm": orm}, cfg, reward=lambda text: 0.0)
    before = policy.counters.forward_tokens
    inner = [n for n in batches[0] if not b.tree.terminal[n]]
    out = scorer(b, inner, seed=5)
    assert out.shape == (len(inner),) and np.all((out > 0) & (out < 1))
    assert policy.counters.forward_tokens > before  # the rollouts were sampled by the policy
    # each rollout extends its node's cached KV: one prompt miss, nodes once, then only rollout tokens
    assert orm.counters.cache_misses == 1 and orm.counters.cache_hits >= len(inner) * 2


def test_save_load_gives_identical_scores_and_batching_shapes(policy, char_tok, tmp_path):
    model = CriticModel.from_policy(policy.model, ["value", "orm"])
    seqs = [policy.encode_prompt(t) for t in ("Q: 1\n", "Q: 12 +3\nx", "Q\n7+5=12\nAnswer: 12\n")]
    before = model.score(seqs, batch_size=2)
    model.save(tmp_path / "critic", tokenizer=char_tok)
    assert {p.name for p in (tmp_path / "critic").iterdir()} >= {"config.json", "model.safetensors",
                                                                 "heads.safetensors", "critic.json"}
    loaded = load(tmp_path / "critic")
    assert loaded.kinds == ("value", "orm")
    after = loaded.score(seqs, batch_size=64)
    for k in ("value", "orm"):
        assert before[k].shape == (3,)
        np.testing.assert_allclose(after[k], before[k], atol=1e-6)
    ids = torch.tensor([seqs[2], [*seqs[2][:-3], 0, 0, 0]])
    mask = torch.tensor([[1] * len(seqs[2]), [1] * (len(seqs[2]) - 3) + [0] * 3])
    out = loaded(ids, mask, torch.tensor([[1, 4, 9, 20], [0, 2, 3, 3]]))
    assert out["value"].shape == (2, 4) and out["orm"].shape == (2, 4)


def test_a_step_that_adds_no_token_is_scored_at_its_prefix(policy):
    """A child whose path equals its parent's (a step of no tokens, e.g. an EOS) gets its prefix's score,
    batched with ordinary children, and nothing is recomputed for it."""
    from arbor.critics.scorer import CachedCritic

    critic = CachedCritic(CriticModel.from_policy(policy.model, ["value"]))
    parent = policy.encode_prompt("Q: 7 +5\n7+5=12\n")
    child = [*parent, *policy.encode_prompt("Answer: 12\n")[1:]]
    mixed = critic.score([child, parent], [len(parent), len(parent)], kinds=["value"])["value"]
    alone = critic.score([parent], [len(parent) - 3], kinds=["value"])["value"]
    fresh = CachedCritic(critic.model).score([child], [len(parent)], kinds=["value"])["value"]
    np.testing.assert_allclose(mixed, [fresh[0], alone[0]], atol=1e-5)
    with pytest.raises(ValueError, match="empty path"):
        critic.score([[]], [0], kinds=["value"])


# -- training: a planted rule ---------------------------------------------------------------------------------
def planted_trees(tok, n_problems: int, seed: int):
    """Trees whose paths die (reward 0) once a step 'b' appears; terminals answer 1 (correct) or 2."""
    rng = np.random.default_rng(seed)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    parts = []
    for p in range(n_problems):
        tree = new_tree(64, 2048, [tok.bos_token_id, *enc(f"Q{p % 10}\n")])
        frontier = [(0, False)]
        for _depth in range(3):
            nxt = []
            for node, dead in frontier:
                for step in rng.choice(["a\n", "b\n", "c\n"], size=2, replace=False):
                    kid_dead = dead or step == "b\n"
                    nxt.append((add_child(tree, node, enc(step)), kid_dead))
            frontier = nxt
        for node, dead in frontier:
            add_child(tree, node, enc("Answer: 2\n" if dead else "Answer: 1\n"), terminal=True,
                      reward=0.0 if dead else 1.0)
        parts.append(tree_rows(f"p{p}", tree, tok.decode))
    return parts


@pytest.mark.parametrize("shared", [True, False])
def test_each_critic_learns_a_planted_rule(char_tok, tmp_path, shared, one_thread):
    write_trees(tmp_path / "t.parquet", planted_trees(char_tok, 20, seed=0))
    labels = build_labels(read_tree_files([tmp_path / "t.parquet"]))
    split = assign_splits(labels.column("problem_id").to_pylist(), heldout_fraction=0.25, val_fraction=0.15, seed=0)
    cfg = CriticsConfig(max_epochs=8, patience=8, problems_per_batch=3, lr=3e-3, head_lr=3e-2, freeze_backbone=False,
                        prm_pairwise=not shared)
    items = pack_problems(labels, prm_label=cfg.prm_label, pair_margin=cfg.pair_margin)
    assert any(it["pairs"] for it in items)
    batch = collate(items[:2])
    assert batch["positions"].shape == batch["pos_mask"].shape == batch["target_value"].shape
    parts = {s: [it for it in items if split[it["problem_id"]] == s] for s in ("train", "val", "heldout")}
    base = tiny_model(char_tok, seed=2)
    models = ({k: m for m in [CriticModel.from_policy(base, ["value", "prm", "orm"])] for k in m.kinds} if shared
              else {k: CriticModel.from_policy(base, [k]) for k in ("value", "prm", "orm")})
    before = {k: p.detach().clone() for k, p in models["prm"].backbone.named_parameters()}
    train_critics(models, parts["train"], parts["val"], cfg, seed=0, progress=False)
    assert any(not torch.equal(before[k], p) for k, p in models["prm"].backbone.named_parameters())
    pred = predict(models, parts["heldout"])
    d = labels.take(pred["row"]).to_pydict()
    depth = np.asarray(d["depth"])
    term = np.asarray(d["terminal"])
    assert cal.auroc(pred["value"], np.asarray(d["value"]) >= 0.5) >= 0.9
    assert cal.auroc(pred["prm"][depth > 0], np.asarray(d["prm_hard"])[depth > 0]) >= 0.9
    assert cal.auroc(pred["orm"][term], np.asarray([x for x in d["orm"] if x is not None])) >= 0.9


def with_completion_rows(labels):
    """`labels` plus two completion-like rows (node < 0): a terminal row's path extended by two tokens, and that
    path without its last token (a row whose path is a prefix of another's)."""
    import pyarrow as pa

    from arbor.critics.labels import LABEL_SCHEMA

    d = labels.to_pydict()
    r = d["terminal"].index(True)
    extra = {k: [v[r], v[r]] for k, v in d.items()}
    long = [*d["tokens"][r], 40, 41]
    extra.update(node=[-1, -2], parent=[-1, -2], owner=[-1, -1], tokens=[long, long[:-1]], orm=[None, 1.0])
    return pa.concat_tables([labels, pa.table(extra, schema=LABEL_SCHEMA)])


@pytest.mark.parametrize("arch,attn,max_tokens", [("llama", "sdpa", 4096), ("llama", "eager", 4096),
                                                   ("gpt2", "sdpa", 4096), ("llama", "sdpa", 40)])
def test_trie_packed_training_forward_equals_one_forward_per_path(char_tok, tmp_path, arch, attn, max_tokens,
                                                                  one_thread):
    """`pack_problems` merges a problem's labelled paths into one token trie (each distinct prefix once) and
    `collate` masks each token to its own path: the critic's logits at every labelled row equal those of the
    row's path alone (uncached `score`); the trie holds fewer tokens than the paths; completion rows (node < 0)
    pack too; with a small `max_tokens` a problem becomes several tries of at most that many tokens, every row
    in exactly one."""
    write_trees(tmp_path / "t.parquet", planted_trees(char_tok, 3, seed=4))
    labels = with_completion_rows(build_labels(read_tree_files([tmp_path / "t.parquet"])))
    base = tiny_model(char_tok, arch=arch, seed=2)
    base.config._attn_implementation = attn
    model = CriticModel.from_policy(base, ["value", "prm", "orm"]).eval()
    model.backbone.config._attn_implementation = attn
    items = pack_problems(labels, max_tokens=max_tokens)
    tokens = labels.column("tokens").to_pylist()
    assert sorted(r for it in items for r in it["rows"]) == list(range(labels.num_rows))
    if max_tokens < 100:
        assert len(items) > 6 and max(len(it["ids"]) for it in items) <= max_tokens
        assert sum(len(it["ids"]) for it in pack_problems(labels)) < sum(len(it["ids"]) for it in items)
    else:
        assert len(items) == 3
        assert sum(len(it["ids"]) for it in items) < sum(len(tokens[r]) for it in items for r in it["rows"]) / 2
    batch = collate(items)
    t = batch["input_ids"].shape[1]
    assert batch["attention_mask"].shape == (len(items), 1, t, t)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["positions"], batch["position_ids"])
    for i, it in enumerate(items):
        path = [tokens[r] for r in it["rows"]]
        want = model.score(path, batch_size=1)
        for k in model.kinds:
            got = torch.sigmoid(logits[k][i, : len(path)]).numpy()
            np.testing.assert_allclose(got, want[k], atol=2e-5, err_msg=f"{arch}/{attn} {k} problem {i}")
    # a path that is a prefix of another shares its positions: the step end is a trie node, labelled there
    it = items[0]
    for j, r in enumerate(it["rows"]):
        end = it["positions"][j]
        assert it["position_ids"][end] == len(tokens[r]) - 1 and it["ids"][end] == tokens[r][-1]


def test_frozen_backbone_trains_the_heads_only(char_tok, tmp_path, one_thread):
    write_trees(tmp_path / "t.parquet", planted_trees(char_tok, 6, seed=0))
    items = pack_problems(build_labels(read_tree_files([tmp_path / "t.parquet"])))
    model = CriticModel.from_policy(tiny_model(char_tok, seed=2), ["value", "prm", "orm"])
    body = {k: p.detach().clone() for k, p in model.backbone.named_parameters()}
    heads = {k: p.detach().clone() for k, p in model.heads.named_parameters()}
    cfg = CriticsConfig(max_epochs=1, problems_per_batch=2, freeze_backbone=True, head_lr=1e-2)
    train_critics(dict.fromkeys(("value", "prm", "orm"), model), items[:4], items[4:], cfg, progress=False)
    assert all(torch.equal(body[k], p) for k, p in model.backbone.named_parameters())
    assert any(not torch.equal(heads[k], p) for k, p in model.heads.named_parameters())


def test_gradient_checkpointing_trains_the_same_body_and_heads(char_tok, tmp_path, monkeypatch, one_thread):
    """`critics.gradient_checkpointing` with a fine-tuned body reaches it (once for the shared body; that it
    recomputes activations is tests/test_lora.py's), and the trained critic equals the one trained without it."""
    import arbor.train.critic as tc

    write_trees(tmp_path / "t.parquet", planted_trees(char_tok, 6, seed=0))
    items = pack_problems(build_labels(read_tree_files([tmp_path / "t.parquet"])))
    seen = []
    monkeypatch.setattr(tc, "checkpoint_activations", lambda m: (seen.append(1), lora_checkpoint(m))[1])

    def trained(checkpointing: bool) -> CriticModel:
        torch.manual_seed(5)
        model = CriticModel.from_policy(tiny_model(char_tok, seed=2), ["value", "prm", "orm"])
        cfg = CriticsConfig(max_epochs=2, patience=2, problems_per_batch=2, freeze_backbone=False,
                            gradient_checkpointing=checkpointing)
        train_critics(dict.fromkeys(model.kinds, model), items[:4], items[4:], cfg, seed=3, progress=False)
        return model

    plain = trained(False)
    assert seen == []
    ckpt = trained(True)
    assert seen == [1]
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("shared", [True, False])
def test_frozen_body_features_are_computed_once_and_train_the_same_heads(char_tok, tmp_path, monkeypatch, shared,
                                                                          one_thread):
    import arbor.train.critic as tc

    write_trees(tmp_path / "t.parquet", planted_trees(char_tok, 8, seed=1))
    items = pack_problems(build_labels(read_tree_files([tmp_path / "t.parquet"])))
    cfg = CriticsConfig(max_epochs=3, patience=3, problems_per_batch=2, freeze_backbone=True, head_lr=1e-2)
    base = tiny_model(char_tok, seed=2)

    def critics() -> dict[str, CriticModel]:
        torch.manual_seed(5)
        if shared:
            m = CriticModel.from_policy(base, ["value", "prm", "orm"])
            return dict.fromkeys(m.kinds, m)
        return {k: CriticModel.from_policy(base, [k]) for k in ("value", "prm", "orm")}

    forwards = []
    hidden = CriticModel.hidden
    monkeypatch.setattr(CriticModel, "hidden", lambda self, *a, **k: (forwards.append(1), hidden(self, *a, **k))[1])
    cached = critics()
    out_cached = train_critics(cached, items[:6], items[6:], cfg, seed=3, progress=False)
    n_cached = len(forwards)
    monkeypatch.setattr(tc, "cache_features", lambda models, its: its)  # the uncached forward every step
    plain = critics()
    out_plain = train_critics(plain, items[:6], items[6:], cfg, seed=3, progress=False)
    nets = 1 if shared else 3
    assert n_cached == nets * 2  # one forward per body over train (6 items) and over val (2), in batches of 8
    assert len(forwards) - n_cached > n_cached * cfg.max_epochs  # the uncached path runs the body every step
    for k in ("value", "prm", "orm"):
        for a, b in zip(cached[k].heads.parameters(), plain[k].heads.parameters(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert out_cached["critic_best_val_loss"] == pytest.approx(out_plain["critic_best_val_loss"], rel=1e-4)


def stage_inputs(tok, tmp_path, *, chat_template: str | None = None):
    """Searched trees (12 planted problems, with a manifest), a saved tiny policy (its tokenizer with
    `chat_template`) and the problems' file: (trees dir, policy dir, train file)."""
    import json

    from arbor.pipeline.manifest import write_manifest

    trees = tmp_path / "trees"
    trees.mkdir()
    write_trees(trees / "part-0.parquet", planted_trees(tok, 12, seed=1))
    write_manifest(trees)
    policy_dir = tmp_path / "policy"
    tiny_model(tok, seed=3).save_pretrained(policy_dir)
    tok.chat_template = chat_template
    try:
        tok.save_pretrained(policy_dir)
    finally:
        tok.chat_template = None
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"p{i}", "question": f"{i % 10}", "answer": "1"}) + "\n"
                             for i in range(12)))
    return trees, policy_dir, train


def test_stage_writes_loadable_critics_metrics_and_plot(char_tok, tmp_path, one_thread, monkeypatch):
    from arbor.critics.scorer import critic_scorer, load_critics
    from arbor.pipeline.config import ArborConfig, TrackingConfig
    from arbor.stages import critics as stage
    from arbor.stages.critics import run

    trees, policy_dir, train = stage_inputs(char_tok, tmp_path)
    fitted_on = []
    fit = stage.fit_confidence

    def spy(pred, d, cfg):
        fitted_on.append(set(d["problem_id"]))
        return fit(pred, d, cfg)

    monkeypatch.setattr(stage, "fit_confidence", spy)
    cfg = ArborConfig(tracking=TrackingConfig(enabled=False))
    crit = CriticsConfig(max_epochs=2, min_completions=2, completion_tokens=6, shared_backbone=True)
    m = run(cfg, trees_dir=trees, policy_dir=policy_dir, train_file=train, out_dir=tmp_path / "critics",
            plot=tmp_path / "rel.png", critics=crit)
    for k in ("value", "prm", "orm"):
        assert {f"{k}_auroc", f"{k}_precision", f"{k}_recall", f"{k}_ece"} <= set(m)
        assert 0.0 <= m[f"{k}_ece"] <= 1.0
    assert m["extra_completions"] > 0 and m["heldout_orm_n"] > 0 and m["train_problems"] >= 6
    assert (tmp_path / "rel.png").is_file() and (tmp_path / "critics" / "_manifest.json").is_file()
    from arbor.pipeline.manifest import read_manifest

    heldout = read_manifest(tmp_path / "critics")["meta"]["heldout"]  # what the training search's gate reads
    for k in ("value", "prm", "orm"):
        assert heldout[k]["auroc"] == pytest.approx(m[f"{k}_auroc"])
        w = m[f"{k}_auroc_within_problem"]
        assert heldout[k]["auroc_within_problem"] == (None if w is None else pytest.approx(w))
    # the fusion with the policy's confidence, fitted on the validation problems, scores the reported metrics;
    # the critics' own AUROCs are beside them
    assert (tmp_path / "critics" / "confidence.json").is_file()
    assert {f"{k}_auroc_{b}" for k in ("value", "prm", "orm") for b in ("critic_only", "confidence_only")} <= set(m)
    import pyarrow.parquet as pq

    val = set(pq.read_table(tmp_path / "critics" / "labels" / "val.parquet").column("problem_id").to_pylist())
    assert fitted_on[0] == val  # the fusion is fitted on the validation problems only (then the baseline's)
    assert all(f <= val for f in fitted_on)
    assert {f"value_confidence_{c}" for c in ("critic", "path_mean", "weakest_step", "last_step", "bias")} <= set(m)
    critics = load_critics(tmp_path / "critics", ["value", "orm"])
    assert critics["value"] is critics["orm"]  # one shared backbone
    assert critics["value"].fusion is not None and set(critics["value"].fusion.coef) == {"value", "prm", "orm"}
    assert load_critics(tmp_path / "critics", ["value"], confidence=False)["value"].fusion is None
    assert critics["orm"].model.score([[1, 40, 50, 5]])["orm"].shape == (1,)
    scorer = critic_scorer(tmp_path / "critics", CriticsConfig(b_value=1.0, b_prm=0.0))  # decoding: + ORM
    assert set(scorer.critics) == {"value", "orm"} and len(scorer.backbones) == 1 and not scorer.uses_oracle


def test_stage_trains_on_outcome_samples_of_problems_without_trees(char_tok, tmp_path, one_thread, monkeypatch):
    """`critics.outcome_problems`: the first train problems the search did not reach get whole sampled
    solutions, whose rows go to the training split only (the held-out metrics stay on tree nodes)."""
    import json

    import pyarrow.parquet as pq

    import arbor.train.critic as training
    from arbor.pipeline.config import ArborConfig, TrackingConfig
    from arbor.stages.critics import run

    trees, policy_dir, train = stage_inputs(char_tok, tmp_path)
    with train.open("a") as f:  # six more problems, none searched
        f.write("".join(json.dumps({"id": f"x{i}", "question": f"{i}", "answer": "1"}) + "\n" for i in range(6)))
    cfg = ArborConfig(tracking=TrackingConfig(enabled=False))
    crit = CriticsConfig(max_epochs=1, min_completions=2, completion_tokens=6, outcome_problems=4,
                         outcome_samples=3)
    trained_on = {}
    fit = training.train_critics

    def spy(models, train_items, val_items, c, **kw):
        trained_on.update(train={it["problem_id"] for it in train_items}, val={it["problem_id"] for it in val_items})
        return fit(models, train_items, val_items, c, **kw)

    monkeypatch.setattr(training, "train_critics", spy)
    m = run(cfg, trees_dir=trees, policy_dir=policy_dir, train_file=train, out_dir=tmp_path / "critics", critics=crit)
    assert {"x0", "x1", "x2", "x3"} <= trained_on["train"] and not {"x0", "x1", "x2", "x3"} & trained_on["val"]
    assert m["outcome_problems"] == 4 and m["outcome_solutions"] == 12 and m["outcome_rows"] >= 1
    assert 0.0 <= m["outcome_solved"] <= 1.0
    labels = {s: pq.read_table(tmp_path / "critics" / "labels" / f"{s}.parquet").to_pydict()
              for s in ("train", "val", "heldout")}
    outcome = {p for p, n in zip(labels["train"]["problem_id"], labels["train"]["node"], strict=True) if n < 0}
    assert outcome == {"x0", "x1", "x2", "x3"}  # the first problems without a tree, in file order
    assert not {"x0", "x1", "x2", "x3", "x4", "x5"} & (set(labels["val"]["problem_id"])
                                                       | set(labels["heldout"]["problem_id"]))
    assert m["train_completion_rows"] == 0  # outcome rows are counted apart, never as tree nodes or completions
    assert m["heldout_value_n"] > 0


def test_outcome_rows_of_a_problem_with_a_tree_are_refused(char_tok, tmp_path):
    from arbor.stages.critics import split_items

    write_trees(tmp_path / "t.parquet", planted_trees(char_tok, 2, seed=4))
    labels = build_labels(read_tree_files([tmp_path / "t.parquet"]))
    pid = labels.column("problem_id")[0].as_py()
    with pytest.raises(ValueError, match="problems that have trees"):
        split_items(labels, {pid: "train"}, CriticsConfig(), outcome=labels)


def test_label_targets_by_hand():
    """The value at every row, the PRM at steps only (soft or hard), the ORM at scored terminals only; the
    stage's (measured rows, target) pairs are the same numbers."""
    from arbor.stages.critics import _rows_and_targets
    from arbor.train.critic import label_targets

    d = {"depth": [0, 1, 2, 2], "terminal": [False, False, True, True], "value": [0.5, 0.25, 1.0, 0.0],
         "prm_soft": [0.5, 0.25, 1.0, 0.0], "prm_hard": [1.0, 1.0, 1.0, 0.0], "orm": [None, None, 1.0, None]}
    t = label_targets(d)
    np.testing.assert_array_equal(t["value"], [0.5, 0.25, 1.0, 0.0])
    np.testing.assert_array_equal(t["prm"], [np.nan, 0.25, 1.0, 0.0])
    np.testing.assert_array_equal(t["orm"], [np.nan, np.nan, 1.0, np.nan])  # node 3: a terminal without reward
    np.testing.assert_array_equal(label_targets(d, "hard")["prm"], [np.nan, 1.0, 1.0, 0.0])
    rows = _rows_and_targets(d, "hard")
    assert [m.tolist() for m, _ in rows.values()] == [[True] * 4, [False, True, True, True],
                                                      [False, False, True, False]]
    np.testing.assert_array_equal(rows["prm"][1], [0.0, 1.0, 1.0, 0.0])




def test_stage_trains_the_same_critics_whatever_ran_before(char_tok, tmp_path, one_thread):
    """Same inputs and seed, same critics, bitwise, even when the process's global torch RNG was left in another
    state (two fresh `make run`s once trained different critics_0 from identical labels: the heads were
    initialised from the unseeded global RNG)."""
    from safetensors.torch import load_file

    from arbor.critics.models import HEADS_FILE
    from arbor.pipeline.config import ArborConfig, TrackingConfig
    from arbor.stages.critics import run

    trees, policy_dir, train = stage_inputs(char_tok, tmp_path)
    cfg = ArborConfig(tracking=TrackingConfig(enabled=False))
    crit = CriticsConfig(max_epochs=1, min_completions=2, completion_tokens=6)
    assert not crit.freeze_backbone  # the default trains the body too: it must match as well
    heads = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # whatever ran before the stage
        run(cfg, trees_dir=trees, policy_dir=policy_dir, train_file=train, out_dir=tmp_path / f"c{i}", critics=crit)
        heads.append(load_file(tmp_path / f"c{i}" / "shared" / HEADS_FILE)
                     | load_file(tmp_path / f"c{i}" / "shared" / "model.safetensors"))
    assert heads[0].keys() == heads[1].keys() and any("layers" in k or "h." in k for k in heads[0])
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


@pytest.mark.parametrize("body", ["frozen", "full", "lora"])
def test_stage_runs_the_policy_as_configured(char_tok, tmp_path, monkeypatch, one_thread, body):
    """The stage loads the policy as search does (`load_policy`: dtype, step-end rule, chat prompts), so the
    extra completions come from the policy that grew the trees; a frozen backbone runs in `policy.dtype`, one
    trained in full starts from float32 master weights, and LoRA adapters are merged in float32."""
    from safetensors.torch import load_file

    from arbor.pipeline.config import load_config
    from arbor.stages import critics as stage

    from .test_pretrained import TEMPLATE

    trees, policy_dir, train = stage_inputs(char_tok, tmp_path, chat_template=TEMPLATE)
    seen = []
    real = stage.build_labels
    monkeypatch.setattr(stage, "build_labels", lambda *a, **k: seen.append(k["policy"]) or real(*a, **k))
    cfg = load_config(None, {"tracking.enabled": False, "policy.dtype": "bfloat16", "policy.chat_template": True,
                             "task.step_end": "sentence"})
    crit = CriticsConfig(max_epochs=1, min_completions=2, completion_tokens=6, freeze_backbone=body == "frozen",
                         lora=LoraConfig(enabled=body == "lora", r=2))
    m = stage.run(cfg, trees_dir=trees, policy_dir=policy_dir, train_file=train, out_dir=tmp_path / "critics",
                  critics=crit)
    [policy] = seen
    assert policy.model.dtype == torch.bfloat16 and policy.step_end == "sentence" and policy.chat is not None
    assert m["extra_completions"] > 0 and m["lora"] == (body == "lora")
    backbone = load_file(tmp_path / "critics" / "shared" / "model.safetensors")
    assert {w.dtype for w in backbone.values()} == {torch.bfloat16 if body == "frozen" else torch.float32}
    assert not any("lora_" in k for k in backbone)


def test_lora_critic_moves_the_body_by_low_rank_deltas_only(char_tok, tmp_path, one_thread):
    """critics.lora: the backbone's own weights stay frozen under rank-r adapters, merged when training ends: every
    change is a rank <= r update of an adapted linear layer; embeddings and norms are untouched."""
    from arbor.lm import lora

    write_trees(tmp_path / "t.parquet", planted_trees(char_tok, 6, seed=0))
    items = pack_problems(build_labels(read_tree_files([tmp_path / "t.parquet"])))
    model = CriticModel.from_policy(tiny_model(char_tok, seed=2), ["value", "prm", "orm"])
    body = {k: p.detach().clone() for k, p in model.backbone.named_parameters()}
    cfg = CriticsConfig(max_epochs=2, patience=2, problems_per_batch=2, freeze_backbone=False, lr=1e-2,
                        lora=LoraConfig(enabled=True, r=2, alpha=4.0))
    train_critics(dict.fromkeys(("value", "prm", "orm"), model), items[:4], items[4:], cfg, progress=False)
    assert not lora.is_lora(model.backbone)
    after = dict(model.backbone.named_parameters())
    assert after.keys() == body.keys()
    changed = [k for k in body if not torch.equal(body[k], after[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    assert all(torch.linalg.matrix_rank(after[k].detach() - body[k]) <= 2 for k in changed)
    model.save(tmp_path / "critic", tokenizer=char_tok)
    ids = [[1, 40, 50, 5]]
    np.testing.assert_allclose(load(tmp_path / "critic").score(ids)["value"], model.score(ids)["value"], atol=1e-6)


def test_grouped_auroc_ranks_within_each_problem_only():
    # pooled, the scores separate the easy problem (all high) from the hard one (all low): AUROC 0.75
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    labels = np.array([0, 1, 1, 0, 1, 0])
    groups = np.array(["easy", "easy", "easy", "hard", "hard", "hard"])
    assert cal.auroc(scores, labels) > 0.5
    within, n = cal.grouped_auroc(scores, labels, groups)
    assert n == 2 and within == pytest.approx((0.0 + 0.5) / 2)  # easy: the wrong one ranked first; hard: 1 of 2
    assert cal.grouped_auroc(scores, np.ones(6, int), groups)[1] == 0
