"""kopf handlers for Zmachines: admission already checked the spec, these drive it to reality."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf
import pydantic
import structlog

from controller.api.zmachine import GROUP, PLURAL, VERSION, Phase, ZmachineSpec
from controller.operator import conditions, metrics

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

FINALIZER = f"{GROUP}/finalizer"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own identity, so that other kopf operators on the cluster never collide with us.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Events are posted explicitly on transitions; kopf's per-handler chatter is not useful.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def _bound(meta: Mapping[str, Any]) -> structlog.stdlib.BoundLogger:
    return log.bind(namespace=meta.get("namespace"), name=meta.get("name"), uid=meta.get("uid"))


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@kopf.on.resume(GROUP, VERSION, PLURAL)
def reconcile(
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
    body: kopf.Body,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    started = time.monotonic()
    logger = _bound(meta)
    generation = meta.get("generation")
    existing = list(status.get("conditions") or [])
    try:
        ZmachineSpec.model_validate(dict(spec))
    except pydantic.ValidationError as exc:
        message = f"spec is invalid: {_first_error(exc)}"
        logger.warning("invalid spec", error=message)
        _set_phase(patch, body, status, Phase.FAILED, "InvalidSpec", message)
        patch.status["conditions"] = conditions.set_condition(
            existing, conditions.READY, False, "InvalidSpec", message, generation
        )
        metrics.RECONCILES.labels(result="invalid").inc()
        raise kopf.PermanentError(message) from exc

    # No node agent is wired in yet: accept the object and say what it waits for.
    message = "accepted; waiting for a node agent to schedule it"
    patch.status["conditions"] = conditions.set_condition(
        existing, conditions.SCHEDULED, False, "NoNodes", message, generation
    )
    patch.status["observedGeneration"] = generation
    _set_phase(patch, body, status, Phase.PENDING, "Accepted", message)
    logger.info("reconciled", phase=Phase.PENDING.value)
    metrics.RECONCILES.labels(result="ok").inc()
    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def release(meta: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
    _bound(meta).info("released")
    kopf.event(body, type="Normal", reason="Deleted", message="Zmachine released")


@kopf.on.event(GROUP, VERSION, PLURAL)
def track_phase(event: Mapping[str, Any], meta: Mapping[str, Any], **_: Any) -> None:
    uid = str(meta.get("uid"))
    if event.get("type") == "DELETED":
        metrics.PHASES.observe(uid, None)
        return
    obj = event.get("object") or {}
    metrics.PHASES.observe(uid, (obj.get("status") or {}).get("phase"))


def _set_phase(
    patch: kopf.Patch,
    body: kopf.Body,
    status: Mapping[str, Any],
    phase: Phase,
    reason: str,
    message: str,
) -> None:
    patch.status["phase"] = phase.value
    patch.status["message"] = message
    if status.get("phase") != phase.value:
        kind = "Warning" if phase in (Phase.FAILED, Phase.UNKNOWN) else "Normal"
        kopf.event(body, type=kind, reason=reason, message=f"{phase.value}: {message}")


def _first_error(exc: pydantic.ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"spec.{where}: {err['msg']}"
