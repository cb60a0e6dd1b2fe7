"""Character-level tokenizer for the tiny default policy, as a standard `PreTrainedTokenizerFast`.

Every printable ASCII character and newline is one token, so a step boundary (newline) is one token and the
tiny model is an ordinary `save_pretrained` directory that any HF code can load. Specials: <pad>=0, <bos>=1,
<eos>=2, <unk>=3.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character tokenizer (vocabulary: 4 specials + newline + 95 printable ASCII = 100 tokens)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
