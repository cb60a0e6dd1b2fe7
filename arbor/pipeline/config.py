"""Configuration: dataclasses with help text, validated in `__post_init__`, loaded from params.yaml.

`params.yaml` has one section per stage plus shared sections (`task`, `model`, `tracking`) and one root `seed`.
Every field carries `metadata={"help": ...}`; `add_arguments` turns the whole tree into `--section.key` options
so that `arbor <stage> --help` documents every option and the command line overrides the YAML (TRL-style:
YAML first, command line after). Unknown keys and ill-typed values raise a `ConfigError` naming the file, the
key and what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params file or override is wrong; the message names the source, the key and the expectation."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _sub(cls: type) -> Any:
    return field(default_factory=cls, metadata={"help": cls.__doc__ or ""})


@dataclass
class TrackingConfig:
    """Experiment tracking (MLflow with a SQLite store)."""

    enabled: bool = _f(True, "Log params, metrics and artifacts to MLflow.")
    uri: str | None = _f(None, "Tracking URI; default sqlite:///<cwd>/mlflow.db. MLFLOW_TRACKING_URI wins.")
    experiment: str = _f("arbor", "MLflow experiment name.")


@dataclass
class TaskConfig:
    """The reasoning task: problems, step format and answer checker."""

    name: str = _f("synthetic", "Task: synthetic | gsm8k | reasoning_gym.")
    min_ops: int = _f(2, "synthetic: fewest operations per problem.")
    max_ops: int = _f(6, "synthetic: most operations per problem.")
    operand_max: int = _f(9, "synthetic: operands are drawn from 1..operand_max.")
    value_max: int = _f(99, "synthetic: every intermediate value stays within [0, value_max].")
    operators: str = _f("+-*", "synthetic: operators to draw from (subset of '+-*').")
    train_file: str | None = _f(None, "gsm8k: local jsonl/parquet with `question` and `answer` (`... #### N`).")
    eval_file: str | None = _f(None, "gsm8k: local eval file; if unset, eval rows are split off train_file.")
    rg_dataset: str = _f("chain_sum", "reasoning_gym: dataset name (e.g. chain_sum, basic_arithmetic).")
    rg_config: dict = _f({}, "reasoning_gym: extra keyword arguments for reasoning_gym.create_dataset.")

    def __post_init__(self) -> None:
        if self.name not in ("synthetic", "gsm8k", "reasoning_gym"):
            raise ConfigError(f"task.name={self.name!r}: expected one of synthetic, gsm8k, reasoning_gym")
        if not 1 <= self.min_ops <= self.max_ops:
            raise ConfigError(f"task.min_ops={self.min_ops}, task.max_ops={self.max_ops}: need 1 <= min <= max")
        if self.operand_max < 1 or self.value_max < self.operand_max:
            raise ConfigError("task.operand_max must be >= 1 and task.value_max >= task.operand_max")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ConfigError(f"task.operators={self.operators!r}: expected a non-empty subset of '+-*'")
        if self.name == "gsm8k" and not self.train_file:
            raise ConfigError("task.name=gsm8k needs task.train_file (a local jsonl or parquet file)")


@dataclass
class PrepareConfig:
    """Stage `prepare`: build the train and eval splits."""

    n_train: int = _f(4000, "Number of training problems.")
    n_eval: int = _f(200, "Number of evaluation problems.")

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_eval < 1:
            raise ConfigError(f"prepare.n_train={self.n_train}, n_eval={self.n_eval}: both must be >= 1")


@dataclass
class ModelConfig:
    """The tiny policy trained from scratch (ignored when bootstrap.from is set)."""

    arch: str = _f("llama", "Architecture: llama | gpt2.")
    hidden_size: int = _f(128, "Width of the residual stream.")
    num_layers: int = _f(4, "Transformer blocks.")
    num_heads: int = _f(4, "Attention heads.")
    intermediate_size: int = _f(344, "MLP width (llama).")
    max_positions: int = _f(256, "Longest sequence (prompt + solution) in tokens.")

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gpt2"):
            raise ConfigError(f"model.arch={self.arch!r}: expected llama or gpt2")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")


@dataclass
class BootstrapConfig:
    """Stage `bootstrap`: the iteration-0 policy."""

    from_: str | None = _f(None, "Local HF model dir or .gguf file to start from instead of training.")
    error_rate: float = _f(0.1, "Fraction of solution steps that carry a random slip (result off by 1, 2, 10).")
    misconception_rate: float = _f(0.7, "synthetic: fraction of borrow subtractions done without borrowing "
                                        "(42-7=45); above 0.5 greedy decoding repeats the error.")
    max_steps: int = _f(800, "Optimizer steps of SFT from scratch.")
    batch_size: int = _f(64, "Sequences per batch.")
    lr: float = _f(3e-3, "Peak learning rate (AdamW, linear warm-up then cosine decay).")
    warmup_steps: int = _f(100, "Warm-up steps.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")

    def __post_init__(self) -> None:
        for name in ("error_rate", "misconception_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"bootstrap.{name}={getattr(self, name)}: expected a value in [0, 1]")
        if self.max_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("bootstrap.max_steps and batch_size must be >= 1 and lr > 0")


@dataclass
class EvaluateConfig:
    """Stage `evaluate`: greedy pass@1, pass@k and majority@k on the eval split."""

    k: int = _f(16, "Samples per problem for pass@k and maj@k.")
    temperature: float = _f(1.0, "Sampling temperature for the k samples.")
    max_new_tokens: int = _f(96, "Longest generated solution, in tokens.")
    batch_size: int = _f(128, "Sequences per generation batch.")
    n_problems: int | None = _f(None, "Evaluate only the first n eval problems (default: all).")
    search: bool = _f(False, "Also decode each eval problem with eta-MCTS (likelihood scorer, no oracle).")
    search_simulations: int = _f(32, "eta-MCTS simulations per eval problem when evaluate.search is on.")

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0 or self.max_new_tokens < 1:
            raise ConfigError("evaluate.k and max_new_tokens must be >= 1 and temperature > 0")


@dataclass
class EtaMCTSConfig:
    """eta-MCTS hyperparameters (AlphaLLM §4.3-4.4; defaults sized for the tiny policy on 2 CPU cores)."""

    num_simulations: int = _f(64, "Selected leaves to expand, in total.")
    max_forward_tokens: int | None = _f(None, "Stop once this many tokens were computed.")
    batch_leaves: int = _f(4, "Leaves selected per step (virtual loss), one model call.")
    rule: str = _f("puct", "Selection rule: uct | puct (prior = the step's probability under the policy).")
    c: float = _f(2.0, "Exploration constant (PUCT; 2.0 measured best on the tiny default, see README).")
    alpha: float = _f(4.0, "Adaptive branching: n(s) grows with alpha * I(s).")
    c_min: int = _f(2, "Fewest children of a node (t > 0).")
    c_max: int = _f(4, "Most children of a node (t > 0).")
    c_max_root: int = _f(6, "Most children of the root (paper: 60).")
    max_attempts: int = _f(2, "Expansions of one node after which merged (repeated) samples stop its widening.")
    widen_cap: int = _f(16, "Most expansions of one node when an exhausted tree is reopened (progressive widening).")
    sample_without_replacement: bool = _f(True, "Widen a node with steps that differ from its children "
                                                "(exact conditional sampling; no repeated samples).")
    merge_distance: int = _f(0, "State merge: edit distance (tokens); -1 = off.")
    step_tokens: int = _f(32, "Longest step, in tokens.")
    max_depth: int = _f(12, "Steps after which a path is cut (terminal).")
    temperature: float = _f(1.0, "Sampling temperature of expansions.")

    def __post_init__(self) -> None:
        if self.rule not in ("uct", "puct"):
            raise ConfigError(f"search.eta.rule={self.rule!r}: expected uct or puct")
        if not 1 <= self.c_min <= self.c_max or self.c_max_root < self.c_min:
            raise ConfigError("search.eta: need 1 <= c_min <= c_max and c_max_root >= c_min")


@dataclass
class SearchConfig:
    """Stage `search`: tree search over the train split with the iteration's policy."""

    algorithm: str = _f("eta_mcts", "eta_mcts | tree_grpo | chains.")
    n_problems: int | None = _f(64, "Search the first n train problems (default 64; null = all).")
    n_rollouts: int = _f(0, "eta_mcts: fast rollouts per new non-terminal node (0 = none: inner nodes 0.5).")
    rollout_tokens: int = _f(96, "Longest fast rollout, in tokens.")
    grpo_m: int = _f(4, "tree_grpo: trees per prompt (M).")
    grpo_l: int = _f(2, "tree_grpo: expansion rounds (L).")
    grpo_n: int = _f(2, "tree_grpo: nodes expanded per tree per round (N).")
    chains: int = _f(16, "chains: independent samples per prompt (G).")
    kv_budget_mb: float = _f(512.0, "Prefix KV-cache memory budget (MB, LRU eviction).")
    shard_size: int = _f(16, "Problems per parquet shard (the unit of resume).")
    eta: EtaMCTSConfig = _sub(EtaMCTSConfig)

    def __post_init__(self) -> None:
        if self.algorithm not in ("eta_mcts", "tree_grpo", "chains"):
            raise ConfigError(f"search.algorithm={self.algorithm!r}: expected eta_mcts, tree_grpo or chains")
        if min(self.grpo_m, self.grpo_l + 1, self.grpo_n, self.chains, self.shard_size) < 1:
            raise ConfigError("search.grpo_m, grpo_n, chains, shard_size must be >= 1 and grpo_l >= 0")


@dataclass
class ArborConfig:
    """All parameters of one pipeline run (the contents of params.yaml)."""

    seed: int = _f(1234, "Root seed; every stage derives its own from it.")
    device: str = _f("cpu", "Torch device for models: cpu, cuda, cuda:1, ...")
    tracking: TrackingConfig = _sub(TrackingConfig)
    task: TaskConfig = _sub(TaskConfig)
    prepare: PrepareConfig = _sub(PrepareConfig)
    model: ModelConfig = _sub(ModelConfig)
    bootstrap: BootstrapConfig = _sub(BootstrapConfig)
    evaluate: EvaluateConfig = _sub(EvaluateConfig)
    search: SearchConfig = _sub(SearchConfig)


# ---------------------------------------------------------------------------------------------------------------
# loading

def _yaml_key(name: str) -> str:
    return name.rstrip("_")  # `from_` is spelled `from` in YAML and on the command line


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to type `tp` (bool, int, float, str, dict, Optional of those)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
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
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def build(cls: type, data: dict[str, Any] | None, source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, naming `source` and the dotted key in every error."""
    data = dict(data or {})
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = _yaml_key(f.name)
        if key not in data:
            continue
        value = data.pop(key)
        where = f"{source}: {prefix}{key}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
            kwargs[f.name] = build(tp, value, source, f"{prefix}{key}.")
        else:
            kwargs[f.name] = _coerce(value, tp, where)
    if data:
        known = ", ".join(_yaml_key(f.name) for f in dataclasses.fields(cls))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(prefix + k for k in data)}; known: {known}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_params(path: str | Path | None) -> dict[str, Any]:
    """Read params.yaml into a dict; a missing or malformed file raises an error naming it."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `data["a"]["b"] = value` for `dotted = "a.b"`."""
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> ArborConfig:
    """params.yaml (if any) plus dotted-key overrides → validated `ArborConfig`."""
    data = load_params(path)
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    return build(ArborConfig, data, str(path) if path else "<defaults>")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config, with YAML key names."""
    return {_yaml_key(f.name): (to_dict(v) if dataclasses.is_dataclass(v := getattr(cfg, f.name)) else v)
            for f in dataclasses.fields(cfg)}


# ---------------------------------------------------------------------------------------------------------------
# command line

def add_arguments(parser: argparse.ArgumentParser, cls: type = ArborConfig, prefix: str = "") -> None:
    """Add `--section.key` options for every field of `cls` (recursively), defaulting to "not given"."""
    hints = _hints(cls)
    group = parser.add_argument_group(prefix.rstrip(".") or "general", (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + _yaml_key(f.name)
        if dataclasses.is_dataclass(tp):
            add_arguments(parser, tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        group.add_argument(f"--{key}", dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=f"{f.metadata.get('help', '')} (default: {default!r})")


def overrides_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The dotted-key overrides that were given on the command line."""
    return {k[4:]: v for k, v in vars(ns).items() if k.startswith("cfg:")}
