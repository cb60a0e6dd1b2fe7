"""Reasoning tasks: problems with verifiable answers, prompt format, reward. See `build_task`, `make_splits`."""

from __future__ import annotations

from arbor.pipeline.config import ArborInputError, TaskConfig
from arbor.tasks.answers import answers_match, extract_answer, is_terminal_step, parse_number
from arbor.tasks.base import Problem, Task, is_solved, read_problems


def build_task(cfg: TaskConfig) -> Task:
    """The task named by `cfg.name`, prompting with `cfg.prompt_template`."""
    task: Task
    if cfg.name == "synthetic":
        from arbor.tasks.synthetic import SyntheticArithmetic

        task = SyntheticArithmetic(min_ops=cfg.min_ops, max_ops=cfg.max_ops, operand_max=cfg.operand_max,
                                   value_max=cfg.value_max, operators=cfg.operators)
    elif cfg.name == "gsm8k":
        from arbor.tasks.gsm8k import GSM8KTask

        task = GSM8KTask()
    else:
        from arbor.tasks.reasoning_gym import ReasoningGymTask

        task = ReasoningGymTask(cfg.rg_dataset, cfg.rg_config)
    task.prompt_template = cfg.prompt_template  # type: ignore[attr-defined]
    task.answer_rule = cfg.answer_rule  # type: ignore[attr-defined]
    return task


def make_splits(cfg: TaskConfig, n_train: int, n_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Train and eval problems for the configured task, deterministic in `seed`.

    synthetic and reasoning_gym generate `n_train`/`n_eval` problems (eval never repeats a train question);
    gsm8k reads local files, taking at most `n_train`/`n_eval` rows.
    """
    from arbor.pipeline.seeds import derive_seed

    task = build_task(cfg)
    if cfg.name == "synthetic":
        train = task.problems(n_train, derive_seed(seed, "train"), "train")  # type: ignore[attr-defined]
        evals = task.problems(n_eval, derive_seed(seed, "eval"), "eval",  # type: ignore[attr-defined]
                              exclude={p.question for p in train})
        return train, evals
    if cfg.name == "gsm8k":
        from arbor.tasks.gsm8k import load_gsm8k_file

        assert cfg.train_file is not None
        train = load_gsm8k_file(cfg.train_file, "train")
        if cfg.eval_file:
            evals = load_gsm8k_file(cfg.eval_file, "eval")
        else:
            if len(train) <= n_eval:
                raise ArborInputError(
                    f"{cfg.train_file}: {len(train)} rows, but prepare.n_eval={n_eval} of them are split off for "
                    "evaluation, leaving no training problems; expected more than n_eval rows (or lower "
                    "prepare.n_eval, or set task.eval_file)")
            evals, train = train[:n_eval], train[n_eval:]
        return train[:n_train], evals[:n_eval]
    train = task.problems(n_train, derive_seed(seed, "train"), "train")  # type: ignore[attr-defined]
    seen = {p.question for p in train}
    evals = [p for p in task.problems(n_eval * 2, derive_seed(seed, "eval"), "eval")  # type: ignore[attr-defined]
             if p.question not in seen][:n_eval]
    return train, evals


__all__ = ["Problem", "Task", "answers_match", "build_task", "extract_answer", "is_solved",
           "is_terminal_step", "make_splits", "parse_number", "read_problems"]
