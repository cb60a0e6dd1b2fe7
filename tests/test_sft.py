import numpy as np
import torch

from arbor.train.sft import IGNORE, SampleStream, SFTModule, collate_sft, warmup_cosine

from .conftest import tiny_model


def test_collate_masks_prompt_and_padding():
    batch = collate_sft([([1, 5, 6], [7, 2]), ([1, 5], [8, 9, 10, 2])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0], [1, 5, 8, 9, 10, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 7, 2, IGNORE], [IGNORE, IGNORE, 8, 9, 10, 2]]


def test_sft_steps_lower_loss_and_change_parameters(char_tok):
    import lightning as L
    from torch.utils.data import DataLoader

    model = tiny_model(char_tok)
    pairs = [([1, *char_tok.encode(f"Q: {i} +1\n", add_special_tokens=False)],
              [*char_tok.encode(f"{i}+1={i + 1}\nAnswer: {i + 1}\n", add_special_tokens=False), 2])
             for i in range(8)]
    batch = collate_sft(pairs, 0)
    with torch.no_grad():
        before_loss = model(**batch).loss.item()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stream = SampleStream(lambda rng: pairs[int(rng.integers(len(pairs)))], seed=0)
    loader = DataLoader(stream, batch_size=8, collate_fn=lambda xs: collate_sft(xs, 0))
    module = SFTModule(model, lr=3e-3, warmup_steps=2, max_steps=30)
    L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
    with torch.no_grad():
        after_loss = model(**batch).loss.item()
    assert after_loss < 0.7 * before_loss
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(changed) == len(before)


def test_sample_stream_is_seeded():
    draw = lambda rng: ([int(rng.integers(100))], [1])  # noqa: E731
    a = [x for _, x in zip(range(5), iter(SampleStream(draw, 3)), strict=False)]
    b = [x for _, x in zip(range(5), iter(SampleStream(draw, 3)), strict=False)]
    assert a == b


def test_warmup_cosine_shape():
    f = warmup_cosine(10, 110, floor=0.1)
    assert f(0) == 0.1 and f(9) == 1.0
    assert np.isclose(f(60), 0.55) and np.isclose(f(110), 0.1) and np.isclose(f(500), 0.1)


def _varied(rng):
    return [int(rng.integers(100))], list(range(int(rng.integers(1, 40))))


def _take(stream, n):
    return [x for _, x in zip(range(n), iter(stream), strict=False)]


def test_length_grouped_stream_regroups_the_same_draws_into_batches_of_similar_length():
    length = lambda pc: len(pc[0]) + len(pc[1])  # noqa: E731
    plain = _take(SampleStream(_varied, 5), 8 * 16)
    grouped = _take(SampleStream(_varied, 5, batch_size=8, pool=4, length=length), 8 * 16)
    for pool in range(4):  # each pool of 4 batches holds exactly the draws of the plain stream, regrouped
        span = slice(pool * 32, (pool + 1) * 32)
        assert sorted(map(str, grouped[span])) == sorted(map(str, plain[span]))
    spread = lambda xs: np.mean([np.ptp([length(s) for s in xs[i:i + 8]]) for i in range(0, len(xs), 8)])  # noqa: E731
    assert spread(grouped) < 0.4 * spread(plain)  # similar lengths within a batch: little padding
    sizes = [sum(map(length, grouped[i:i + 8])) for i in range(0, 32, 8)]
    assert sizes != sorted(sizes)  # the batches of a pool come in a shuffled order, not shortest first


def test_length_grouped_stream_resumes_at_whole_batches_and_shards_by_rank(monkeypatch):
    from arbor.train import strategy

    length = lambda pc: len(pc[1])  # noqa: E731
    full = _take(SampleStream(_varied, 9, batch_size=4, pool=3, length=length), 40)
    assert _take(SampleStream(_varied, 9, 20, batch_size=4, pool=3, length=length), 20) == full[20:]
    with np.testing.assert_raises(ValueError):
        SampleStream(_varied, 9, 6, batch_size=4, pool=3, length=length)  # not a whole batch
    one = _take(SampleStream(_varied, 9, batch_size=8, pool=3, length=length), 48)  # one process, batch 8
    ranks = []
    for r in (0, 1):
        monkeypatch.setattr(strategy, "rank_and_world", lambda r=r: (r, 2))
        ranks.append(_take(SampleStream(_varied, 9, batch_size=4, pool=3, length=length), 24))
    for b in range(6):  # global batch b of two ranks = batch b of one process with twice the batch size
        together = ranks[0][4 * b: 4 * b + 4] + ranks[1][4 * b: 4 * b + 4]
        assert sorted(map(str, together)) == sorted(map(str, one[8 * b: 8 * b + 8]))
