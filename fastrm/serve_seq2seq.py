"""The reward server's endpoints for a sequence-to-sequence reward model (fastrm/seq2seq_rewards.py).

A seq2seq RM rewards a response against its prompt, token by token: ``/token_rewards`` answers the token rewards
(and the token strings and sequence scores), ``/score`` and ``/get_reward`` the sequence score of each response
(the mean, or sum, of its token rewards, by the checkpoint's rule), so an RLHF loop written for a scalar RM runs
unchanged. ``/get_reward`` needs ``prompts`` (a query is split at its prompt; there is no scalar "last token" to
fall back on), and ``/classify`` (whole texts, no prompt) is refused with the reason.

Requests are scored one at a time on a worker thread (the event loop stays free to read and answer others); each
request's groups go into shared-prompt micro-batches of ``--max-batch-tokens``. Unlike the scalar path, requests
are not batched together (a seq2seq group is [x | input(y) | y], about twice a scalar one).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastrm.formatting import ScoringRule
from fastrm.scoring import normalize_texts
from fastrm.serve_requests import check_count, field_of
from fastrm.serve_schema import BadRequest, ClassifyRequest, GetRewardRequest, ScoreRequest, parse_body


def scoring_rule(model) -> ScoringRule:
    """The rule the server's limits read (max_length; a seq2seq target gets no EOS)."""
    return ScoringRule(append_eos=False, max_length=model.settings.max_length, origin="record")


def describe(model) -> str:
    s = model.settings
    return (
        f"seq2seq (Zhou et al. 2024: token rewards by the {s.reward_rule!r} rule, +{s.positive}/-{s.negative}; "
        f"sequence score the {s.sequence_score} of them; max_length {s.max_length})"
    )


class Seq2SeqEndpoints:
    """/score, /get_reward, /token_rewards and /classify for ``service`` (a :class:`fastrm.serve.RewardService`
    whose model is a seq2seq RM)."""

    def __init__(self, service):
        self.service = service
        self._lock = asyncio.Lock()  # one forward at a time: the model is not shared between threads

    def warm_up(self) -> None:
        from fastrm.seq2seq_rewards import token_decisions

        token_decisions(self.service.model, [([1, 2], [([3], [4])])])

    async def _score(self, prompts: list[str], responses: list[list[str]]):
        from fastrm.seq2seq_rewards import score_groups

        svc = self.service
        check_count(sum(map(len, responses)), svc.limits, "responses")

        def run():
            return score_groups(
                svc.model, svc.tokenizer, prompts, responses, max_tokens_per_batch=svc.config.max_batch_tokens
            )

        async with self._lock:
            try:
                return await asyncio.to_thread(run)
            except ValueError as e:  # a response with no tokens, or a target over max_length: the client's
                raise BadRequest(field_of(str(e), "responses"), str(e)) from None

    def _texts(self, body: bytes | dict) -> tuple[list[str], list[list[str]]]:
        req = parse_body(body, ScoreRequest)
        try:
            prompts, responses, _ = normalize_texts(req.prompts, req.responses)
        except (TypeError, ValueError) as e:
            raise BadRequest(field_of(str(e), "responses"), str(e)) from None
        check_count(len(prompts), self.service.limits, "prompts")
        return prompts, responses

    async def score(self, body: bytes | dict) -> dict:
        prompts, responses = self._texts(body)
        scores, _, _ = await self._score(prompts, responses)
        return {"rewards": scores}

    async def token_rewards(self, body: bytes | dict) -> dict:
        prompts, responses = self._texts(body)
        scores, rewards, targets = await self._score(prompts, responses)
        tok = self.service.tokenizer
        tokens = [[tok.convert_ids_to_tokens(t) for t in per] for per in targets]
        return {"scores": scores, "token_rewards": rewards, "tokens": tokens}

    async def get_reward(self, body: bytes | dict) -> dict:
        req = parse_body(body, GetRewardRequest)
        check_count(len(req.query), self.service.limits, "query")
        if req.prompts is None:
            raise BadRequest(
                "prompts",
                "prompts: a seq2seq reward model rewards a response against its prompt; send prompts (one per "
                "query, as OpenRLHF does) so each query can be split",
            )
        if len(req.prompts) != len(req.query):
            n, got = len(req.query), len(req.prompts)
            raise BadRequest("prompts", f"prompts must have one entry per query ({n}), got {got}")
        responses = []
        for i, (q, p) in enumerate(zip(req.query, req.prompts)):
            if not q.startswith(p):
                raise BadRequest(f"query[{i}]", f"query[{i}] does not start with prompts[{i}]: it cannot be split")
            responses.append([q[len(p) :]])
        for i, (r,) in enumerate(responses):
            if not r.strip():
                raise BadRequest(f"query[{i}]", f"query[{i}] has no response after its prompt: nothing to score")
        scores, _, _ = await self._score(list(req.prompts), responses)
        flat = [s for (s,) in scores]
        return {"rewards": flat, "scores": flat, "extra_logs": {}}

    async def classify(self, body: bytes | dict) -> Any:
        parse_body(body, ClassifyRequest)
        raise BadRequest(
            "input",
            "input: this server's model is a seq2seq reward model, which rewards a response against its prompt; "
            "/classify sends whole texts: use /score, /get_reward with prompts, or /token_rewards",
        )
