"""From search trees to training data: step-level preference pairs from sibling subtrees (`prefs`) and the
Tree-GRPO view of every root-to-terminal trajectory with its intra-/inter-tree advantage (`advantages`).
`PrefsConfig` (`config`) is the `prefs:` section of params.yaml; the stage is arbor/stages/prefs.py."""
