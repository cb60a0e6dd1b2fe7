"""Prompt formats and step-end rules of a pretrained policy.

- `ChatFormat`: an instruct model is prompted through its tokenizer's own chat template: the task prompt is the
  user turn, then the assistant generation prompt (`apply_chat_template(..., add_generation_prompt=True)`); the
  model ends its answer with its end-of-turn token, which is its EOS. Nothing of the template is hard-coded here.
- `step_end_ids`: the vocabulary tokens that end a reasoning step (an option, AlphaLLM §4.2): `newline` (every
  token whose text holds a newline; the default) or `sentence` (those, plus every token whose text ends a
  sentence: `.`, `!` or `?`, optionally followed by closing quotes/brackets and spaces). The rule is decided per
  token, without look-ahead, so with `sentence` a decimal point (`2.5` is `2`, `.`, `5` in SmolLM2's
  vocabulary) also ends a step; the split text is still one solution (steps are concatenated), but a step such
  as `Answer: 2.` is then terminal. Use `sentence` for prose-style tasks with integer answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from arbor.pipeline.config import ArborInputError

STEP_ENDS = ("newline", "sentence")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*[ \t]*$")


def ends_step(text: str, rule: str) -> bool:
    """Whether a token whose decoded text is `text` ends a step under `rule` (see module docstring).

    >>> [ends_step(t, "newline") for t in ("\\n", ".\\n", ".", " 12")]
    [True, True, False, False]
    >>> [ends_step(t, "sentence") for t in ("\\n", ".", "?)", ". ", " 12", ".5", "...")]
    [True, True, True, True, False, False, True]
    """
    if rule not in STEP_ENDS:
        raise ValueError(f"step end rule {rule!r}: expected one of {', '.join(STEP_ENDS)}")
    if "\n" in text:
        return True
    return rule == "sentence" and bool(text.strip()) and _SENTENCE_END.search(text) is not None


def step_end_ids(tokenizer: Any, rule: str = "newline") -> list[int]:
    """Ids of every vocabulary token that ends a step under `rule`, sorted; special tokens never do."""
    special = set(getattr(tokenizer, "all_special_ids", ()))
    ids = sorted(set(tokenizer.get_vocab().values()) - special)
    return [i for i in ids if ends_step(tokenizer.decode([i]), rule)]


@dataclass(frozen=True)
class ChatFormat:
    """Prompts through `tokenizer`'s chat template: [system turn], the task prompt as the user turn, then the
    assistant generation prompt. `system_prompt` None keeps the template's default system turn."""

    tokenizer: Any
    system_prompt: str | None = None
    source: str = "the tokenizer"

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ArborInputError(f"policy.chat_template=true, but {self.source} has no chat template; set "
                                  "policy.chat_template: false (plain prompts) or use an instruct model")

    def messages(self, user: str) -> list[dict[str, str]]:
        """The conversation of one prompt."""
        head = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return [*head, {"role": "user", "content": user}]

    def text(self, user: str) -> str:
        """The rendered prompt text, ending with the assistant generation prompt."""
        return self.tokenizer.apply_chat_template(self.messages(user), tokenize=False, add_generation_prompt=True)

    def encode(self, user: str) -> list[int]:
        """Token ids of the rendered prompt; the template's own special tokens (BOS, turn markers) included,
        none added."""
        return list(self.tokenizer.encode(self.text(user), add_special_tokens=False))

