"""``/leases``: interactive clients hold devices for a while (renewable, expiring).

A lease's holder is the body's ``owner`` or, if absent, the caller's X-Labd-Owner principal.
Commands from that principal then pass the core's ownership check; everybody else gets 409.
Every HTTP lease expires: without ``ttl`` it gets the server's ``lease_default_ttl`` (30 s),
and no lease or renewal may ask for more than ``lease_max_ttl`` (1 h), so a crashed GUI never
leaves a device stuck.

Only the holder renews or releases a lease. With bearer tokens (:mod:`labd.server.auth`) the
holder is always the token's user, and renewing or ending someone else's lease, or ending one
with ``?reason=``, is breaking it: admins only. Without tokens the holder is whoever the
X-Labd-Owner header names, which is advisory (anyone on the PC can send any name): a request
naming someone else is refused, one naming nobody is let through. Leases touch no device
code, so these handlers answer on the loop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from starlette.responses import Response

from labd.errors import InvalidArgumentError
from labd.ownership import Actor, Lease
from labd.server.auth import Caller, Token
from labd.server.context import ServerContext
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


def _check_breaker(
    caller: Token | None, actor: Actor, lease: Lease, breaking: bool, action: str,
) -> None:
    """Refuse (403, naming the holder) unless the caller may ``action`` (renew, release) it."""
    if caller is not None:
        if breaking or lease.holder != caller.user:
            doing = "renewing" if action == "renew" else "breaking"
            caller.require("admin", f"{doing} lease {lease.lease_id!r} of {lease.holder!r}")
        return
    # Without tokens X-Labd-Owner is advisory, but it still stops one client from renewing or
    # releasing another's lease by mistake. Breaking (?reason=) stays open: one PC, one user.
    principal = actor.principal
    if not breaking and principal is not None and principal != lease.holder:
        error = Forbidden(
            f"Lease {lease.lease_id!r} is held by {lease.holder!r}; X-Labd-Owner {principal!r} "
            f"cannot {action} it. Only the holder renews or releases a lease: send "
            f"X-Labd-Owner: {lease.holder}, or end it with DELETE /leases/{lease.lease_id}"
            "?reason=<why> (breaking it).")
        error.labd_context = {  # type: ignore[attr-defined]
            "lease_id": lease.lease_id, "holder": lease.holder, "principal": principal}
        raise error


def _lease_ttl(ctx: ServerContext, requested: float | None, fallback: float | None) -> float:
    """``requested`` (400 above the server's maximum), else ``fallback`` or the default, capped."""
    settings = ctx.settings
    if requested is None:
        # Not the client's choice (a lease made in-process may have a longer ttl, or none).
        chosen = settings.lease_default_ttl if fallback is None else fallback
        return min(chosen, settings.lease_max_ttl)
    if requested > settings.lease_max_ttl:
        valid = (f"at most {settings.lease_max_ttl:g} seconds (this server's lease_max_ttl); "
                 "renew the lease before it expires to hold it longer")
        error = InvalidArgumentError(f"Lease ttl {requested:g} s is too long: ask for {valid}.")
        error.labd_context = {  # type: ignore[attr-defined]
            "errors": [{"field": "body.ttl", "message": valid, "type": "less_than_equal"}],
            "max_ttl": settings.lease_max_ttl}
        raise error
    return requested


async def create_lease(
    body: LeaseRequest, ctx: Ctx, actor: RemoteActor, caller: Caller,
) -> Response:
    """Lease devices to ``owner`` for ``ttl`` seconds (default 30; 409 if a device is owned)."""
    _check_holder(caller, body.owner)
    owner = body.owner or actor.principal
    if not owner:
        raise InvalidArgumentError(
            "A lease needs an owner: send \"owner\" in the body or an X-Labd-Owner header.")
    lease = ctx.daemon.claim(body.device_ids, owner, _lease_ttl(ctx, body.ttl, None))
    return json_response(lease.to_dict(), status_code=201)


async def renew_lease(
    lease_id: LeaseIdPath, ctx: Ctx, actor: RemoteActor, caller: Caller,
    body: RenewRequest | None = None,
) -> Response:
    """Push the lease's expiry ``ttl`` seconds into the future (default: its original ttl)."""
    lease = ctx.daemon.get_lease(lease_id)
    _check_breaker(caller, actor, lease, False, "renew")
    lease.renew(_lease_ttl(ctx, body.ttl if body is not None else None, lease.ttl))
    return json_response(lease.to_dict())


async def end_lease(
    lease_id: LeaseIdPath, ctx: Ctx, actor: RemoteActor, caller: Caller,
    reason: ReasonQuery = None,
) -> Response:
    """Release the lease (holder), or break it with ``?reason=`` (admin)."""
    lease = ctx.daemon.get_lease(lease_id)
    breaking = reason is not None or (caller is not None and lease.holder != caller.user)
    _check_breaker(caller, actor, lease, breaking, "release")
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
