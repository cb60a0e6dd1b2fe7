"""arbor: Monte Carlo tree search over an LLM's own reasoning steps, and self-improvement from what it finds."""

__version__ = "0.1.0"
