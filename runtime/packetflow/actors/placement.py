"""Placement of actors across runtime processes sharing one store.

Members heartbeat in the store; an actor id belongs to one live member by rendezvous hashing.
An *observer* (``packetflow mcp --stdio``: no gRPC port anyone could reach) never heartbeats:
it forwards every actor to a live member and owns actors only while none is alive. Follow-ups
(``on_idle``) happen at the owner; a conversation held elsewhere relays them from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from packetflow.actors.store import ActorStore
from packetflow.actors.timing import rendezvous_owner
from packetflow.errors import PacketFlowError

log = logging.getLogger("packetflow.actors")


class FollowupSource(Protocol):
    """Streams an actor's follow-ups from the member that owns it (gRPC, set by the server)."""

    def followups(self, address: str, actor_type: str,
                  actor_id: str) -> AsyncIterator[dict[str, Any]]:
        """Each follow-up the actor sends there, until the stream is closed."""


class Placement:
    """Live members of a type in the shared store, and who owns which actor."""

    def __init__(self, actor_type: str, store: ActorStore, member_id: str, address: str,
                 interval: float, *, observer: bool = False,
                 rebalance: Callable[[], object] = lambda: None,
                 members_changed: Callable[[], object] = lambda: None) -> None:
        self.actor_type = actor_type
        self.store = store
        # Called every beat (an actor busy at a change moves later), and on a change.
        self.rebalance = rebalance
        self.members_changed = members_changed
        self.member_id = member_id
        self.address = address
        self.interval = interval
        self.observer = observer
        self.members: dict[str, str] = {} if observer else {member_id: address}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Join: heartbeat once, read the members, keep heart-beating."""
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Leave the group, so the others take our actors at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self.observer:
            with contextlib.suppress(PacketFlowError):
                await self.store.leave(self.member_id)

    async def refresh(self) -> bool:
        """Heartbeat (members only) and re-read the live members; True when they changed."""
        now = time.time()
        if not self.observer:
            await self.store.heartbeat(self.member_id, self.address, now)
        members = await self.store.members(now - 3 * self.interval)
        if not self.observer:
            members.setdefault(self.member_id, self.address)
        changed = members != self.members
        self.members = members
        return changed

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                if await self.refresh():
                    log.info("members changed", extra={"actor_type": self.actor_type,
                                                       "members": sorted(self.members)})
                    self.members_changed()
                self.rebalance()
            except Exception as exc:  # the heartbeat must outlive any error
                log.warning("placement heartbeat failed: %s", exc)

    def owner(self, actor_id: str) -> str:
        """The member that owns ``actor_id`` (this one when no member is alive)."""
        return rendezvous_owner(actor_id, self.members) or self.member_id

    def owns(self, actor_id: str) -> bool:
        """Whether this member owns ``actor_id``."""
        return self.owner(actor_id) == self.member_id

    def forward_address(self, actor_id: str) -> str | None:
        """The owner's address when it is another member, else None."""
        owner = self.owner(actor_id)
        return None if owner == self.member_id else self.members[owner]

    async def relay_followups(self, actor_id: str, queue: asyncio.Queue[dict[str, Any]],
                              source: FollowupSource) -> None:
        """Put the follow-ups of ``actor_id`` into ``queue`` while another member owns it,
        following the actor when it moves (cancel to stop). Those made here arrive through
        the local subscription, so this relays only from elsewhere."""
        relay: asyncio.Task[None] | None = None
        following: str | None = None
        try:
            while True:
                address = self.forward_address(actor_id)
                if address != following or (relay is not None and relay.done()):
                    if relay is not None:
                        relay.cancel()
                    following, relay = address, None
                    if address is not None:
                        relay = asyncio.create_task(
                            self._relay(address, actor_id, queue, source))
                await asyncio.sleep(self.interval)  # membership is re-read this often
        finally:
            if relay is not None:
                relay.cancel()

    async def _relay(self, address: str, actor_id: str, queue: asyncio.Queue[dict[str, Any]],
                     source: FollowupSource) -> None:
        try:
            async for followup in source.followups(address, self.actor_type, actor_id):
                queue.put_nowait(followup)
        except PacketFlowError as exc:  # the owner went away; the loop above reconnects
            log.info("follow-ups of %s/%s from %s ended: %s", self.actor_type, actor_id,
                     address, exc)
