"""The Responses API's memory: stored responses, and the events of background ones.

A response created with ``store`` (true by default) is kept from the moment it is admitted: while
it runs, ``GET /v1/responses/{id}`` reads it as it stands (``queued`` / ``in_progress``, the output
items finished so far); once it finished, its conversation is what ``previous_response_id``
continues. The last ``STORED_RESPONSES`` are kept; running ones are the last to go.

A ``background`` response runs detached from the request that created it: its events go to an
``EventLog`` that any number of clients follow, from the start or resuming after a sequence
number (``GET /v1/responses/{id}?stream=true&starting_after=N``), and ``cancel`` stops it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from serving.entrypoints.api_error import ApiError

STORED_RESPONSES = 1024  # responses kept for retrieval and previous_response_id
RUNNING = ("queued", "in_progress")


def is_reference(item: Any) -> bool:
    """An ``item_reference`` input item (its ``type`` may be left out: ``{"id": ...}``)."""
    return isinstance(item, dict) and (item.get("type") == "item_reference" or (
        item.get("type") is None and set(item) <= {"id", "type"} and "id" in item))


class EventLog:
    """A background response's stream events, in order (``sequence_number`` is the index)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.closed = False
        self._changed = asyncio.Event()

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int = -1) -> AsyncIterator[dict[str, Any]]:
        """The events after sequence number ``after``: those logged, then each as it comes,
        until the response ends."""
        i = max(after + 1, 0)
        while True:
            changed = self._changed  # taken first: an event added while we yield wakes it
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.closed:
                return
            await changed.wait()


@dataclasses.dataclass
class Stored:
    """One stored response: the live response object (updated as it runs), its input items,
    and once finished the chat messages a follow-up continues."""

    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]] | None = None  # set when it finished
    log: EventLog | None = None  # a background response's events
    task: asyncio.Task | None = None  # a background response's run
    watch: Any = None  # the run's ``Watchdog`` (server_state), while it runs
    left: bool = False  # a foreground response's client left before it finished

    @property
    def abandoned(self) -> bool:
        """A foreground response whose client left before it finished (it was aborted)."""
        return self.conversation is None and self.log is None and (
            self.left or (self.watch is not None and self.watch.disconnected))

    @property
    def running(self) -> bool:
        return self.response["status"] in RUNNING

    async def cancel(self) -> None:
        """Stop a background run: its engine request is aborted, its admission given back, its
        status ``cancelled`` and its event log closed (a finished one is left as it is)."""
        if self.task is None or self.task.done():
            return
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if self.running:
            self.response["status"] = "cancelled"
        self.log.close()
        await self.watch.stop()  # where the run was cancelled before it began


class ResponseStore:
    """The last ``limit`` stored responses by id, the oldest finished one dropped first."""

    def __init__(self, limit: int = STORED_RESPONSES):
        self.limit = limit
        self.items: OrderedDict[str, Stored] = OrderedDict()
        self.tasks: set[asyncio.Task] = set()  # background runs, held until they end

    def start(self, stored: Stored, run: Coroutine[Any, Any, None]) -> None:
        """Run ``run`` in the background as ``stored``'s task."""
        stored.task = asyncio.create_task(run)
        self.tasks.add(stored.task)
        stored.task.add_done_callback(self.tasks.discard)

    def put(self, stored: Stored) -> None:
        self.items[stored.response["id"]] = stored
        while len(self.items) > self.limit:
            oldest = next((k for k, s in self.items.items() if not s.running),
                          next(iter(self.items)))
            del self.items[oldest]

    def get(self, response_id: str, param: str = "response_id") -> Stored:
        stored = self.items.get(response_id)
        if stored is not None and stored.abandoned:
            self.discard(response_id)
            stored = None
        if stored is None:
            raise ApiError(404, f"Response with id '{response_id}' not found (responses are "
                           f"kept in this server's memory, the last {self.limit}, when created "
                           "with store true)", param, "response_not_found")
        return stored

    def conversation(self, response_id: str) -> list[dict[str, Any]]:
        """The conversation ``previous_response_id`` continues: a finished response's."""
        stored = self.get(response_id, "previous_response_id")
        if stored.conversation is None:
            status = stored.response["status"]
            raise ApiError(400, f"previous response '{response_id}' is {status}; only a "
                           "completed or incomplete response can be continued",
                           "previous_response_id", "invalid_value")
        return stored.conversation

    def resolve(self, items: str | list[Any]) -> str | list[Any]:
        """``input`` with each ``item_reference`` (``{"type": "item_reference", "id"}``)
        replaced by the stored item it names: an input item or an output item of a stored
        response (a 400 on ``input`` when none is stored under that id)."""
        if isinstance(items, str) or not any(map(is_reference, items)):
            return items
        known = {item["id"]: item for stored in self.items.values()
                 for item in stored.input_items + stored.response["output"] if "id" in item}
        resolved = []
        for i, item in enumerate(items):
            if is_reference(item):
                if not isinstance(item.get("id"), str):
                    raise ApiError(400, f"input[{i}].id must be a string (the id of a stored "
                                   "item)", "input", "invalid_value")
                found = known.get(item["id"])
                if found is None:
                    raise ApiError(400, f"input[{i}]: no stored item with id "
                                   f"{item.get('id')!r} (items of the responses this server "
                                   "keeps can be referenced)", "input", "invalid_value")
                item = {k: v for k, v in found.items() if k != "status"}
            resolved.append(item)
        return resolved

    def discard(self, response_id: str) -> None:
        self.items.pop(response_id, None)

    async def delete(self, response_id: str) -> None:
        """Forget a response (a running background one is cancelled first)."""
        await self.get(response_id).cancel()
        self.discard(response_id)
