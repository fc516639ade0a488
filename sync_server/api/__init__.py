"""The HTTP API: one router per area, all under /v1/ (plus /healthz, /readyz, /metrics).

    admin.py      publish, models, versions, channels and rollouts, devices, telemetry summary
    devices.py    enrol, assignment (ETag/304), event stream (SSE), status and telemetry reports
    artifacts.py  content-addressed downloads with Range and ETag
    predict.py    the full-model fallback
    ops.py        health, readiness, Prometheus metrics
    auth.py       bearer tokens: admin, device, or either
    errors.py     every error as {"error": {"code", "message"}}
"""
