"""Typed errors of the node agent; the servicer maps each to one gRPC status code."""

from __future__ import annotations

import grpc


class AgentError(Exception):
    """Base class of every error the agent reports to its caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidSpec(AgentError):
    """The request cannot ever succeed as written (bad field, forbidden path)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class MachineNotFound(AgentError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, uid: str) -> None:
        super().__init__(f"no zmachine with uid {uid!r} on this node")
        self.uid = uid


class FailedPrecondition(AgentError):
    """The request is valid but not in the machine's current state (stale generation...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(AgentError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(AgentError):
    """The node cannot run the VM right now (no hypervisor, mount or VMM failure)."""

    code = grpc.StatusCode.UNAVAILABLE


class ProvisionFailed(AgentError):
    """A Deploy step failed; everything the Deploy created has been cleaned up.

    Keeps the status code of a typed cause (a bad flist layout stays INVALID_ARGUMENT);
    anything else is UNAVAILABLE: the node could not do it now.
    """

    def __init__(self, what: str, step: str, cause: BaseException, log_tail: str = "") -> None:
        detail = f"{what}: {step} failed: {cause}"
        if log_tail:
            detail += f"\n--- VM log tail ---\n{log_tail}"
        super().__init__(detail)
        self.code = cause.code if isinstance(cause, AgentError) else grpc.StatusCode.UNAVAILABLE
