"""Schemathesis fuzzes every operation of the service's own OpenAPI schema through the ASGI app.

All of schemathesis' checks run (no server error, status codes, content types, headers and bodies
conforming to the schema, schema-violating requests refused, schema-valid requests accepted,
``Allow`` on 405, auth). The number of examples is bounded so the module runs in well under a
minute on two cores.

Nothing is excluded and no check is turned off; 413 is added to the statuses that count as
refusing a schema-violating request (below). One thing the schema cannot say is taught to the generator instead: a file
part or raw body declared ``format: binary`` must be an *image* (JPEG, PNG, ...), which JSON
Schema cannot express, so schema-valid ("positive") bodies are drawn from real encoded images;
arbitrary bytes are the corpus of ``test_hostile_input.py`` and schemathesis' negative phase.

The app is built at import (schemathesis loads the schema from the app when it collects the
test); schemathesis starts its lifespan once, so the package loads once for the module.
"""

from __future__ import annotations

import io

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client import CollectorRegistry
from schemathesis.checks import positive_data_acceptance

from service.app import create_app
from service.settings import Settings
from tests.conftest import SHIPPED_PACKAGE

TOKEN = "fuzz-admin-token"
EXAMPLES = 25  # per operation and phase: ~14 operations, < 60 s on 2 busy cores


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """Small images in every accepted format and the common modes."""
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P"]))
    if fmt in ("JPEG", "BMP") and mode in ("RGBA", "P"):
        mode = "RGB"
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    colour = tuple(draw(st.integers(0, 255)) for _ in range(3))
    img = Image.new("RGB", size, colour).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


schemathesis.openapi.format("binary", images())

app = create_app(Settings(model_dir=SHIPPED_PACKAGE, admin_token=TOKEN),
                 registry=CollectorRegistry())
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
# A request over a documented limit (more `file` items than `maxItems`) violates the schema and is
# refused, with 413 Content Too Large (RFC 9110), the precise status for a payload limit; the
# check's default list of refusal statuses lacks it.
negative = schema.config.checks.negative_data_rejection
negative.expected_statuses = [*negative.expected_statuses, "413"]

# Two refusals of schema-valid requests that no OpenAPI schema can express, so positive-data
# acceptance is not asked of them (every other check still runs on their responses): OpenAPI has no
# way to say that query parameters exclude each other (`tau` and the `target_*` ones), and whether a
# target is reachable depends on the loaded package's τ sweep. Request bodies say "exactly one" in
# their schema (oneOf), so nothing is excused there.
SWEEP_DEPENDENT = ("conflicting_parameters", "target_unreachable")
V2_SWEEP_DEPENDENT = ("give tau or a target", "give at most one of target_", "no τ in")


def refused_for_what_no_schema_says(response) -> bool:
    if response.status_code not in (400, 422):
        return False
    error = response.json().get("error")
    if isinstance(error, dict):  # the service's own shape
        return error.get("code") in SWEEP_DEPENDENT
    return isinstance(error, str) and error.startswith(V2_SWEEP_DEPENDENT)  # V2's shape


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)
def test_api_conforms_to_its_schema(case):
    # The token lets the admin bodies be fuzzed too; the auth checks also send requests without it.
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = case.call(headers=headers)
    excused = [positive_data_acceptance] if refused_for_what_no_schema_says(response) else None
    case.validate_response(response, headers=headers, excluded_checks=excused)


def test_fuzzing_reached_the_model_and_no_server_error():
    """After the fuzzing above: schema-valid images were classified, and nothing answered 5xx."""
    counts: dict[tuple[str, str], float] = {}
    for metric in app.state.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "cpcnn_requests_total":
                key = (sample.labels["endpoint"], sample.labels["status"])
                counts[key] = counts.get(key, 0) + sample.value
    if not counts:
        pytest.skip("run together with test_api_conforms_to_its_schema")
    assert counts.get(("/classify", "200"), 0) > 0, counts
    assert not [key for key in counts if key[1].startswith("5")], counts
