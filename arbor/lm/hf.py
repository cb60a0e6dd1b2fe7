"""HF transformers backend of the `Policy` protocol (CPU or CUDA), with batched KV-cached decoding.

Loads `AutoModelForCausalLM` from a local directory (`trust_remote_code=False`, safetensors) or a GGUF file
(`gguf_file=`, needs the `gguf` extra). Batches mix prompts of different lengths by left padding with explicit
position ids (`cumsum(mask) - 1`), which is right for GPT-2- and Llama-style models. Rows that finish early are
dropped from the batch (the KV cache is index-selected), so finished rows cost nothing further.

`expand` is the tree engine's entry point: children of a node continue from the node's cached KV
(`arbor.lm.kvcache.KVStore`), so a token already computed is never computed again (DESIGN.md, "Token
accounting"). Parents of different lengths share a batch by left-padding their caches; padded cache slots are
masked out and never computed.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from arbor.lm import lora
from arbor.lm.base import Continuation, Excluded, StopRule, TokenCounters
from arbor.lm.kvcache import KVStore
from arbor.lm.prefill import resolve
from arbor.lm.prompting import ChatFormat, step_end_ids
from arbor.lm.trie import TrieSampler, batch_bytes
from arbor.pipeline.config import ArborInputError
from arbor.pipeline.manifest import verify

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the format's own limit


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header is unreadable or whose size disagrees with the header's offsets
    (a truncated or padded download), naming the file and the sizes."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise ArborInputError(f"{path}: not a safetensors file ({size} bytes; the 8-byte header length "
                                      f"{n} is out of range); expected a complete model.safetensors")
            header = json.loads(f.read(n))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        if isinstance(e, ArborInputError):
            raise
        raise ArborInputError(f"{path}: unreadable safetensors header ({type(e).__name__}: {e}); expected a "
                              "complete model.safetensors") from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise ArborInputError(f"{path}: {size} bytes, but its header describes {expected} bytes "
                              f"({'truncated' if size < expected else 'trailing data'}); expected a complete file")


def check_model_path(path: Path) -> None:
    """Validate a local model before loading it, so that a broken one gives one clear error naming the file.

    A `.gguf` file must start with the GGUF magic; a directory needs a parseable `config.json` with a
    `model_type`, safetensors weights (`model.safetensors`, or an index whose shards all exist) with consistent
    headers, and tokenizer files.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: model not found (expected a local HF model directory or .gguf file)")
    if path.suffix == ".gguf":
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ArborInputError(f"{path}: not a GGUF file (starts with {magic!r}, expected the magic b'GGUF')")
        if importlib.util.find_spec("gguf") is None:
            raise ArborInputError(f"{path}: reading .gguf files needs the gguf package (pip install -e '.[gguf]')")
        return
    if not path.is_dir():
        raise ArborInputError(f"{path}: expected a local HF model directory (config.json, model.safetensors, "
                              "tokenizer files) or a .gguf file")
    verify(path, required=False)  # a stage-written model must match its manifest (sizes and sha256)
    if (path / lora.ADAPTER_CONFIG).is_file():  # a LoRA adapter dir: its weights, then its base model
        check_safetensors(path / lora.ADAPTER_WEIGHTS)
        check_model_path(lora.adapter_base(path))
        return
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ArborInputError(f"{path}: no config.json; expected a HF model directory") from None
    except (ValueError, OSError) as e:
        raise ArborInputError(f"{path / 'config.json'}: invalid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ArborInputError(f"{path / 'config.json'}: expected a JSON object with a 'model_type' string")
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        shards = [path / "model.safetensors"]
    elif index.is_file():
        try:
            shards = [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ArborInputError(f"{index}: expected JSON with a 'weight_map' of tensor -> file ({e})") from None
        for shard in shards:
            if not shard.is_file():
                raise ArborInputError(f"{index}: lists {shard.name}, which is missing from {path}")
    else:
        found = sorted(p.name for p in path.glob("*.bin")) or "none"
        raise ArborInputError(f"{path}: no model.safetensors or model.safetensors.index.json (other weights: "
                              f"{found}); expected safetensors weights")
    for shard in shards:
        check_safetensors(shard)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ArborInputError(f"{path}: no tokenizer files; expected one of {', '.join(_TOKENIZER_FILES)}")


def load_model_and_tokenizer(path: str | Path, device: str = "cpu",
                             dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, object]:
    """Model and tokenizer from a local HF directory, a LoRA adapter directory (its base model with the adapter
    merged in, tokenizer of the base) or a `.gguf` file; never from a hub.

    The files are checked first (`check_model_path`); what transformers still refuses is reported as an
    `ArborInputError` naming the path (the original exception is chained, shown with `--debug`).
    """
    path = Path(path)
    check_model_path(path)
    if (path / lora.ADAPTER_CONFIG).is_file():  # base model + adapter, merged (arbor/lm/lora.py)
        model, tok = load_model_and_tokenizer(lora.adapter_base(path), "cpu", dtype)
        return lora.load_adapter(path, model).to(device).eval(), tok
    kw = {"trust_remote_code": False, "local_files_only": True}
    try:
        if path.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **kw)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **kw)
        else:
            tok = AutoTokenizer.from_pretrained(path, **kw)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **kw)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ArborInputError(f"{path}: cannot load the model ({type(e).__name__}: {first})") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of `model` that `save_pretrained` accepts: GGUF-loaded models are marked quantized (their weights
    are already dequantized to torch), and transformers refuses to serialize them as such."""
    if getattr(model, "hf_quantizer", None) is None:
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


class HFPolicy:
    """`Policy` over a causal LM and its tokenizer.

    `step_end`: which tokens end a step (`arbor.lm.prompting.step_end_ids`: newline | sentence); `chat`: prompts
    go through the tokenizer's chat template (`ChatFormat`) instead of BOS + text.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: object, device: str | None = None, *,
                 step_end: str = "newline", chat: ChatFormat | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.counters = TokenCounters()
        self.eos_token_id: int = int(tokenizer.eos_token_id)  # type: ignore[attr-defined]
        self.pad_token_id: int = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
        self.step_end = step_end
        self.chat = chat
        self._newline_ids: torch.Tensor | None = None
        self._newline_set: frozenset[int] | None = None
        self.share_tokens = True  # token-trie sampling in `expand` (off: each sample computes its own tokens)
        self.kv_token_bytes = 0  # set by `_probe`
        self.num_layers = 0
        self._split_head = True

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> HFPolicy:
        model, tok = load_model_and_tokenizer(path, device)
        return cls(model, tok, device)

    # -- text ------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt: through the chat template when `chat` is set, else BOS (when the tokenizer has
        one) + `encode(text)`."""
        if self.chat is not None:
            return self.chat.encode(text)
        bos = self.tokenizer.bos_token_id  # type: ignore[attr-defined]
        return ([int(bos)] if bos is not None else []) + self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)  # type: ignore[attr-defined]

    @property
    def newline_ids(self) -> torch.Tensor:
        """Ids of every vocabulary token that ends a step: those whose text contains a newline, plus sentence
        ends when `step_end` is `sentence` (`arbor.lm.prompting.step_end_ids`)."""
        if self._newline_ids is None:
            ids = step_end_ids(self.tokenizer, self.step_end)
            self._newline_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self._newline_ids

    @property
    def newline_set(self) -> frozenset[int]:
        """`newline_ids` as a set (membership per sampled token)."""
        if self._newline_set is None:
            self._newline_set = frozenset(self.newline_ids.tolist())
        return self._newline_set

    # -- model calls -----------------------------------------------------------------------------------------
    def _count(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Count one forward over `ids` [B, T] whose full attention mask (cache + new) is `mask` [B, S >= T].

        Real query positions (mask 1) and padded ones; and, per real query, the masked KV slots it attends
        over. Padding is always on the left, so every masked slot of a row precedes all its real queries.
        """
        q = mask[:, -ids.shape[1]:]
        real_q = q.sum(1)
        real = int(real_q.sum())
        self.counters.forward_tokens += real
        self.counters.padded_positions += ids.numel() - real
        self.counters.padded_kv_positions += int((real_q * (mask == 0).sum(1)).sum())

    def _probe(self) -> None:
        """Once per policy, uncounted (two tokens): bytes of one token's KV, the layer count, and whether the
        logits are the output embedding applied to the base model's final hidden state (then the store keeps
        hidden states [E] per token; otherwise, e.g. with logit soft-capping, it keeps the logits [V])."""
        if self.kv_token_bytes:
            return
        ids = torch.tensor([[self.eos_token_id, self.eos_token_id]], device=self.device)
        with torch.inference_mode():
            full = self.model(input_ids=ids).logits.float()
            out = self.model.base_model(input_ids=ids, cache=DynamicCache(), use_cache=True)
            head = self.model.get_output_embeddings()
            self._split_head = head is not None and torch.allclose(head(out.last_hidden_state).float(), full,
                                                                   atol=1e-4, rtol=1e-4)
        layers = out.cache.layers
        self.num_layers = len(layers)
        self.kv_token_bytes = sum(x[0, :, :1].numel() * x.element_size() for layer in layers
                                  for x in (layer.keys, layer.values))

    def forward_hidden(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                       cache: DynamicCache | None) -> tuple[torch.Tensor, DynamicCache]:
        """One counted forward over `ids` [B, T] with full `mask` [B, past+T] and positions `pos` [B, T]: the final
        hidden states [B, T, E] (the logits [B, T, V] when the head cannot be split off, see `_probe`) and the
        cache."""
        self._count(ids, mask)
        cache = cache if cache is not None else DynamicCache()
        if self._split_head:
            out = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                                        use_cache=True)
            return out.last_hidden_state, out.cache
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        return out.logits.float(), out.cache

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [G, V] (float32) from what `forward_hidden` returned for the last positions [G, E]."""
        if self._split_head:
            return self.model.get_output_embeddings()(hidden).float()
        return hidden.float()

    @torch.inference_mode()
    def expand(self, parents: Sequence[tuple[Hashable, Sequence[int]]], num_samples: int | Sequence[int], *,
               stop: StopRule, temperature: float, seed: int, store: KVStore,
               exclude: Sequence[Sequence[Excluded]] | None = None,
               final: Callable[[int, str], bool] | None = None) -> list[list[Continuation]]:
        """Sample `num_samples` continuations of each parent, reusing the parents' stored KV (`arbor.lm.trie`).

        `parents` are `(key, prefix_ids)` with the content key `prefix_key(prefix_ids)`; a prefix found in
        `store` costs no forward pass, a missing one is computed from its longest stored prefix on (batched) and
        stored. Each continuation that can be continued is named `Continuation.key = prefix_key(prefix + its
        ids)` in the store. A continuation that ends its trajectory (EOS, a stop of the line rule, or
        `final(i, text)` true for a continuation of parent i) is never continued: its last token is not fed.
        With `share_tokens` (default) samples share every token prefix they have in common, with each other and
        with what the store holds, so without eviction each distinct token prefix is computed once; without it
        each sample computes its own tokens from its parent's state. `exclude[i]`: continuations of parent i
        that its samples must not repeat. Work per call is bounded by the store's budget: samples are decoded
        in batches whose KV fits `store.room()`.
        """
        counts = [num_samples] * len(parents) if isinstance(num_samples, int) else list(num_samples)
        live = [i for i, n in enumerate(counts) if n > 0]
        if not live:
            return [[] for _ in parents]
        self._probe()
        sampler = TrieSampler(self, store, [p for _, p in parents], stop=stop, temperature=temperature,
                              generator=torch.Generator(device=self.device).manual_seed(int(seed)), capture=True,
                              exclude=exclude, final=final, share=self.share_tokens)
        room = store.room()
        width = max(len(parents[i][1]) for i in live) + stop.max_new_tokens
        cap = sum(counts) if room is None else max(1, room // batch_bytes(1, width, self.kv_token_bytes,
                                                                          self.num_layers))
        jobs = [(i, min(cap, counts[i] - s)) for i in live for s in range(0, counts[i], cap)]
        while jobs:  # one call per batch that fits: its parents are resolved (and pinned) only while it runs
            n = next((j for j in range(1, len(jobs)) if sum(k for _, k in jobs[: j + 1]) > cap), len(jobs))
            call, jobs = jobs[:n], jobs[n:]
            anchors = resolve(self, store, [parents[i] for i, _ in call])
            try:
                sampler.run([(i, a, k) for (i, k), a in zip(call, anchors, strict=True)])
            finally:
                for a in anchors:
                    store.unpin(a)
        return sampler.out

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids [B, T], attention mask [B, T] and position ids [B, T] (0 at each first real token)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if len(s) == 0:
                raise ValueError("cannot continue an empty prompt: give at least one token (e.g. BOS)")
            ids[i, width - len(s):] = torch.as_tensor(list(s))
            mask[i, width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    @torch.inference_mode()
    def sample(self, prompts: Sequence[Sequence[int]], *, stop: StopRule, temperature: float, seed: int,
               batch_size: int = 64) -> list[Continuation]:
        """See `Policy.sample`. Prompts are processed in chunks of `batch_size` (prefill + decode each); every
        row computes its own prompt and tokens (no store)."""
        self._probe()
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        out: list[Continuation] = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            ids, mask, pos = self._left_pad(chunk)
            h, cache = self.forward_hidden(ids, mask, pos, None)
            sampler = TrieSampler(self, None, chunk, stop=stop, temperature=temperature, generator=gen,
                                  capture=False, share=False)
            sampler.from_prefill(h[:, -1], cache, mask, pos[:, -1] + 1)
            out += [c for cs in sampler.out for c in cs]
        return out

    @torch.inference_mode()
    def score(self, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
              batch_size: int = 64) -> list[np.ndarray]:
        """See `Policy.score`."""
        out: list[np.ndarray] = []
        for i in range(0, len(prefixes), batch_size):
            pre, cont = prefixes[i : i + batch_size], continuations[i : i + batch_size]
            ids, mask, pos = self._left_pad([list(p) + list(c) for p, c in zip(pre, cont, strict=True)])
            self._count(ids, mask)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            logp = torch.log_softmax(logits.float(), -1)
            width = ids.shape[1]
            for j, c in enumerate(cont):
                n = len(c)
                if n == 0:
                    out.append(np.zeros(0, dtype=np.float32))
                    continue
                # token at position t is predicted by logits at t-1; continuation occupies the last n positions
                pred = logp[j, width - n - 1 : width - 1]
                out.append(pred.gather(1, ids[j, width - n :, None]).squeeze(1).cpu().numpy())
        return out
