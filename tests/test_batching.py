"""The server's batcher and request preparation, without HTTP: what is merged, split and returned to whom.

The batcher tests drive a fake model that records its calls and can be held inside a call, so "requests that
arrive while the model runs are batched together" is checked exactly, with no timing involved."""

import asyncio
import threading

import pytest

from fastrm.batching import BatcherClosed, DynamicBatcher, Group
from fastrm.serve_requests import BadRequest, prepare_queries, shared_prefix_lengths
from fastrm.synthetic import byte_tokenizer


class FakeModel:
    """score_fn that records (prompts, responses) per call; reward = a function of the prompt and the response, so
    each caller can check it got its own. ``hold()`` makes the next call wait until ``release()``."""

    def __init__(self):
        self.calls: list[tuple[list, list]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False

    @staticmethod
    def reward(prompt, response) -> float:
        return float(sum(prompt) * 1000 + sum(response) + len(response) / 10)

    def __call__(self, prompts, responses):
        self.calls.append((prompts, responses))
        self.entered.set()
        assert self.gate.wait(10), "the test never released the model"
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("model failure")
        return [[self.reward(p, r) for r in rs] for p, rs in zip(prompts, responses)]

    def hold(self):
        self.gate.clear()
        self.entered.clear()


def expected(groups):
    return [[FakeModel.reward(g.prompt, r) for r in g.responses] for g in groups]


async def until_model_entered(model: FakeModel):
    assert await asyncio.to_thread(model.entered.wait, 10), "the batcher never called the model"


async def let_tasks_queue():
    # Each submit runs up to `await future` in one step of the loop; one yield lets every created task get there.
    for _ in range(3):
        await asyncio.sleep(0)


def test_requests_arriving_while_the_model_runs_form_the_next_batch_and_get_their_own_rewards():
    async def run():
        model = FakeModel()
        b = DynamicBatcher(model, max_batch_tokens=10_000, max_wait_ms=0)
        model.hold()
        first = asyncio.create_task(b.submit([Group([1], [[2, 3]])]))
        await until_model_entered(model)
        reqs = [[Group([10 + i], [[i, i + 1], [i]]), Group([50], [[i + 2]])] for i in range(9)]
        tasks = [asyncio.create_task(b.submit(r)) for r in reqs]
        await let_tasks_queue()
        model.gate.set()
        assert await first == expected([Group([1], [[2, 3]])])
        for r, t in zip(reqs, tasks):
            assert await t == expected(r)
        await b.aclose()
        return model.calls

    calls = asyncio.run(run())
    assert len(calls) == 2  # the 9 queued requests went in one call
    prompts, responses = calls[1]
    # the 9 groups with prompt [50] became one shared-prompt group with 9 responses
    assert prompts.count([50]) == 1 and len(responses[prompts.index([50])]) == 9
    assert len(prompts) == 10


def test_a_batch_waits_for_requests_on_their_way_but_a_lone_request_goes_at_once():
    async def run():
        model = FakeModel()
        b = DynamicBatcher(model, max_batch_tokens=10_000, max_wait_ms=60_000)
        # nothing else on its way: scored at once, not after max_wait (the bound here is far below 60 s)
        assert await asyncio.wait_for(b.submit([Group([1], [[2]])]), 10) == expected([Group([1], [[2]])])
        tokenized = asyncio.Event()

        async def on_its_way():  # as the server does: tokenize inside arriving(), then submit in the same step
            with b.arriving():
                await tokenized.wait()
            return await b.submit([Group([5], [[6]])])

        second = asyncio.create_task(on_its_way())
        await let_tasks_queue()
        first = asyncio.create_task(b.submit([Group([3], [[4]])]))
        await let_tasks_queue()
        assert len(model.calls) == 1  # the queued request waits for the one on its way
        tokenized.set()
        assert await asyncio.wait_for(first, 10) == expected([Group([3], [[4]])])
        assert await asyncio.wait_for(second, 10) == expected([Group([5], [[6]])])
        await b.aclose()
        return model.calls

    calls = asyncio.run(run())
    assert [c[0] for c in calls] == [[[1]], [[3], [5]]]  # the last two in one call


def test_the_token_budget_splits_batches_and_big_groups_come_back_whole():
    async def run():
        model = FakeModel()
        b = DynamicBatcher(model, max_batch_tokens=12, max_wait_ms=0)
        big = Group([7, 7], [[1, 2, 3]] * 7)  # 2 + 21 tokens > 12: chunks of 3 responses, each with the prompt
        model.hold()
        first = asyncio.create_task(b.submit([Group([1], [[1]])]))
        await until_model_entered(model)
        small = [Group([i], [[i, i]]) for i in range(2, 8)]  # 3 tokens each: 4 per batch
        tasks = [asyncio.create_task(b.submit([g])) for g in small] + [asyncio.create_task(b.submit([big]))]
        await let_tasks_queue()
        model.gate.set()
        await first
        got = [await t for t in tasks]
        await b.aclose()
        return model.calls, got, small, big

    calls, got, small, big = asyncio.run(run())
    assert got[:-1] == [expected([g]) for g in small]
    assert got[-1] == expected([big])
    for prompts, responses in calls:  # every call is one micro-batch: within the budget, each prompt once
        assert sum(len(p) + sum(map(len, rs)) for p, rs in zip(prompts, responses)) <= 12
        assert len(set(map(tuple, prompts))) == len(prompts)
    # rounds in arrival order: 4 small requests fill the first micro-batch; the last 2 share the next with the big
    # request's first response; the big one's other 6 responses follow, 3 per micro-batch under one prompt
    assert [[len(rs) for rs in c[1]] for c in calls[1:]] == [[1, 1, 1, 1], [1, 1, 1], [3], [3]]


def test_a_failing_batch_fails_its_requests_only_and_close_fails_the_queue():
    async def run():
        model = FakeModel()
        b = DynamicBatcher(model, max_batch_tokens=100, max_wait_ms=0)
        model.fail_next = True
        with pytest.raises(RuntimeError, match="model failure"):
            await b.submit([Group([1], [[2]])])
        assert await b.submit([Group([1], [[2]])]) == expected([Group([1], [[2]])])
        model.hold()
        running = asyncio.create_task(b.submit([Group([3], [[4]])]))
        await until_model_entered(model)
        queued = asyncio.create_task(b.submit([Group([5], [[6]])]))
        await let_tasks_queue()
        closing = asyncio.create_task(b.aclose())
        await let_tasks_queue()
        model.gate.set()
        await closing
        for t in (running, queued):
            with pytest.raises(BatcherClosed):
                await t
        with pytest.raises(BatcherClosed):
            await b.submit([Group([1], [[2]])])

    asyncio.run(run())


def test_shared_prefix_lengths():
    assert shared_prefix_lengths([[1, 2, 3, 4], [9, 9], [1, 2, 3, 5, 6]]) == [3, 0, 3]
    assert shared_prefix_lengths([[5]]) == [0]
    assert shared_prefix_lengths([[1, 2], [1, 2]]) == [1, 1]  # identical: each keeps its last token
    # a fourth member sharing 1 token would cut 3 members' 6-token prefix: it stays out
    seqs = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 8], [1, 2, 3, 4, 5, 6, 9], [1, 9, 9]]
    assert shared_prefix_lengths(seqs) == [6, 6, 6, 0]


def test_prepare_queries_splits_at_the_prompt_strips_eos_and_groups_shared_prefixes():
    tok = byte_tokenizer()
    eos = tok.eos_token
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    queries = ["Q: hi A: yes" + eos, "Q: hi A: no", "Z: other" + eos + eos, "Z: other two"]
    prompts = ["Q: hi", "Q: hi", None, "not its prefix"]
    groups, flags, split = prepare_queries(tok, queries, prompts, max_length=1000)
    assert split == ["prompt", "prompt", "whole", "whole"]
    assert groups[0].prompt == groups[1].prompt == ids("Q: hi")
    assert groups[0].responses == [ids(" A: yes") + [tok.eos_token_id]]  # one EOS, the one the server adds
    assert groups[1].responses == [ids(" A: no") + [tok.eos_token_id]]
    # no usable prompt: tokenized whole; the two share a found prefix, and each keeps one token of its own
    assert groups[2].prompt == groups[3].prompt == ids("Z: othe")
    assert groups[2].responses == [ids("r") + [tok.eos_token_id]]
    assert groups[3].responses == [ids("r two") + [tok.eos_token_id]]
    assert flags == [False] * 4
    short, cut, _ = prepare_queries(tok, ["abcdefgh"], None, max_length=4)
    assert short[0].prompt == [] and short[0].responses == [ids("fgh") + [tok.eos_token_id]] and cut == [True]
    with pytest.raises(BadRequest, match=r"query\[0\] is empty"):
        prepare_queries(tok, [eos], None, max_length=8)


def test_a_small_request_behind_a_large_one_waits_for_one_micro_batch_not_for_the_large_request():
    async def run():
        model = FakeModel()
        b = DynamicBatcher(model, max_batch_tokens=40, max_wait_ms=0)
        large = Group([9] * 4, [[i % 5 + 1] * 6 for i in range(50)])  # 4 + 50 x 6 tokens: ~8 micro-batches
        model.hold()
        big = asyncio.create_task(b.submit([large]))
        await until_model_entered(model)  # the large request's first micro-batch is running
        small = asyncio.create_task(b.submit([Group([1], [[2, 3]])]))
        await let_tasks_queue()
        model.gate.set()
        assert await small == expected([Group([1], [[2, 3]])])
        assert await big == expected([large])
        await b.aclose()
        return model.calls

    calls = asyncio.run(run())
    assert len(calls) >= 8
    # the small request rode in the second model call, beside the large request's next responses
    assert [i for i, (prompts, _) in enumerate(calls) if [1] in prompts] == [1] and [9] * 4 in calls[1][0]


def test_a_cancelled_request_is_dropped_and_its_unsent_responses_are_never_scored():
    async def run():
        model = FakeModel()
        abandoned = []
        b = DynamicBatcher(model, max_batch_tokens=40, max_wait_ms=0, on_abandon=abandoned.append)
        large = Group([9] * 4, [[i % 5 + 1] * 6 for i in range(50)])
        model.hold()
        big = asyncio.create_task(b.submit([large]))
        await until_model_entered(model)
        other = asyncio.create_task(b.submit([Group([1], [[2]])]))  # queued behind, must still be served
        await let_tasks_queue()
        big.cancel()  # what the server does when the client disconnects
        await let_tasks_queue()
        model.gate.set()
        assert await other == expected([Group([1], [[2]])])
        with pytest.raises(asyncio.CancelledError):
            await big
        assert b.queued_requests == 0 and b.queued_tokens == 0
        await b.aclose()
        return model.calls, abandoned

    calls, abandoned = asyncio.run(run())
    scored = sum(len(rs) for prompts, responses in calls for p, rs in zip(prompts, responses) if p == [9] * 4)
    # only the micro-batch already in the model ran for the large request (6 responses: 4 + 6 x 6 = 40 tokens);
    # its other 44 were dropped, and counted; the next call served the request behind it
    assert len(calls) == 2 and scored == 6 and abandoned == [44] and calls[1][0] == [[1]]


def test_queries_without_prompts_tokenize_as_training_does_and_say_so_when_they_cannot(neox_tokenizer):
    """With a BPE tokenizer: an HH-RLHF transcript sent as a bare query gets training's prompt and response ids
    (load_tokenized, the training path); a query whose training prompt ended in a space cannot be recovered from
    the text alone, and the answer says how it was split instead of passing it off as the training split."""
    import gzip
    import json

    from conftest import HH

    from fastrm.data import split_hh_transcript
    from fastrm.tokenization import load_tokenized

    tok = neox_tokenizer
    rows = [json.loads(line) for line in gzip.open(HH / "helpful-base_test.jsonl.gz", "rt")][:80]
    cut = lambda r, k: split_hh_transcript(r[k])  # noqa: E731
    # rows training splits at the marker: a shared prompt and two non-empty responses (a few are not)
    rows = [r for r in rows if cut(r, "chosen")[0] == cut(r, "rejected")[0] and r["chosen"] != r["rejected"]]
    rows = [r for r in rows if cut(r, "chosen")[1].strip() and cut(r, "rejected")[1].strip()]
    train, _ = load_tokenized(rows, tok, max_length=10**6)
    groups, _, split = prepare_queries(tok, [r["chosen"] for r in rows], None, max_length=10**6)
    assert len(train) == len(rows) > 40 and split == ["assistant_marker"] * len(rows)
    for pair, g in zip(train, groups):
        assert (g.prompt, g.responses) == (list(pair.prompt_ids), [list(pair.chosen_ids)])
    # trained as prompt "... Assistant: " + response "Hello ...": only the client knows where the prompt ends
    pairs = [
        {"prompt": f"\n\nHuman: q{i}\n\nAssistant: ", "chosen": f"Hello {i}.", "rejected": "No."} for i in range(8)
    ]
    train, _ = load_tokenized(pairs, tok, max_length=10**6)
    texts = [p["prompt"] + p["chosen"] for p in pairs]
    exact, _, split = prepare_queries(tok, texts, [p["prompt"] for p in pairs], max_length=10**6)
    assert split is None and all(
        (g.prompt, g.responses) == (list(t.prompt_ids), [list(t.chosen_ids)]) for g, t in zip(exact, train)
    )
    bare, _, split = prepare_queries(tok, texts, None, max_length=10**6)
    assert split == ["assistant_marker"] * 8  # said in the answer (and counted in /metrics)
    assert all(g.prompt + g.responses[0] != t.prompt_ids + t.chosen_ids for g, t in zip(bare, train))
