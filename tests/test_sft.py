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
