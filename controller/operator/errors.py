"""Typed errors of the controller, mapped once to conditions and events in reconcile."""

from __future__ import annotations


class ControllerError(Exception):
    """Base class; `reason` is the CamelCase word shown in conditions and events."""

    reason = "Error"


class AgentUnavailable(ControllerError):
    """The node agent did not answer; worth retrying."""

    reason = "AgentUnavailable"


class AgentRejected(ControllerError):
    """The node agent refused the request; retrying the same spec will not help."""

    reason = "AgentRejected"


class NodeOutOfCapacity(AgentRejected):
    """The node agent refused a Deploy for lack of memory (RESOURCE_EXHAUSTED): the
    controller's view of the node was wrong, another node may fit."""

    reason = "NodeOutOfCapacity"


class MachineNotFound(ControllerError):
    reason = "MachineNotFound"


class SecretUnavailable(ControllerError):
    """A Secret named by spec.env[].valueFrom is missing or lacks the key."""

    reason = "SecretNotFound"


class UnsupportedSpec(ControllerError):
    """The spec asks for something no node agent can do yet; refused rather than ignored."""

    reason = "Unsupported"


class NetworkUnavailable(ControllerError):
    """The ZmachineNetwork a Zmachine names does not exist (yet), or is being deleted."""

    reason = "NetworkNotFound"


class NetworkMisfit(ControllerError):
    """The spec cannot be served by its network as it stands (an ip outside the range or
    outside the node's subnet); the same spec will not get better by waiting."""

    reason = "InvalidNetworkIP"


class PublicIPExhausted(ControllerError):
    """spec.network.publicIP: every ZmachinePublicIPPool is fully held (or none exists)."""

    reason = "NoPublicIP"


class NetworkFull(ControllerError):
    """The network's range has no /24 left for one more node."""

    reason = "NetworkFull"
