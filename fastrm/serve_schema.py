"""The reward server's API as pydantic models: request and response bodies, the error body, and body parsing.

The models are the one definition of each body's shape: :func:`parse_body` validates a request with them (strict:
no coercion), and the OpenAPI spec (``/openapi.json``, ``/docs``) declares them, so generated clients and
schema-based fuzzers see what the server checks. Rules a schema cannot say (a response that is only whitespace,
one response list per prompt, the per-request limits) are checked next, in :mod:`fastrm.serve_requests`.

A body the server refuses raises :class:`BadRequest`: HTTP ``status`` with ``{"error", "field"}``, where
``field`` names the place (``responses[0][1]``, ``body``, ``content-type``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

SplitRule = Literal["prompt", "assistant_marker", "whole"]


class BadRequest(ValueError):
    """A request the server refuses: HTTP ``status`` with ``{"error": message, "field": field}``."""

    def __init__(self, field: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


def _utf8(text: str) -> str:
    # json.loads accepts "\ud800" (a lone surrogate), which no tokenizer can encode: refuse it here, by field.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid Unicode: lone surrogate U+{ord(text[e.start]):04X} at index {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
_STRICT = ConfigDict(strict=True, extra="ignore")


# ------------------------------------------------------------------------------------------------ requests


class ScoreRequest(BaseModel):
    """POST /score: prompts and, for each, the responses to score (a string stands for a list of one)."""

    model_config = ConfigDict(
        _STRICT,
        json_schema_extra={"examples": [{"prompts": ["Q: 2+2?\nA:"], "responses": [[" 4", " 5"]]}]},
    )
    prompts: list[Text] = Field(min_length=1, description="prompt texts")
    responses: list[list[Text] | Text] = Field(
        min_length=1, description="one list of response texts per prompt, in the same order"
    )


class GetRewardRequest(BaseModel):
    """POST /get_reward, OpenRLHF's remote reward model: full texts, optionally with the prompt of each."""

    model_config = ConfigDict(
        _STRICT,
        json_schema_extra={"examples": [{"query": ["Q: 2+2?\nA: 4"], "prompts": ["Q: 2+2?\nA:"]}]},
    )
    query: list[Text] = Field(min_length=1, description="full texts (prompt + response), one per response")
    prompts: list[Text | None] | None = Field(
        None,
        description="the prompt of each query: a query that starts with its prompt is tokenized as prompt + "
        "response, as in training",
    )
    labels: Any = Field(None, description="accepted and ignored (OpenRLHF sends them)")


class ClassifyRequest(BaseModel):
    """POST /classify, vLLM's classification API (what verl calls): full texts, one reward each."""

    model_config = ConfigDict(_STRICT, json_schema_extra={"examples": [{"input": ["Q: 2+2?\nA: 4"]}]})
    input: list[Text] | Text = Field(description="full texts (prompt + response)")
    model: str | None = Field(None, description="echoed back (the server serves one model)")
    activation: bool | None = Field(None, description="vLLM < 0.11.2: false returns the raw reward")
    use_activation: bool | None = Field(None, description="true (default): sigmoid of the reward; false: raw reward")
    add_special_tokens: bool | None = Field(
        None, description="must be false or absent: rewards are computed as in training (no special tokens added)"
    )


# ------------------------------------------------------------------------------------------------ responses


class ScoreResponse(BaseModel):
    rewards: list[list[float]] = Field(description="one reward per response, in the request's shape")
    truncated: list[list[bool]] | None = Field(
        None, description="present when some sequence was over --max-length and lost tokens (training's rule)"
    )


class TokenRewardsResponse(BaseModel):
    scores: list[list[float]] = Field(description="the sequence score of each response, in the request's shape")
    token_rewards: list[list[list[float]]] = Field(
        description="one reward per token of each response (the RM's tokenizer, no special tokens)"
    )
    tokens: list[list[list[str]]] = Field(description="the tokens those rewards belong to")


class GetRewardResponse(BaseModel):
    rewards: list[float] = Field(description="one reward per query")
    scores: list[float] = Field(description="the same values (OpenRLHF reads scores for dynamic filtering)")
    extra_logs: dict[str, Any] = Field(description="empty (OpenRLHF logs its entries per sample)")
    truncated: list[bool] | None = Field(None, description="present when some query lost tokens to --max-length")
    split: list[SplitRule] | None = Field(
        None,
        description="present when some query was not split at its given prompt: how each query was tokenized "
        "('prompt': at its prompt; 'assistant_marker': at the last '\\n\\nAssistant:', as training splits "
        "HH-RLHF transcripts; 'whole': as one text, as training does a row without a prompt)",
    )


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float] = Field(description="[reward] (sigmoid of it unless use_activation/activation is false)")
    num_classes: int


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: ClassifyUsage
    truncated: list[bool] | None = None
    split: list[SplitRule] | None = None


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong, one line")
    field: str | None = Field(description="the request field (or header) at fault, e.g. responses[0][1]")
    request_id: str = Field(description="also in the X-Request-ID header and the server log")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str | None = Field(None, description="shown with the token only, when the server requires one")
    device: str | None = None
    scoring_rule: Literal["fastrm", "hf", "seq2seq"] | None = Field(
        None,
        description="how texts become token ids: fastrm (the checkpoint's training rule), hf (stock transformers'), "
        "or seq2seq (a sequence-to-sequence RM's template; rewards are token-level, see /token_rewards)",
    )
    scoring: str | None = Field(None, description="the scoring rule in words (EOS, special tokens, pooled token)")
    uptime_s: float | None = None


# ------------------------------------------------------------------------------------------------ parsing

_EXPECTED = {
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "a JSON object",
    "dict_type": "a JSON object",
    "bool_type": "true or false",
    "none_required": "null",
}


def _json_type(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list"}
    if value is None:
        return "null"
    return "a JSON object" if isinstance(value, dict) else names.get(type(value), type(value).__name__)


def _field(loc: tuple, fields: set[str]) -> str:
    """('responses', 0, 'list[str]', 1) -> 'responses[0][1]' (pydantic's union-member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out and part in fields:
            out = part
    return out or "body"


def _error_of(e: ValidationError, model: type[BaseModel]) -> BadRequest:
    """The first (deepest) problem of a validation error as one line naming the field."""
    fields = set(model.model_fields)
    errs = [(_field(tuple(err["loc"]), fields), err) for err in e.errors()]
    # A union reports one error per member; the deepest place is where the value went wrong.
    depth = max(f.count("[") for f, _ in errs)
    field = next(f for f, _ in errs if f.count("[") == depth)
    here = [err for f, err in errs if f == field]
    err = here[0]
    if err["type"] == "missing":
        return BadRequest(field, f"{field}: missing")
    if err["type"] == "too_short":
        return BadRequest(field, f"{field}: empty list, nothing to score")
    if err["type"] == "value_error":  # our own validators (invalid Unicode)
        return BadRequest(field, f"{field}: {err['ctx']['error']}")
    wanted = [_EXPECTED[x["type"]] for x in here if x["type"] in _EXPECTED]
    if len(wanted) == len(here):
        wanted = list(dict.fromkeys(wanted))
        return BadRequest(field, f"{field} must be {' or '.join(wanted)}, got {_json_type(err['input'])}")
    return BadRequest(field, f"{field}: {err['msg']}")


def parse_body(raw: bytes | dict, model: type[BaseModel]) -> Any:
    """A request body (JSON bytes, or an already parsed dict) as an instance of ``model``; :class:`BadRequest`
    naming the field otherwise."""
    try:
        obj = raw if isinstance(raw, dict) else json.loads(raw)
    except RecursionError:
        raise BadRequest("body", "body is nested too deeply to be a request (JSON depth over ~1000)") from None
    except UnicodeDecodeError as e:
        raise BadRequest("body", f"body is not valid UTF-8: {e.reason} at byte {e.start}") from None
    except ValueError as e:
        raise BadRequest("body", f"body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequest("body", f"body must be a JSON object, got {_json_type(obj)}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise _error_of(e, model) from None
    except RecursionError:  # a deep value where a field expects a shallow one
        raise BadRequest("body", "body is nested too deeply to be a request") from None
