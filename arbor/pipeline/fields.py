"""Config field declarations and config errors, shared by every config dataclass: arbor/pipeline/config.py and
the sub-configs that live beside their code, TRL-style (arbor/critics/config.py, arbor/improve/config.py,
arbor/train/config.py).

A field is `config_field(default, help, min=/max=/gt=/choices=/pattern=/expect=/chars=)`: its default, help
text and declared range, which `arbor.pipeline.config.build` checks generically; `section(cls)` nests a
sub-config. This module imports nothing of arbor, so a sub-config can use it while arbor/pipeline/config.py
imports that sub-config (no import cycle).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


class ArborInputError(ValueError):
    """Bad user input (params, data files, model files, devices): reported as one line, exit code 2.

    The message names the file (or command-line option), the key or row, the value and what was expected.
    Anything else that escapes a stage is treated as a bug and shown with its traceback.
    """


class ConfigError(ArborInputError):
    """A params file or override is wrong; the message names the source, the key and the expectation."""


COUNT = {"min": 1}
"""The range of every count, size and budget."""


def config_field(default: Any, help: str, **check: Any) -> Any:
    """A config field: default, help text and its declared range (`min`, `max`, `gt`, `choices`, `pattern`,
    `expect` (how to describe a pattern), `chars`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **check})
    return field(default=default, metadata={"help": help, **check})


def section(cls: type) -> Any:
    """A nested sub-config (one params.yaml section), documented by the class docstring."""
    return field(default_factory=cls, metadata={"help": cls.__doc__ or ""})
