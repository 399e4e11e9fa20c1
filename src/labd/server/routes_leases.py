"""``/leases``: interactive clients hold devices for a while (renewable, expiring).

A lease's holder is the body's ``owner`` or, if absent, the caller's X-Labd-Owner principal.
Commands from that principal then pass the core's ownership check; everybody else gets 409.
With bearer tokens (:mod:`labd.server.auth`) the holder is always the token's user, and
renewing or ending someone else's lease, or ending one with ``?reason=``, is breaking it:
admins only. Leases touch no device code, so these handlers answer on the loop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from starlette.responses import Response

from labd.errors import InvalidArgumentError
from labd.ownership import Lease
from labd.server.auth import Caller, Token
from labd.server.errors import Forbidden
from labd.server.models import Ctx, LeaseIdPath, LeaseRequest, RemoteActor, RenewRequest
from labd.server.routing import RouteSpec, json_response

__all__ = ["ROUTES"]

ReasonQuery = Annotated[
    str | None,
    Query(min_length=1, max_length=512,
          description="Break the lease as an admin, recording why (instead of releasing it)."),
]


async def list_leases(ctx: Ctx) -> Response:
    """Active leases."""
    return json_response({"leases": [lease.to_dict() for lease in ctx.daemon.leases()]})


def _check_holder(caller: Token | None, requested: str | None) -> None:
    # With tokens a lease is always the caller's own: naming someone else would impersonate.
    if caller is not None and requested is not None and requested != caller.user:
        raise Forbidden(
            f"A lease is held by the token's user ({caller.user!r}); it cannot be claimed for "
            f"{requested!r}. Omit \"owner\" or send {caller.user!r}.")


def _check_breaker(caller: Token | None, lease: Lease, breaking: bool, action: str) -> None:
    if caller is not None and (breaking or lease.holder != caller.user):
        caller.require("admin", f"{action} lease {lease.lease_id!r} of {lease.holder!r}")


async def create_lease(
    body: LeaseRequest, ctx: Ctx, actor: RemoteActor, caller: Caller,
) -> Response:
    """Lease devices to ``owner`` (409 DeviceBusyError if one is owned)."""
    _check_holder(caller, body.owner)
    owner = body.owner or actor.principal
    if not owner:
        raise InvalidArgumentError(
            "A lease needs an owner: send \"owner\" in the body or an X-Labd-Owner header.")
    lease = ctx.daemon.claim(body.device_ids, owner, body.ttl)
    return json_response(lease.to_dict(), status_code=201)


async def renew_lease(
    lease_id: LeaseIdPath, ctx: Ctx, caller: Caller, body: RenewRequest | None = None,
) -> Response:
    """Push the lease's expiry ``ttl`` seconds into the future (default: its original ttl)."""
    lease = ctx.daemon.get_lease(lease_id)
    _check_breaker(caller, lease, False, "renewing")
    lease.renew(body.ttl if body is not None else None)
    return json_response(lease.to_dict())


async def end_lease(
    lease_id: LeaseIdPath, ctx: Ctx, caller: Caller, reason: ReasonQuery = None,
) -> Response:
    """Release the lease (holder), or break it with ``?reason=`` (admin)."""
    lease = ctx.daemon.get_lease(lease_id)
    breaking = reason is not None or (caller is not None and lease.holder != caller.user)
    _check_breaker(caller, lease, breaking, "breaking")
    if not breaking:
        lease.release()
    else:
        by = f"broken by admin {caller.user!r}" if caller is not None else "broken by an admin"
        ctx.daemon.break_lease(lease_id, reason or by)
    return json_response(lease.to_dict())


ROUTES = [
    RouteSpec("GET", "/leases", list_leases),
    RouteSpec("POST", "/leases", create_lease, 201),
    RouteSpec("POST", "/leases/{lease_id}/renew", renew_lease),
    RouteSpec("DELETE", "/leases/{lease_id}", end_lease),
]
