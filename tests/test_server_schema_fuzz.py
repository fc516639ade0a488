"""A bounded schemathesis run over the server's OpenAPI, inside the suite: no input gives a 5xx, and
every status a route answers is one its OpenAPI declares (with the declared body and content type).
Both valid inputs (within every bound) and invalid ones (out of bounds, wrong types) are generated.

The server is real (uvicorn on 127.0.0.1, a SQLite file and a PostgreSQL schema); calls carry the token
each route wants: the admin token, a device's token (its own id in device paths, half of the time the
real model name), the enrolment secret. A few examples per operation keep it well under a minute.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra: pip install -e '.[dev]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.server_fixtures import (  # noqa: E402,F401  (fixtures)
    ADMIN_TOKEN,
    ENROLLMENT_SECRET,
    MODEL,
    _drop_postgres_at_exit,
    db_url,
    live_server,
    publisher,
    server_config,
)

# The pixel route's body is raw bytes (uint8 pixels), generated and sent as octet-stream bodies are.
schemathesis.serializer.alias("application/x-edge-pixels", "application/octet-stream")

EXAMPLES_PER_OPERATION = 12  # valid and invalid inputs (schemathesis' positive and negative modes)
#: Streams that never end (an SSE stream to the caller's own id) are tested in test_server_devices.py.
ENDLESS = {("GET", "/v1/devices/{device_id}/events")}


def _checks() -> list:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _token(path: str, device) -> str:  # type: ignore[no-untyped-def]
    if path == "/v1/devices/enroll":
        return ENROLLMENT_SECRET
    if path.startswith("/v1/devices/{device_id}") or path.endswith(("/predict", "/predict/pixels")) or path.startswith("/v1/artifacts"):
        return device.token
    return ADMIN_TOKEN


def test_no_generated_request_gets_a_server_error_or_an_undeclared_status(db_url, publisher, tmp_path):
    config = server_config(tmp_path / "data", db_url, publisher)
    if hasattr(config, "throttle"):  # reports and predictions come faster than a device would send them
        config = dataclasses.replace(config, throttle=dataclasses.replace(config.throttle, enabled=False))
    with live_server(config) as server:
        server.publish_ok(publisher, 1, 2, channel="stable")
        device = server.enroll()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        from schemathesis import GenerationMode

        checks = _checks()
        cases = 0
        statuses: dict[int, int] = {}
        failures: list[str] = []
        for result in schema.get_all_operations():
            operation = result.ok()
            if (operation.method.upper(), operation.path) in ENDLESS:
                continue
            token = _token(operation.path, device)

            strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

            @given(case=strategy, real_names=st.booleans())
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case, real_names: bool) -> None:  # type: ignore[no-untyped-def]
                nonlocal cases
                if case.path_parameters:
                    if "device_id" in case.path_parameters and token == device.token:
                        case.path_parameters["device_id"] = device.id
                    if "name" in case.path_parameters and real_names:
                        case.path_parameters["name"] = MODEL
                response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
                cases += 1
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                try:
                    case.validate_response(response, checks=checks)
                except BaseExceptionGroup as exc:  # schemathesis raises a group of check failures
                    failures.append(f"{operation.method.upper()} {operation.path} -> {response.status_code}: {str(exc)[:600]}")

            run()
        print(f"schemathesis: {cases} cases, statuses {dict(sorted(statuses.items()))}")
        server_errors = sum(n for status, n in statuses.items() if status >= 500)
        assert cases >= 100 and server_errors == 0 and not failures, "\n".join(failures[:10])
