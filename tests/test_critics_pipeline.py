"""The critics in the pipeline: params <-> config composition, critic-scored search (critic tokens recorded),
evaluate's critic read-outs (ORM/PRM reranking of the drawn samples, critic-scored search decoding), and the
read-out helpers by hand (step split, rerank choices, prefix-cached sample scores == uncached scores)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from arbor.critics.config import CriticsConfig
from arbor.critics.models import CriticModel
from arbor.critics.readouts import READOUTS, SampleScores, rerank, score_samples, step_ends
from arbor.critics.scorer import CachedCritic
from arbor.lm.base import Continuation
from arbor.lm.hf import HFPolicy
from arbor.pipeline import plan
from arbor.pipeline.config import ArborConfig, ConfigError, load_config, to_dict
from arbor.pipeline.io import write_jsonl
from arbor.pipeline.manifest import write_manifest
from arbor.tasks import is_terminal_step, make_splits

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


# -- composition ------------------------------------------------------------------------------------------------
def test_params_critics_section_is_the_config():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["critics"]
    assert params == to_dict(CriticsConfig())  # every key written out, with the built-in defaults
    cfg = load_config(ROOT / "params.yaml", {"critics.b_orm": 0.25, "critics.prm_label": "hard"})
    assert isinstance(cfg.critics, CriticsConfig) and cfg.critics.b_orm == 0.25 and cfg.critics.prm_label == "hard"
    with pytest.raises(ConfigError, match=r"command line: --critics.heldout_fraction: expected"):
        load_config(ROOT / "params.yaml", {"critics.heldout_fraction": 0.95})


def test_iteration_plan():
    assert [plan.searcher(k) for k in (0, 1, 2)] == [0, 0, 1]
    assert plan.search_critics_dir(0) is None and plan.search_critics_dir(2) == "models/iter_1/critics"
    assert plan.trees_dir(0) == "trees/iter_0" and plan.policy_dir(3) == "models/iter_3/policy"


# -- read-outs by hand ------------------------------------------------------------------------------------------
def test_step_ends_split_like_tree_steps():
    piece = {1: "1+1=2", 9: "\n", 5: "Answer: 2", 7: "x"}.get
    toks = [1, 9, 5, 9, 7, 7]
    assert step_ends(toks, piece, step_tokens=32, is_terminal=is_terminal_step) == [2, 4]  # cut after the answer
    assert step_ends(toks, piece, step_tokens=3, is_terminal=lambda s: False) == [2, 4, 6]
    assert step_ends([7, 7, 7, 7, 7], piece, step_tokens=2, is_terminal=lambda s: False) == [2, 4, 5]


def test_rerank_picks_by_hand():
    scores = SampleScores(orm=np.array([0.2, 0.9, 0.4, 0.4]),
                          prm=[np.array([0.9, 0.8]), np.array([0.1, 0.95]), np.array([0.6, 0.7]), np.array([0.5])])
    got = rerank(scores, ["3", "5", "3", None])
    # ORM best: sample 1; vote: "3" weighs 0.6 < "5" 0.9 -> sample 1; PRM min: 0.8, 0.1, 0.6, 0.5 -> sample 0;
    # PRM last: 0.8, 0.95, 0.7, 0.5 -> sample 1
    assert got == {"orm_best_of_n": 1, "orm_vote": 1, "prm_min_best_of_n": 0, "prm_last_best_of_n": 1}
    # a sample that states no answer is never chosen, however high its scores
    top = SampleScores(orm=np.array([0.99, 0.2]), prm=[np.array([0.99]), np.array([0.1])])
    assert set(rerank(top, [None, "7"]).values()) == {1}
    assert rerank(SampleScores(np.array([0.3, 0.2]), [np.zeros(1)] * 2), ["4", "4"])["orm_vote"] == 0
    assert set(rerank(SampleScores(np.array([0.3]), [np.zeros(1)]), [None]).values()) == {-1}
    assert set(READOUTS) == set(got)


def test_sample_scores_cached_equal_uncached(char_tok):
    policy = HFPolicy(tiny_model(char_tok, seed=1), char_tok)
    model = CriticModel.from_policy(policy.model, ["prm", "orm"])
    critic = CachedCritic(model, batch_size=3)
    prompt = policy.encode_prompt("Q: 3 +4\n")
    texts = ["3+4=7\nAnswer: 7\nextra\n", "3+4=8\nAnswer: 8\n", "Answer: 7\n", "3+4=7\n4*1=4\nAnswer: 4"]
    samples = [Continuation(policy.encode(t), np.zeros(0), "length", t) for t in texts]
    piece = lambda t: policy.decode([t])  # noqa: E731
    got = score_samples({"prm": critic, "orm": critic}, prompt, samples, piece=piece, step_tokens=32,
                        is_terminal=is_terminal_step)
    for s, text in zip(samples, texts, strict=True):
        ends = step_ends(s.token_ids, piece, step_tokens=32, is_terminal=is_terminal_step)
        ref = model.score([prompt + s.token_ids[:e] for e in ends])
        i = texts.index(text)
        np.testing.assert_allclose(got.prm[i], ref["prm"], atol=1e-5)
        np.testing.assert_allclose(got.orm[i], ref["orm"][-1], atol=1e-5)
    # the prompt once, then every sample token up to its answer line once ("extra\n" is never read)
    fed = sum(len(policy.encode(t.split("extra")[0])) for t in texts)
    assert critic.critic_forward_tokens == len(prompt) + fed and critic.counters.cache_misses == 1
    assert len(critic.store) == 0  # emptied for the next problem
    # critics saved with a fusion read each step prefix's confidence from the sample's own token log-probs
    from arbor.critics.confidence import Fusion, sample_features

    critic.fusion = Fusion({"prm": [1.0, 0.0, 3.0, 0.0, 0.0], "orm": [0.5, 2.0, 0.0, -1.0, 0.3]})
    rng = np.random.default_rng(0)
    samples = [Continuation(s.token_ids, -rng.random(len(s.token_ids)), "length", s.text) for s in samples]
    fused = score_samples({"prm": critic, "orm": critic}, prompt, samples, piece=piece, step_tokens=32,
                          is_terminal=is_terminal_step)
    for i, s in enumerate(samples):
        ends = step_ends(s.token_ids, piece, step_tokens=32, is_terminal=is_terminal_step)
        z = sample_features(s.logprobs, ends)
        np.testing.assert_allclose(fused.prm[i], critic.fusion.apply("prm", got.prm[i], z), atol=1e-5)
        np.testing.assert_allclose(fused.orm[i], critic.fusion.apply("orm", got.orm[i:i + 1], z[-1:])[0], atol=1e-5)


# -- stages -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(char_tok, tmp_path_factory):
    """A tiny policy, critics saved from random init (shared backbone, with a manifest), problems."""
    tmp = tmp_path_factory.mktemp("critics_pipeline")
    model = tiny_model(char_tok, seed=4)
    model.save_pretrained(tmp / "policy")
    char_tok.save_pretrained(tmp / "policy")
    CriticModel.from_policy(model, ["value", "prm", "orm"]).save(tmp / "critics" / "shared", tokenizer=char_tok)
    write_manifest(tmp / "critics", {"stage": "critics", "iteration": 0})
    train, evals = make_splits(ArborConfig().task, 4, 3, seed=0)
    write_jsonl(tmp / "train.jsonl", [p.to_dict() for p in train])
    write_jsonl(tmp / "eval.jsonl", [p.to_dict() for p in evals])
    return tmp


FAST = {"search.n_problems": 2, "search.shard_size": 1, "search.eta.num_simulations": 6, "search.eta.step_tokens": 4,
        "search.eta.max_depth": 3, "search.eta.batch_leaves": 2, "tracking.enabled": False}


def test_search_with_critics_records_critic_tokens(world, tmp_path):
    from arbor.stages import search

    cfg = load_config(None, FAST)
    m = search.run(cfg, policy_dir=world / "policy", train_file=world / "train.jsonl", out_dir=tmp_path / "trees",
                   critics_dir=world / "critics")
    assert m["critics"] == str(world / "critics") and m["critic_forward_tokens"] > 0
    # gold terminals take the oracle, every other stored token passes the (shared) critic once
    assert 0 < m["critic_token_ratio"] <= 1.0
    with pytest.raises(FileNotFoundError, match="critics not found"):
        search.run(cfg, policy_dir=world / "policy", train_file=world / "train.jsonl", out_dir=tmp_path / "t2",
                   critics_dir=tmp_path / "missing")


def test_critics_that_rank_no_better_than_chance_do_not_guide_the_search(world, tmp_path):
    import shutil

    from arbor.stages import search

    cfg = load_config(None, FAST)
    weak, strong = tmp_path / "weak", tmp_path / "strong"
    for d, x in ((weak, 0.55), (strong, 0.7)):
        shutil.copytree(world / "critics" / "shared", d / "shared")
        write_manifest(d, {"stage": "critics", "heldout": {k: {"auroc": 0.8, "auroc_within_problem": x}
                                                           for k in ("value", "prm", "orm")}})
    m = search.run(cfg, policy_dir=world / "policy", train_file=world / "train.jsonl", out_dir=tmp_path / "t_weak",
                   critics_dir=weak)
    assert not m["critics_guide"] and m["critic_forward_tokens"] == 0
    assert "value 0.55, prm 0.55 < critics.guide_min_auroc 0.6" in m["critics_gate"]
    m = search.run(cfg, policy_dir=world / "policy", train_file=world / "train.jsonl", out_dir=tmp_path / "t_ok",
                   critics_dir=strong)
    assert m["critics_guide"] and m["critics_gate"] is None and m["critic_forward_tokens"] > 0
    off = load_config(None, {**FAST, "critics.guide_min_auroc": 0.0})
    m = search.run(off, policy_dir=world / "policy", train_file=world / "train.jsonl", out_dir=tmp_path / "t_off",
                   critics_dir=weak)
    assert m["critics_guide"] and m["critic_forward_tokens"] > 0


def test_guide_gate_reads_the_weighted_critics_only():
    heldout = {"value": {"auroc_within_problem": 0.7}, "prm": {"auroc_within_problem": None},
               "orm": {"auroc_within_problem": 0.5}}
    assert "prm None" in CriticsConfig().guide_gate(heldout)  # undefined (no group with both classes) is not good
    assert CriticsConfig(b_prm=0.0).guide_gate(heldout) is None  # the ORM is not weighed (terminals have gold)
    assert CriticsConfig(b_prm=0.0, b_orm=0.5).guide_gate(heldout) == (
        "held-out within-problem AUROC orm 0.5 < critics.guide_min_auroc 0.6")
    assert "value 0.7" in CriticsConfig(b_prm=0.0, guide_min_auroc=0.75).guide_gate(heldout)
    assert CriticsConfig().guide_gate(None) is None  # critics without recorded metrics (not from `arbor critics`)


def test_evaluate_with_critics_writes_the_readouts(world, tmp_path):
    from arbor.stages import evaluate

    argv = ["--params", "", "--tracking.enabled", "false", "--evaluate.k", "3", "--evaluate.max_new_tokens", "12",
            "--evaluate.search", "true", "--evaluate.search_simulations", "3", "--search.eta.step_tokens", "4",
            "--search.eta.max_depth", "3", "--policy", str(world / "policy"), "--eval", str(world / "eval.jsonl"),
            "--critics", str(world / "critics"), "--metrics", str(tmp_path / "m.json")]
    evaluate.main(argv)
    m = json.loads((tmp_path / "m.json").read_text())
    for key in (*READOUTS, "rerank_critic_forward_tokens", "search_critic_forward_tokens", "samples_forward_tokens"):
        assert key in m, key
    assert all(0.0 <= m[k] <= 1.0 for k in READOUTS)
    assert m["search_scorer"] == "critics" and m["search_critic_forward_tokens"] > 0
    # decoding has no gold: every stored token (terminals included) passes the shared critic once
    assert 0.9 <= m["search_critic_token_ratio"] <= 1.05 and m["search_stored_tokens"] > 0
    assert m["rerank_critic_forward_tokens"] > 0 and m["samples_forward_tokens"] > 0
    assert m["forward_tokens"] == m["samples_forward_tokens"] + m["greedy_forward_tokens"]  # samples drawn once


def test_critics_not_refreshed_are_critics_0_copied_and_verified(tmp_path, monkeypatch):
    """`critics.refresh: false` (AlphaLLM's fixed critics): iteration k's critics are critics_0's files."""
    import json

    from arbor.pipeline.manifest import verify, write_manifest
    from arbor.stages import critics as stage

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "models/iter_0/critics/shared"
    src.mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"weights")
    write_manifest(tmp_path / "models/iter_0/critics", {"stage": "critics", "iteration": 0})
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/critics_0.json").write_text(json.dumps({"orm_auroc": 0.8}))
    m = stage.main(["--params", "", "--tracking.enabled", "false", "--critics.refresh", "false", "--iter", "2"])
    assert m["orm_auroc"] == 0.8 and m["refreshed"] is False
    verify(tmp_path / "models/iter_2/critics")
    assert (tmp_path / "models/iter_2/critics/shared/model.safetensors").read_bytes() == b"weights"
    assert json.loads((tmp_path / "metrics/critics_2.json").read_text())["kept_from"] == "models/iter_0/critics"
    (src / "model.safetensors").write_bytes(b"damaged")  # a damaged critics_0 is never copied as valid
    with pytest.raises(SystemExit):
        stage.main(["--params", "", "--tracking.enabled", "false", "--critics.refresh", "false", "--iter", "3"])
    assert not (tmp_path / "models/iter_3").exists()


def test_search_decoding_obeys_the_gate_and_reports_the_critics_decoding_beside(world, tmp_path):
    """Critics below critics.guide_min_auroc do not decode (as they do not guide the training search): the
    search_* read-outs equal the critic-free decoding; with evaluate.gated_critic_search the critics' decoding
    comes beside it as critic_search_*."""
    import shutil

    from arbor.stages import evaluate

    cfg = load_config(None, {**FAST, "evaluate.search_problems": 2, "evaluate.search_simulations": 4})
    weak, strong = tmp_path / "weak", tmp_path / "strong"
    for d, x in ((weak, 0.55), (strong, 0.7)):
        shutil.copytree(world / "critics" / "shared", d / "shared")
        write_manifest(d, {"stage": "critics", "heldout": {k: {"auroc": 0.8, "auroc_within_problem": x}
                                                           for k in ("value", "prm", "orm")}})
    args = {"policy_dir": world / "policy", "eval_file": world / "eval.jsonl", "part": "decode"}
    plain = evaluate.run(cfg, **args)
    gated_only = evaluate.run(cfg, critics_dir=weak, **args)
    assert not any(k.startswith("critic_search") for k in gated_only)  # default: no second decoding
    cfg = load_config(None, {**FAST, "evaluate.search_problems": 2, "evaluate.search_simulations": 4,
                             "evaluate.gated_critic_search": True})
    gated = evaluate.run(cfg, critics_dir=weak, **args)
    trusted = evaluate.run(cfg, critics_dir=strong, **args)
    assert gated_only["search_critics_gate"] == gated["search_critics_gate"]
    assert "value 0.55, prm 0.55 < critics.guide_min_auroc 0.6" in gated["search_critics_gate"]
    assert gated["search_scorer"] == "likelihood" and gated["search_critic_forward_tokens"] == 0
    for k in ("search_pass1", "search_best_pass1", "search_forward_tokens", "search_stored_tokens"):
        assert gated[k] == plain[k] == gated_only[k]
    assert gated["critic_search_scorer"] == "critics" and gated["critic_search_critic_forward_tokens"] > 0
    for k, v in trusted.items():  # trusted critics decode, as before the gate; nothing reported twice
        if k.startswith("search_") and k not in ("search_wall_seconds", "search_critics_gate"):
            assert gated[f"critic_{k}"] == v, k
    assert trusted["search_critics_gate"] is None and trusted["search_scorer"] == "critics"
    assert not any(k.startswith("critic_search") for k in trusted)


def test_critic_guided_searches_run_in_lockstep_each_on_critic_views_of_its_own(world):
    """A lockstep group of critic-guided searches: each problem's critics read each inner node's tokens once
    (prompt + inner steps; gold terminals take the oracle), count their own tokens and seconds, and the loaded
    critics' own stores and counters are never touched."""
    from arbor.lm.kvcache import KVStore
    from arbor.lm.loading import load_policy
    from arbor.stages.search import CriticSet, search_group
    from arbor.tasks import build_task, read_problems

    cfg = load_config(None, {**FAST, "search.lockstep": 2})
    policy = load_policy(world / "policy", cfg)
    crit = CriticSet(world / "critics", cfg)
    problems = read_problems(world / "train.jsonl")[:2]
    out = search_group(policy, build_task(cfg.task), problems, cfg.search, [5, 6], KVStore(), crit)
    for rows, st in out:
        inner = sum(n for n, t in zip(rows["tok_len"], rows["terminal"], strict=True) if not t)
        assert st["critic_forward_tokens"] == inner > 0
        assert 0 < st["critic_seconds"] < st["model_seconds"]
    # model seconds = the group's policy seconds split evenly + the problem's own critic seconds
    policy_share = [st["model_seconds"] - st["critic_seconds"] for _, st in out]
    assert policy_share[0] > 0 and policy_share[0] == pytest.approx(policy_share[1], rel=1e-9)
    assert out[0][1]["critic_seconds"] != out[1][1]["critic_seconds"]
    assert all(len(c.store) == 0 and c.critic_forward_tokens == 0 and c.seconds == 0
               for c in crit.critics.values())
