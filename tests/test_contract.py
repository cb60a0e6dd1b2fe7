"""The HF transformers backend passes the backend contract (tests/contract.py), on both tiny architectures (GPT-2
with the slow tests: the suite takes ~15 s of CPU per architecture)."""

from __future__ import annotations

import pytest

from arbor.lm.hf import HFPolicy
from arbor.lm.kvcache import KVStore

from .conftest import tiny_model
from .contract import Backend, PolicyContract


class TestHFBackendContract(PolicyContract):
    @pytest.fixture(scope="class", params=["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
    def backend(self, request: pytest.FixtureRequest, char_tok) -> Backend:
        model = tiny_model(char_tok, request.param, seed=7)
        return Backend(make=lambda: HFPolicy(model, char_tok), store=KVStore, evict=KVStore.clear)
