"""Typed errors of the console server, each one a Kubernetes Status (mapped in server.py)."""

from __future__ import annotations


class ConsoleError(Exception):
    code = 500
    reason = "InternalError"


class BadRequest(ConsoleError):
    code = 400
    reason = "BadRequest"


class Unauthorized(ConsoleError):
    code = 401
    reason = "Unauthorized"


class Forbidden(ConsoleError):
    code = 403
    reason = "Forbidden"


class NotFound(ConsoleError):
    code = 404
    reason = "NotFound"


class Conflict(ConsoleError):
    """Not in this state (restarting a machine that is not running)."""

    code = 409
    reason = "Conflict"


class Unavailable(ConsoleError):
    """The Zmachine has no node yet or its agent does not answer."""

    code = 503
    reason = "ServiceUnavailable"
