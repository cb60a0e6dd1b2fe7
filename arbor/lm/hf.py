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

from arbor.lm.base import Continuation, Excluded, StopRule, TokenCounters
from arbor.lm.kvcache import KVStore, PrefixState, prefix_key
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
    """Model and tokenizer from a local HF directory or a `.gguf` file; never from a hub.

    The files are checked first (`check_model_path`); what transformers still refuses is reported as an
    `ArborInputError` naming the path (the original exception is chained, shown with `--debug`).
    """
    path = Path(path)
    check_model_path(path)
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
    """`Policy` over a causal LM and its tokenizer."""

    def __init__(self, model: PreTrainedModel, tokenizer: object, device: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.counters = TokenCounters()
        self.eos_token_id: int = int(tokenizer.eos_token_id)  # type: ignore[attr-defined]
        self.pad_token_id: int = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
        self._newline_ids: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> HFPolicy:
        model, tok = load_model_and_tokenizer(path, device)
        return cls(model, tok, device)

    # -- text ------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt: BOS (when the tokenizer has one) + `encode(text)`."""
        bos = self.tokenizer.bos_token_id  # type: ignore[attr-defined]
        return ([int(bos)] if bos is not None else []) + self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)  # type: ignore[attr-defined]

    @property
    def newline_ids(self) -> torch.Tensor:
        """Ids of every vocabulary token whose text contains a newline (the step terminator)."""
        if self._newline_ids is None:
            vocab = self.tokenizer.get_vocab()  # type: ignore[attr-defined]
            ids = [i for i in sorted(vocab.values()) if "\n" in self.tokenizer.decode([i])]  # type: ignore[attr-defined]
            self._newline_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self._newline_ids

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

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 cache: DynamicCache | None) -> tuple[torch.Tensor, DynamicCache]:
        """One forward over `ids` [B, T] with full `mask` [B, past+T]; returns last logits [B, V] and cache."""
        self._count(ids, mask)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         cache=cache if cache is not None else DynamicCache(), use_cache=True)
        return out.logits[:, -1, :].float(), out.cache

    @torch.inference_mode()
    def decode_loop(self, logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor,
                    *, stop: StopRule, temperature: float, generator: torch.Generator | None,
                    capture: bool = False, exclude: Sequence[Sequence[Excluded]] | None = None,
                    final: Callable[[int, str], bool] | None = None) -> list[Continuation]:
        """Sample from `logits` [B, V] onward, feeding each sampled token back through the cached model.

        `mask` [B, S] is the attention mask of what `cache` holds; `next_pos` [B] the position of the next token.
        Rows stop at EOS, at a newline token if `stop.at_newline`, by the line rule of `stop` (see `StopRule`),
        or after `stop.max_new_tokens`. Finished rows leave the batch (the cache is index-selected), so they
        cost nothing further; a row's last sampled token is never fed.

        With `capture`, a row that ends on a newline or the length limit has its last token fed too, and its
        `PrefixState` (KV of prefix + continuation, next-token logits) is returned in `Continuation.state`,
        ready for expanding its children. A row ending in EOS is terminal and gets no state (EOS is not fed);
        so does a row r whose text `final(r, text)` says ends its trajectory (nothing will continue it).

        `exclude[r]` lists continuations row r must not repeat, each as (token ids, their log-probs under this
        policy). Sampling is then from pi(. | prefix, continuation not in exclude), exactly at temperature 1:
        where the generated prefix runs along an excluded continuation c, the token c[i] is down-weighted by
        1 - P(rest of c | prefix + c[i]) (summed over the excluded continuations through it), so completing c
        has probability 0 and everything else keeps its relative weight. Recorded log-probs stay the policy's.
        """
        b = logits.shape[0]
        tokens: list[list[int]] = [[] for _ in range(b)]
        lps: list[list[float]] = [[] for _ in range(b)]
        finish = ["length"] * b
        states: list[PrefixState | None] = [None] * b
        line_start, lines = [0] * b, [0] * b  # for the line rule of `stop`
        last = stop.max_new_tokens - 1
        rows = torch.arange(b, device=self.device)  # original row index of each live batch row
        for step in range(stop.max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)
            scores = logits if temperature <= 0 else logits / temperature
            if exclude is not None:
                scores = scores + self._exclusion_bias(rows.tolist(), tokens, exclude, logits.shape)
            if temperature <= 0:
                nxt = scores.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(-1)
            chosen = logp.gather(1, nxt[:, None]).squeeze(1)
            newline = torch.isin(nxt, self.newline_ids).tolist()
            ended: list[bool] = []  # row done, nothing fed (EOS, a stop, a final continuation)
            closing: list[bool] = []  # row done, its last token fed and its state captured
            for r, t, lp, nl in zip(rows.tolist(), nxt.tolist(), chosen.tolist(), newline, strict=True):
                tokens[r].append(t)
                lps[r].append(lp)
                if t == self.eos_token_id:
                    finish[r] = "eos"
                elif stop.by_lines and (nl or len(tokens[r]) - line_start[r] == stop.line_tokens):
                    lines[r] += 1
                    line = self.decode(tokens[r][line_start[r]:])
                    line_start[r] = len(tokens[r])
                    if (stop.final_line is not None and stop.final_line(line)) or lines[r] == stop.max_lines:
                        finish[r] = "stop"
                elif stop.at_newline and nl and step < last:
                    finish[r] = "newline"
                done = finish[r] != "length" or step == last
                fin = finish[r] in ("eos", "stop") or (done and (not capture or (
                    final is not None and final(r, self.decode(tokens[r])))))
                ended.append(fin)
                closing.append(done and not fin)
            drop = torch.tensor(ended, device=self.device)
            if bool(drop.all()):
                break
            if bool(drop.any()):
                keep = (~drop).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, nxt, mask, next_pos = rows[keep], nxt[keep], mask[keep], next_pos[keep]
                closing = [c for c, d in zip(closing, ended, strict=True) if not d]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits, cache = self._forward(nxt[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
            if any(closing):
                for j in (j for j, c in enumerate(closing) if c):
                    states[int(rows[j])] = self._row_state(cache, mask, logits, j)
                keep = torch.tensor([j for j, c in enumerate(closing) if not c], dtype=torch.long,
                                    device=self.device)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                rows, mask, next_pos, logits = rows[keep], mask[keep], next_pos[keep], logits[keep]
        return [Continuation(t, np.asarray(lp, dtype=np.float32), f, self.decode(t), state=st)
                for t, lp, f, st in zip(tokens, lps, finish, states, strict=True)]

    def _exclusion_bias(self, rows: list[int], tokens: list[list[int]], exclude: Sequence[Sequence[Excluded]],
                        shape: torch.Size) -> torch.Tensor:
        """[B, V] log-multipliers that remove the excluded continuations' mass (see `decode_loop`)."""
        bias = torch.zeros(shape, device=self.device)
        for j, r in enumerate(rows):
            gen, i = tokens[r], len(tokens[r])
            mass: dict[int, float] = {}
            for ids, lps in exclude[r]:
                if len(ids) > i and list(ids[:i]) == gen:
                    mass[ids[i]] = mass.get(ids[i], 0.0) + float(np.exp(np.sum(lps[i + 1 :])))
            for t, m in mass.items():
                bias[j, t] = float(np.log(max(1e-9, 1.0 - m)))
        return bias

    @staticmethod
    def _row_state(cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor, j: int) -> PrefixState:
        """Copy row `j`'s real (non-padding, hence rightmost) KV positions out of a batch cache."""
        length = int(mask[j].sum())
        kv = [(layer.keys[j, :, -length:, :].clone(), layer.values[j, :, -length:, :].clone())
              for layer in cache.layers]
        return PrefixState(kv, logits[j].clone(), length)

    @torch.inference_mode()
    def prefill_states(self, prefixes: Sequence[Sequence[int]]) -> list[PrefixState]:
        """Compute `PrefixState`s of whole prefixes in one left-padded batch (a cache miss pays this)."""
        ids, mask, pos = self._left_pad(prefixes)
        logits, cache = self._forward(ids, mask, pos, None)
        return [self._row_state(cache, mask, logits, j) for j in range(len(prefixes))]

    def _batch_from_states(self, states: Sequence[PrefixState], repeats: Sequence[int],
                           ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """Left-pad parent states to one batch cache, each parent repeated `repeats[i]` times.

        Returns first-token logits [R, V], the cache, its attention mask [R, S] and next positions [R].
        """
        width = max(st.length for st in states)
        idx = torch.repeat_interleave(torch.arange(len(states)), torch.as_tensor(list(repeats))).to(self.device)
        layers = []
        for li in range(len(states[0].kv)):
            k0 = states[0].kv[li][0]
            keys = k0.new_zeros((len(states), k0.shape[0], width, k0.shape[2]))
            values = torch.zeros_like(keys)
            for i, st in enumerate(states):
                keys[i, :, width - st.length :] = st.kv[li][0]
                values[i, :, width - st.length :] = st.kv[li][1]
            layers.append((keys.index_select(0, idx), values.index_select(0, idx)))
        mask = torch.zeros((len(states), width), dtype=torch.long, device=self.device)
        for i, st in enumerate(states):
            mask[i, width - st.length :] = 1
        lengths = torch.as_tensor([st.length for st in states], device=self.device)
        logits = torch.stack([st.logits for st in states]).index_select(0, idx)
        return logits, DynamicCache(ddp_cache_data=layers), mask.index_select(0, idx), lengths.index_select(0, idx)

    @torch.inference_mode()
    def expand(self, parents: Sequence[tuple[Hashable, Sequence[int]]], num_samples: int | Sequence[int], *,
               stop: StopRule, temperature: float, seed: int, store: KVStore,
               exclude: Sequence[Sequence[Excluded]] | None = None,
               final: Callable[[int, str], bool] | None = None) -> list[list[Continuation]]:
        """Sample `num_samples` continuations of each parent, reusing the parents' cached KV.

        `parents` are `(key, prefix_ids)` with the content key `prefix_key(prefix_ids)`; a key found in `store`
        costs no forward pass, a missing one is recomputed from `prefix_ids` (batched) and stored. Each
        continuation that can be continued is stored under `Continuation.key = prefix_key(prefix + its ids)`,
        so equal token prefixes share one state. Only new tokens are computed: with no eviction, forward
        tokens = prompt + every generated token except the last one of a continuation that ends its
        trajectory (EOS, a stop of the line rule, or `final(i, text)` true for a continuation of parent i):
        such a continuation is never continued, so its last token is not fed and no state is kept for it.
        `exclude[i]`: continuations of parent i that its samples must not repeat (see `decode_loop`).
        """
        counts = [num_samples] * len(parents) if isinstance(num_samples, int) else list(num_samples)
        states: list[PrefixState | None] = [store.get(key) for key, _ in parents]
        missing = [i for i, st in enumerate(states) if st is None]
        self.counters.cache_hits += len(parents) - len(missing)
        self.counters.cache_misses += len(missing)
        if missing:
            for i, st in zip(missing, self.prefill_states([parents[i][1] for i in missing]), strict=True):
                states[i] = st
                store.put(parents[i][0], st)
        live = [i for i, n in enumerate(counts) if n > 0]
        out: list[list[Continuation]] = [[] for _ in parents]
        if not live:
            return out
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        logits, cache, mask, next_pos = self._batch_from_states([states[i] for i in live],  # type: ignore[misc]
                                                                [counts[i] for i in live])
        row_parent = [i for i in live for _ in range(counts[i])]
        row_exclude = None if exclude is None else [exclude[i] for i in row_parent]
        row_final = None if final is None else (lambda r, text: final(row_parent[r], text))
        conts = self.decode_loop(logits, cache, mask, next_pos, stop=stop, temperature=temperature,
                                 generator=gen, capture=True, exclude=row_exclude, final=row_final)
        for i, c in zip(row_parent, conts, strict=True):
            if c.state is not None:
                c.key = prefix_key([*parents[i][1], *c.token_ids])
                store.put(c.key, c.state)
                c.state = None
            out[i].append(c)
        return out

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
        """See `Policy.sample`. Prompts are processed in chunks of `batch_size` (prefill + decode each)."""
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        out: list[Continuation] = []
        for i in range(0, len(prompts), batch_size):
            ids, mask, pos = self._left_pad(prompts[i : i + batch_size])
            logits, cache = self._forward(ids, mask, pos, None)
            out += self.decode_loop(logits, cache, mask, pos[:, -1] + 1, stop=stop, temperature=temperature,
                                    generator=gen)
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
