"""edge_runtime.agent: `edge-agent`, the manager that keeps a device on its assigned model.

In TF Serving's words: the sync server is the *source* of aspired versions (pushed as Server-Sent
Events, or polled with ETag), this agent is the *manager* with an availability-preserving policy
(load the new version, smoke-test it, swap it in between requests, then unload the old one), and
`Servable` around a TFLite interpreter is what the *loader* builds. Reports travel through a durable
SQLite outbox. Nothing here imports TensorFlow.

    from edge_runtime.agent import Agent, AgentOptions, ServeOptions
    with Agent.create_from_options(AgentOptions(serve=ServeOptions(port=8765))) as agent:
        ...   # POST photos to agent.url + "/classify"
"""

from .config import AgentPaths, Identity, load_identity
from .daemon import Agent
from .enroll import enroll
from .errors import (
    AgentError,
    DownloadError,
    NotEnrolledError,
    ServerRejectedError,
    ServerUnreachableError,
    UpdateRefusedError,
)
from .options import AgentOptions, HealthPolicy, RetryOptions, ServeOptions, TimeoutOptions
from .servable import Servable, ServableHandle, make_loader

__all__ = [
    "Agent",
    "AgentError",
    "AgentOptions",
    "AgentPaths",
    "DownloadError",
    "HealthPolicy",
    "Identity",
    "NotEnrolledError",
    "RetryOptions",
    "Servable",
    "ServableHandle",
    "ServeOptions",
    "ServerRejectedError",
    "ServerUnreachableError",
    "TimeoutOptions",
    "UpdateRefusedError",
    "enroll",
    "load_identity",
    "make_loader",
]
