"""The policy boundary: the `Policy` protocol, the HF transformers backend with prefix-cached expansion, the KV
store, the character tokenizer and the tiny default model."""

from arbor.lm.base import Continuation, Policy, StopRule, TokenCounters
from arbor.lm.kvcache import KVStore, PrefixState

__all__ = ["Continuation", "KVStore", "Policy", "PrefixState", "StopRule", "TokenCounters"]
