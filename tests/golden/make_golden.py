"""Regenerate the golden trees from the pure-Python reference: `python -m tests.golden.make_golden`."""

import json
from pathlib import Path

import numpy as np

from tests.treeops import random_program, run_python

if __name__ == "__main__":
    for i, steps in enumerate([5, 25, 60]):
        prog = random_program(np.random.default_rng(1000 + i), steps)
        out = Path(__file__).parent / f"tree_{i}.json"
        out.write_text(json.dumps({"program": prog, "expected": run_python(prog)}, indent=None) + "\n")
        print(out)
