"""``/leases``: interactive clients hold devices for a while (renewable, expiring).

A lease's holder is the body's ``owner`` or, if absent, the caller's X-Labd-Owner principal.
Commands from that principal then pass the core's ownership check; everybody else gets 409.
Leases touch no device code, so these handlers answer on the loop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from starlette.responses import Response

from labd.errors import InvalidArgumentError
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


async def create_lease(body: LeaseRequest, ctx: Ctx, actor: RemoteActor) -> Response:
    """Lease devices to ``owner`` (409 DeviceBusyError if one is owned)."""
    owner = body.owner or actor.principal
    if not owner:
        raise InvalidArgumentError(
            "A lease needs an owner: send \"owner\" in the body or an X-Labd-Owner header.")
    lease = ctx.daemon.claim(body.device_ids, owner, body.ttl)
    return json_response(lease.to_dict(), status_code=201)


async def renew_lease(lease_id: LeaseIdPath, ctx: Ctx, body: RenewRequest | None = None) -> Response:
    """Push the lease's expiry ``ttl`` seconds into the future (default: its original ttl)."""
    lease = ctx.daemon.get_lease(lease_id)
    lease.renew(body.ttl if body is not None else None)
    return json_response(lease.to_dict())


async def end_lease(lease_id: LeaseIdPath, ctx: Ctx, reason: ReasonQuery = None) -> Response:
    """Release the lease (holder), or break it with ``?reason=`` (admin)."""
    lease = ctx.daemon.get_lease(lease_id)
    if reason is None:
        lease.release()
    else:
        ctx.daemon.break_lease(lease_id, reason)
    return json_response(lease.to_dict())


ROUTES = [
    RouteSpec("GET", "/leases", list_leases),
    RouteSpec("POST", "/leases", create_lease, 201),
    RouteSpec("POST", "/leases/{lease_id}/renew", renew_lease),
    RouteSpec("DELETE", "/leases/{lease_id}", end_lease),
]
