"""Lockstep: many searches share one policy, their `expand` calls merged into one batched call per step.

A search of one problem asks the model for a few rows at a time (eta-MCTS: the children of 4 leaves), so on a
small model every forward is latency-bound: one forward per generated token whatever the batch. `Lockstep.run`
runs several searches (any code written against `Policy`: eta-MCTS, Tree-GRPO, chains, rollouts) each against a
`Member`, a `Policy` whose `expand` hands its request to the coordinator and waits. Once every unfinished member
waits, the requests that share a stop rule, temperature and store are merged into one `Policy.expand` (parents
concatenated; counts, exclusions and `final` verdicts mapped back) and each member gets its own slice. The
search code is unchanged and never knows (the mctx batch dimension, reached at the policy boundary).

- One at a time: members run in member order, one after another (a baton; never two at once), each until its
  next `expand` or its end. So nothing they share (the store, critics, counters) is touched concurrently, and
  the same jobs in the same order give the same results: each merged call's seed is derived from its requests'
  (member, seed) pairs. Each member is a greenlet on the caller's thread: handing the baton is a stack switch
  (~1 us), where OS threads woken by semaphores cost ~75 us per request (issue #9: that hand-over was the
  largest share of a default search's tree work). Thread-local state (torch's grad mode) is therefore shared:
  a member must not hold such a context across its `expand`.
- Distribution: a merged call samples each parent's continuations from the same conditional as a call of its
  own (the `Policy` contract: a batch of parents gives what each parent gives alone, in distribution; greedy,
  exactly). The draws differ from a lone call's, as any other seed's would.
- Accounting: the backend counts the merged call as a whole. Each member's `counters` get a share of every
  counter of the merged calls it took part in, in proportion to the tokens its continuations hold (largest
  remainder, so the members' counts add up exactly to the backend's); `sample`/`score` calls made by a member
  are its own exactly. A per-member forward-token budget therefore reads the member's apportioned share.
- Timing: a stopwatch a member keeps on its own calls (eta-MCTS's `SearchTiming`) also counts the other
  members' turns while it waits; time the policy under the lockstep instead (the search stage's
  `model_seconds`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import greenlet

from arbor.lm.base import Continuation, Policy, StopRule, TokenCounters

T = TypeVar("T")


class LockstepAborted(RuntimeError):
    """Raised inside a member's search when another member failed: the group stops."""


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to `weights` that sum to `total` exactly (largest remainder; equal weights where all
    are 0).

    >>> apportion(10, [1, 1, 1]), apportion(7, [0, 0]), apportion(5, [3, 1, 0])
    ([4, 3, 3], [4, 3], [4, 1, 0])
    """
    n = len(weights)
    if n == 0:
        return []
    w = [max(0.0, float(x)) for x in weights]
    s = sum(w)
    if s <= 0:
        w, s = [1.0] * n, float(n)
    exact = [total * x / s for x in w]
    out = [int(e // 1) for e in exact]
    order = sorted(range(n), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def lockstep_groups(n_items: int, size: int) -> list[list[int]]:
    """Item indices in lockstep groups of `size`, fixed by index (a resumed run forms the same groups).

    >>> lockstep_groups(5, 2)
    [[0, 1], [2, 3], [4]]
    """
    return [list(range(g, min(n_items, g + size))) for g in range(0, n_items, size)]


@dataclass
class _Request:
    parents: list[tuple[Hashable, Sequence[int]]]
    counts: list[int]
    stop: StopRule
    temperature: float
    seed: int
    store: Any
    exclude: Sequence[Sequence[Any]] | None
    final: Callable[[int, str], bool] | None

    def signature(self) -> tuple:
        """Requests with equal signatures can share one call."""
        return self.stop, float(self.temperature), id(self.store)


@dataclass
class _State:
    started: bool = False
    done: bool = False
    request: _Request | None = None
    response: list[list[Continuation]] | None = None
    error: BaseException | None = None
    result: Any = None
    failed: BaseException | None = None


class Member:
    """One search's view of the shared policy (see the module docstring): `expand` is merged with the other
    members'; every other attribute is the policy's."""

    def __init__(self, lockstep: Lockstep, index: int) -> None:
        self._lockstep, self.index = lockstep, index
        self.counters = TokenCounters()
        self._state = _State()
        self._glet: greenlet.greenlet | None = None  # the member's search, switched to by the coordinator

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lockstep.policy, name)

    def expand(self, parents: Sequence[tuple[Hashable, Sequence[int]]], num_samples: int | Sequence[int], *,
               stop: StopRule, temperature: float, seed: int, store: Any,
               exclude: Sequence[Sequence[Any]] | None = None,
               final: Callable[[int, str], bool] | None = None) -> list[list[Continuation]]:
        """`Policy.expand`, answered by the coordinator's merged call."""
        counts = [num_samples] * len(parents) if isinstance(num_samples, int) else list(num_samples)
        req = _Request(list(parents), counts, stop, temperature, int(seed), store, exclude, final)
        return self._lockstep._wait(self, req)

    def sample(self, *args: Any, **kw: Any) -> list[Continuation]:
        return self._own("sample", *args, **kw)

    def score(self, *args: Any, **kw: Any) -> Any:
        return self._own("score", *args, **kw)

    def _own(self, name: str, *args: Any, **kw: Any) -> Any:
        """A call made by this member alone (it holds the baton): its counts are its own."""
        policy = self._lockstep.policy
        before = policy.counters.snapshot()
        try:
            return getattr(policy, name)(*args, **kw)
        finally:
            _add(self.counters, policy.counters.since(before).as_dict())


def _add(counters: TokenCounters, delta: dict[str, int]) -> None:
    for k, v in delta.items():
        setattr(counters, k, getattr(counters, k) + v)


@dataclass
class Lockstep(Generic[T]):
    """Runs searches in lockstep over one `policy` (see the module docstring)."""

    policy: Policy
    calls: int = 0  # merged `expand` calls made
    requests: int = 0  # member `expand` requests they answered
    _hub: greenlet.greenlet | None = field(default=None, init=False, repr=False)  # the coordinator

    def run(self, jobs: Sequence[Callable[[Policy], T]]) -> list[T]:
        """`[job(member) for job in jobs]`, the jobs in lockstep; the first job's exception (in job order) is
        re-raised once every job has stopped."""
        if isinstance(self.policy, Member):
            raise ValueError("Lockstep over a lockstep member: nest searches in one group instead")
        self._hub = greenlet.getcurrent()
        members = [Member(self, i) for i in range(len(jobs))]
        for m, job in zip(members, jobs, strict=True):
            m._glet = greenlet.greenlet(lambda m=m, job=job: self._main(m, job), parent=self._hub)
        try:
            self._loop(members)
        finally:  # an interrupt in the coordinator: let every suspended member unwind (its finally blocks run)
            for m in members:
                if m._glet is not None and m._glet:
                    m._glet.throw(greenlet.GreenletExit)
        for m in members:
            if m._state.failed is not None and not isinstance(m._state.failed, (LockstepAborted,
                                                                                greenlet.GreenletExit)):
                raise m._state.failed
        return [m._state.result for m in members]

    def _loop(self, members: list[Member]) -> None:
        failed = False
        while True:
            for m in members:  # pass the baton: each runs to its next request or its end
                s = m._state
                if not s.done and (not s.started or s.response is not None or s.error is not None):
                    self._hand(m)
                    failed = failed or s.failed is not None
            waiting = [m for m in members if not m._state.done]
            if not waiting:
                return
            if failed:
                for m in waiting:
                    m._state.error = LockstepAborted("another search of this lockstep group failed")
                continue
            self._answer(waiting)

    # -- member side ---------------------------------------------------------------------------------------------
    def _main(self, m: Member, job: Callable[[Policy], T]) -> None:
        try:
            m._state.result = job(m)  # type: ignore[arg-type]
        except BaseException as e:  # handed to the coordinator, re-raised there
            m._state.failed = e
        m._state.done = True  # returning switches back to the coordinator (the greenlet's parent)

    def _wait(self, m: Member, req: _Request) -> list[list[Continuation]]:
        s = m._state
        s.request, s.response, s.error = req, None, None
        self._hub.switch()  # type: ignore[union-attr]  # back when the coordinator hands this member the baton
        if s.error is not None:
            raise s.error
        out, s.response = s.response, None
        return out  # type: ignore[return-value]

    # -- coordinator side ----------------------------------------------------------------------------------------
    def _hand(self, m: Member) -> None:
        """Let member `m` run until it waits again or ends."""
        m._state.started = True
        m._glet.switch()  # type: ignore[union-attr]

    def _answer(self, waiting: list[Member]) -> None:
        """One merged `expand` per signature over the waiting members' requests (member order)."""
        groups: dict[tuple, list[Member]] = {}
        for m in waiting:
            groups.setdefault(m._state.request.signature(), []).append(m)  # type: ignore[union-attr]
        for group in groups.values():
            try:
                self._merged(group)
            except Exception as e:
                for m in group:
                    m._state.error = e

    def _merged(self, group: list[Member]) -> None:
        reqs: list[_Request] = [m._state.request for m in group]  # type: ignore[misc]  # all waiting
        parents: list[tuple[Hashable, Sequence[int]]] = [p for r in reqs for p in r.parents]
        counts = [n for r in reqs for n in r.counts]
        owner = [(j, i) for j, r in enumerate(reqs) for i in range(len(r.parents))]  # merged row -> request, row
        exclude = None
        if any(r.exclude is not None for r in reqs):
            exclude = [list(reqs[j].exclude[i]) if reqs[j].exclude is not None else [] for j, i in owner]  # type: ignore[index]
        final = None
        if any(r.final is not None for r in reqs):
            def final(k: int, text: str) -> bool:
                j, i = owner[k]
                f = reqs[j].final
                return bool(f(i, text)) if f is not None else False

        first = reqs[0]
        seed = _merged_seed([(m.index, r.seed) for m, r in zip(group, reqs, strict=True)])
        before = self.policy.counters.snapshot()
        out = self.policy.expand(parents, counts, stop=first.stop, temperature=first.temperature, seed=seed,
                                 store=first.store, exclude=exclude, final=final)
        delta = self.policy.counters.since(before).as_dict()
        self.calls += 1
        self.requests += len(reqs)
        start = 0
        weights = []
        for m, r in zip(group, reqs, strict=True):
            m._state.response = out[start : start + len(r.parents)]
            weights.append(sum(len(c.token_ids) for conts in m._state.response for c in conts))
            start += len(r.parents)
        shares = {k: apportion(v, weights) for k, v in delta.items()}
        for idx, m in enumerate(group):
            _add(m.counters, {k: v[idx] for k, v in shares.items()})


def _merged_seed(pairs: Sequence[tuple[int, int]]) -> int:
    """A merged call's seed from its requests' (member, seed) pairs (63 bits). It hashes as
    `arbor.pipeline.seeds.derive_seed` does, with its own key format and width; switching to `derive_seed` would
    redraw every lockstep tree, so it waits for the next full verification run."""
    h = hashlib.blake2b(repr(list(pairs)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1
