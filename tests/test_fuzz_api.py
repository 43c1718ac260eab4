"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis, in process over ASGI).

Every operation gets generated requests (valid and invalid); every response must match the schema
and none may be a 5xx, except the deliberate 503 (with ``Retry-After``) a model outage gives. The
app runs with its real knowledge base (tiny CLIP, embedded Qdrant) and a scripted vLLM: one app
whose model answers, one whose model is down (every model call a deliberate 503).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from server.app import create_app
from tests.support.fake_vllm import FakeVLLM
from tests.support.settings import make_settings
from tests.support.tiny_clip import write_tiny_clip_config

# Deliberate "try again later" answers: upstream down or overloaded, always with Retry-After.
_DELIBERATE_503 = {"model_unavailable", "overloaded", "store_unavailable", "upstream_unavailable", "not_ready"}
MAX_EXAMPLES = 25


@schemathesis.check
def no_unplanned_server_error(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> bool:
    """No 5xx, except a 503 with Retry-After whose error code says the upstream is unavailable."""
    if response.status_code < 500:
        return True
    if response.status_code == 503 and "retry-after" in {k.lower() for k in response.headers}:
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if code in _DELIBERATE_503:
            return True
    raise AssertionError(f"unplanned server error {response.status_code}: {response.text[:500]}")


def _schema(model_up: bool) -> schemathesis.schemas.BaseSchema:
    """The app's schema over ASGI. Built at import (schemathesis' lazy fixture loader breaks on pytest 9):
    cheap, because the app loads its models only when schemathesis first starts its lifespan."""
    fake = FakeVLLM()
    fake.down = not model_up
    root = Path(tempfile.mkdtemp(prefix="vlmrag-fuzz-"))
    settings = make_settings(
        root / "data", write_tiny_clip_config(root / "clip"),
        rate_limit_burst=1_000_000, vllm_retry_attempts=1, vllm_deadline_s=2.0,
        # small limits keep generated bodies cheap while still exercising the refusals
        limit_message_chars=2000, limit_max_tokens=256,
    )
    # The app builds its own knowledge base in its lifespan, on schemathesis' event loop.
    app = create_app(settings, vllm_transport=httpx.MockTransport(fake))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema_model_up = _schema(model_up=True)
schema_model_down = _schema(model_up=False)
_FUZZ = hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
# Excluded: the stock 5xx check (replaced by ours above); negative_data_rejection (pydantic's lax mode
# accepts 0 for false and "1" for 1 on purpose); positive_data_acceptance (semantic rules and the
# settings-dependent caps, e.g. "a user message needs content", cannot be written in one schema).
_CHECKS = {
    "excluded_checks": [not_a_server_error, negative_data_rejection, positive_data_acceptance],
    "additional_checks": [no_unplanned_server_error],
}


@schema_model_up.parametrize()
@_FUZZ
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(**_CHECKS)


@schema_model_down.parametrize()
@_FUZZ
def test_api_with_the_model_down_fails_only_deliberately(case: schemathesis.Case) -> None:
    case.call_and_validate(**_CHECKS)


# Stateful: sequences of calls chained through links schemathesis infers from the schema
# (e.g. POST /v1/snippets -> GET/DELETE /v1/snippets/{id}), under the same checks.
class APIWorkflow(schema_model_up.as_state_machine()):  # type: ignore[misc]
    def validate_response(self, response: schemathesis.Response, case: schemathesis.Case,
                          additional_checks: list[object] | None = None, **kwargs: object) -> None:
        case.validate_response(response, excluded_checks=_CHECKS["excluded_checks"],
                               additional_checks=[*_CHECKS["additional_checks"], *(additional_checks or [])],
                               transport_kwargs=kwargs or None, recorder=self.recorder)


TestAPIWorkflow = APIWorkflow.TestCase
TestAPIWorkflow.settings = hypothesis_settings(
    max_examples=10, stateful_step_count=6, deadline=None, suppress_health_check=list(HealthCheck),
)
