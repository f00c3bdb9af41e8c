"""Schema-based fuzzing of the reward server (schemathesis, bounded for CI): bodies generated from the server's own
OpenAPI spec, valid and invalid, over real HTTP. Every answer must be documented in the spec (status, content
type, body schema), no input may produce a 5xx, a body the schema rejects must get a 4xx, and an endpoint that
declares the key must refuse a request without it."""

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
pytest_plugins = ["serve_helpers"]  # the ckpt fixture
pytest.register_assert_rewrite("serve_helpers")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from serve_helpers import AUTH, KEY, LIMITS, ServerThread  # noqa: E402

from fastrm.serve import RewardService, ServeConfig  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]
EXAMPLES = 30  # per operation and mode: ~250 requests, ~10 s on a tiny model


def test_generated_requests_get_documented_answers_and_never_a_5xx(ckpt):
    srv = ServerThread(RewardService.load(ServeConfig(model=str(ckpt), api_key=KEY, **LIMITS)))
    try:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json", headers=AUTH)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {"POST /score", "POST /get_reward", "POST /classify"}
        statuses: dict[str, set[int]] = {}
        for op in operations:
            # invalid data only where there is a body to break (GET /health has nothing to generate)
            modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
            for mode in modes:

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    database=None,
                    derandomize=True,  # the same cases on every CI run
                    suppress_health_check=list(HealthCheck),
                )
                def run(case):
                    response = case.call(base_url=srv.url, headers=AUTH)
                    statuses.setdefault(case.operation.label, set()).add(response.status_code)
                    case.validate_response(response, checks=CHECKS, headers=AUTH)

                run()
    finally:
        srv.stop()
    # the fuzzer reached the model (200) and the validation (400) of every scoring endpoint
    for label in ("POST /score", "POST /get_reward", "POST /classify"):
        assert {200, 400} <= statuses[label], (label, statuses[label])
