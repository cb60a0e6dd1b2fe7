"""Seed derivation: one root seed in params, every stage and sub-step derives its own.

`derive_seed(root, "bootstrap")` is a stable 31-bit integer (blake2b of the root and the names), so adding a
stage never shifts another stage's randomness, unlike drawing stage seeds from one RNG in sequence.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(root: int, *names: object) -> int:
    """Seed for the sub-computation named by `names` under `root`.

    >>> derive_seed(0, "prepare") == derive_seed(0, "prepare")
    True
    >>> derive_seed(0, "prepare") != derive_seed(0, "bootstrap")
    True
    """
    key = "/".join([str(int(root)), *(str(n) for n in names)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global RNGs (for libraries that draw from them, e.g. Lightning)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
