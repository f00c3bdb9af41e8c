"""Fair dynamic batching for the reward server: concurrent requests -> token-budget micro-batches, one model call
at a time, shared fairly between requests.

A request is a list of :class:`Group` (one prompt's token ids and its responses' token ids, already truncated by
the training rule); the batcher sees it as a queue of responses still to score. The :class:`DynamicBatcher`

1. queues requests in arrival order;
2. when the model is free, fills one micro-batch of at most ``max_batch_tokens`` tokens in passes over the queue
   in arrival order: in each pass a request adds its next responses until it has taken another
   ``request_share`` of the micro-batch (a quarter by default). So a request that fits its share goes whole (its
   prompt computed once), a large request is spread over micro-batches and interleaved with the work of the
   requests behind it, and a small request behind a large one waits for about one micro-batch (the one
   running), not for the whole large request; what the first pass leaves goes to whoever still has work, so a
   lone large request still fills whole micro-batches. Before a micro-batch starts it waits, at most
   ``max_wait_ms`` after the oldest queued request, for requests already on their way (inside
   :meth:`DynamicBatcher.arriving`: being read and tokenized), but never for requests that may or may not come,
   so a lone request goes at once;
3. merges the micro-batch's responses with identical prompt ids, within and across requests, into one
   shared-prompt group: the prompt is computed once, and the result is exact because each response sees the
   same tokens at the same positions;
4. runs the model in a worker thread (one call at a time: a model is not shared between threads) and resolves a
   request's future with its own rewards, in its own order, once its last response is scored;
5. drops a request whose future was cancelled (its client went away) with the responses it had not yet sent to
   the model, and reports their count to ``on_abandon``.

While the model runs, new requests queue, so under load each call takes what arrived during the previous one
(continuous batching): batches grow with the load without an artificial delay.

>>> batcher = DynamicBatcher(lambda p, r: score_token_groups(model, p, r), max_batch_tokens=16384, max_wait_ms=5)
>>> await batcher.submit([Group(prompt_ids, [resp_a_ids, resp_b_ids])])   # -> [[r_a, r_b]]
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from fastrm.packing import Layout, group_cost

# (prompts [G] of token ids, responses [G][N_g] of token ids) -> rewards [G][N_g]; runs in the worker thread.
ScoreFn = Callable[[list[list[int]], list[list[list[int]]]], list[list[float]]]


@dataclass
class Group:
    """One prompt and its responses, as token ids (EOS appended, truncated): one shared-prompt segment."""

    prompt: list[int]
    responses: list[list[int]]


def request_tokens(groups: Sequence[Group], layout: Layout) -> int:
    """Tokens the model computes for these groups when scored together: with ``shared_prompt``, a prompt that
    several groups share counts once (the batcher merges them), as the work a request asks for."""
    if layout != "shared_prompt":
        return sum(group_cost(len(g.prompt), [len(r) for r in g.responses], layout) for g in groups)
    prompts = {tuple(g.prompt) for g in groups}
    return sum(map(len, prompts)) + sum(len(r) for g in groups for r in g.responses)


@dataclass
class BatchStats:
    """What one model call did, for metrics: requests served, responses scored, packed tokens, seconds."""

    requests: int
    responses: int
    tokens: int
    seconds: float
    queue_seconds: list[float] = field(default_factory=list)  # per request started here: arrival -> first scored


class BatcherClosed(RuntimeError):
    """The server is shutting down: the request was not scored."""


@dataclass(eq=False)
class _Request:
    groups: Sequence[Group]
    keys: list[tuple[int, ...]]  # the groups' prompt ids, hashable: responses with equal keys share a prompt
    todo: deque[tuple[int, int]]  # (group, response) not yet sent to the model, in order
    rewards: list[list[float]]
    left: int  # responses not yet scored
    future: asyncio.Future
    arrival: float
    queued_tokens: int  # estimate of the tokens in todo (prompts counted once per group)
    started: bool = False


class DynamicBatcher:
    """Merge concurrent scoring requests into fair token-budget micro-batches, scored one at a time.

    Args:
        score_fn: scores merged groups (called in a single worker thread, never concurrently).
        max_batch_tokens: token budget of one model call (packed tokens, as :func:`fastrm.packing.group_cost`).
        max_wait_ms: how long a batch may wait for requests on their way (see :meth:`arriving`).
        layout: how ``score_fn`` packs groups ("shared_prompt" or "separate"); decides the token cost of a group.
        on_batch: called in the event loop after each model call with its :class:`BatchStats`.
        on_abandon: called with the number of responses of a cancelled request that were never scored.
        request_share: the part of a micro-batch a request takes per pass while others wait (see :meth:`_take`).
    """

    def __init__(
        self,
        score_fn: ScoreFn,
        *,
        max_batch_tokens: int,
        max_wait_ms: float,
        layout: Layout = "shared_prompt",
        on_batch: Callable[[BatchStats], None] | None = None,
        on_abandon: Callable[[int], None] | None = None,
        request_share: float = 0.25,
    ):
        if max_batch_tokens < 1 or max_wait_ms < 0 or not 0 < request_share <= 1:
            raise ValueError(
                f"need max_batch_tokens >= 1, max_wait_ms >= 0 and 0 < request_share <= 1, got {max_batch_tokens}, "
                f"{max_wait_ms}, {request_share}"
            )
        self.score_fn = score_fn
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.layout = layout
        self.on_batch = on_batch
        self.on_abandon = on_abandon
        self.share = max(1, int(request_share * max_batch_tokens))  # tokens per request per pass of _take
        self._queue: deque[_Request] = deque()  # requests with responses not yet sent to the model
        self._queued_tokens = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._inflight: list[_Request] = []  # requests with responses in the running model call
        self._arriving = 0  # requests inside arriving(): on their way to submit()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastrm-model")

    # ------------------------------------------------------------------------------------------------ public

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    async def submit(self, groups: Sequence[Group]) -> list[list[float]]:
        """Rewards [G][N_g] of the given groups, in order. Raises what ``score_fn`` raised for a micro-batch of it.
        Cancelling the caller drops the request's responses that have not reached the model yet."""
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        if not groups:
            return []
        self._start()
        loop = asyncio.get_running_loop()
        todo = deque((g, j) for g, group in enumerate(groups) for j in range(len(group.responses)))
        cost = sum(self._cost(len(g.prompt), [len(r) for r in g.responses]) for g in groups)
        req = _Request(
            groups=groups,
            keys=[tuple(g.prompt) for g in groups],
            todo=todo,
            rewards=[[float("nan")] * len(g.responses) for g in groups],
            left=len(todo),
            future=loop.create_future(),
            arrival=loop.time(),
            queued_tokens=cost,
        )
        if not req.left:
            return req.rewards
        self._queue.append(req)
        self._queued_tokens += cost
        self._wakeup.set()
        return await req.future

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (being read, validated, tokenized) for the duration of the block: a batch
        about to start waits up to ``max_wait_ms`` for it. Leave the block before :meth:`submit`."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._wakeup is not None:
                self._wakeup.set()

    async def aclose(self) -> None:
        """Stop the worker; queued requests fail with :class:`BatcherClosed`; waits for a running model call."""
        self._closed = True
        unserved = [*self._inflight, *self._queue]  # before cancelling: the worker forgets its batch when cancelled
        self._queue.clear()
        self._queued_tokens = 0
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for req in unserved:
            if not req.future.done():
                req.future.set_exception(BatcherClosed("the server is shutting down"))
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    # ------------------------------------------------------------------------------------------------ internals

    def _start(self) -> None:
        # Started on the first request, in the loop that serves requests (uvicorn's, or a Ray Serve replica's).
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fastrm-batcher")

    def _cost(self, prompt_len: int, response_lens: list[int]) -> int:
        return group_cost(prompt_len, response_lens, self.layout)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._drop_finished()
            if not self._queue:
                continue
            # Wait for requests already on their way (being read and tokenized), until the oldest queued request
            # has waited max_wait or the queue fills a batch; never for requests that may or may not come.
            deadline = self._queue[0].arrival + self.max_wait_s
            while self._arriving and self._queued_tokens < self.max_batch_tokens:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
                self._wakeup.clear()
            self._drop_finished()
            taken, used = self._take()
            if self._queue:  # what did not fit goes next, after this batch
                self._wakeup.set()
            if taken:
                await self._score(taken, used, loop)

    def _drop_finished(self) -> None:
        """Remove requests whose future is done before all their responses were sent: cancelled (the client went
        away: counted to on_abandon) or failed in an earlier micro-batch."""
        if all(not r.future.done() for r in self._queue):
            return
        keep: deque[_Request] = deque()
        for req in self._queue:
            if not req.future.done():
                keep.append(req)
                continue
            self._queued_tokens -= req.queued_tokens
            if req.future.cancelled() and self.on_abandon is not None:
                self.on_abandon(len(req.todo))
        self._queue = keep

    def _take(self) -> tuple[list[tuple[_Request, int, int]], int]:
        """One micro-batch: (request, group, response) while they fit the budget (at least one), and its tokens.

        Passes over the queue in arrival order; in each pass a request takes its next responses, in order, until
        its share of this micro-batch reaches ``share`` more tokens. So a request takes a whole group (one prompt
        computed once) when it fits its share, a large request is spread over micro-batches while others wait,
        and the passes after the first hand what is left of the budget to whoever still has work (a lone large
        request fills whole micro-batches). The oldest requests always get their share first: none starves."""
        taken: list[tuple[_Request, int, int]] = []
        seen: set[tuple[int, ...]] = set()
        used = 0
        shared = self.layout == "shared_prompt"
        mine: dict[int, int] = {}  # id(request) -> tokens it took in this micro-batch
        live = list(self._queue)
        limit = self.share
        while live and used < self.max_batch_tokens:
            still = []
            for req in live:
                blocked = False
                while req.todo and mine.get(id(req), 0) < limit:
                    g, j = req.todo[0]
                    key = req.keys[g]
                    cost = len(req.groups[g].responses[j])
                    if not shared or key not in seen:
                        cost += len(key)
                    if taken and used + cost > self.max_batch_tokens:
                        blocked = True  # the budget only shrinks: this request is done for this micro-batch
                        break
                    req.todo.popleft()
                    # the queue's estimate: a response's tokens, and its prompt's with the group's last response
                    last_of_group = not req.todo or req.todo[0][0] != g
                    charged = len(req.groups[g].responses[j]) + (len(key) if not shared or last_of_group else 0)
                    req.queued_tokens -= charged
                    self._queued_tokens -= charged
                    seen.add(key)
                    used += cost
                    mine[id(req)] = mine.get(id(req), 0) + cost
                    taken.append((req, g, j))
                if req.todo and not blocked:
                    still.append(req)
            live = still
            limit += self.share
        if any(not r.todo for r in self._queue):
            self._queue = deque(r for r in self._queue if r.todo)
        return taken, used

    async def _score(self, taken: list[tuple[_Request, int, int]], used: int, loop: asyncio.AbstractEventLoop) -> None:
        t0 = loop.time()
        merged: list[tuple[list[int], list[list[int]]]] = []
        slot: dict[tuple[int, ...], int] = {}
        where: list[tuple[int, int]] = []  # for each taken response: (merged group, position)
        for req, g, j in taken:
            m = slot.get(req.keys[g])
            if m is None:
                m = slot[req.keys[g]] = len(merged)
                merged.append((req.groups[g].prompt, []))
            where.append((m, len(merged[m][1])))
            merged[m][1].append(req.groups[g].responses[j])
        batch = list(dict.fromkeys(req for req, _, _ in taken))
        waits = [t0 - req.arrival for req in batch if not req.started]
        for req in batch:
            req.started = True
        self._inflight = batch
        start = time.perf_counter()
        try:
            rewards = await loop.run_in_executor(
                self._executor, self.score_fn, [p for p, _ in merged], [rs for _, rs in merged]
            )
        except Exception as e:  # a failed micro-batch fails its requests, never the server
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(e)
            return
        finally:
            self._inflight = []
        seconds = time.perf_counter() - start
        for (req, g, j), (m, k) in zip(taken, where):
            req.rewards[g][j] = rewards[m][k]
            req.left -= 1
            if not req.left and not req.future.done():
                req.future.set_result(req.rewards)
        if self.on_batch is not None:
            self.on_batch(
                BatchStats(requests=len(batch), responses=len(taken), tokens=used, seconds=seconds, queue_seconds=waits)
            )
