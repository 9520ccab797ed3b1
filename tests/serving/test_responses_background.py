"""Background responses (``background: true``) and stored responses read while they run, through
the ``openai`` SDK over the fake engine: a background response answers ``queued`` at once, runs
on without its client, is read back, streamed again from any sequence number and cancelled."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest

from serving.core.request_outcomes import RequestFailedError
from serving.entrypoints.responses_store import EventLog, Stored
from tests.serving.fake_engine import REPLY, FakeEngine, client, serve, wait_for

STOP = {"stop": ["."]}  # the reply ends at "The answer is 42"


@pytest.fixture(scope="module")
def slow():
    engine = FakeEngine(delay=0.02, max_model_len=400)
    with serve(engine, request_timeout_s=30) as running:
        running.engine = engine
        yield running


@pytest.fixture(scope="module")
def sdk(slow) -> openai.OpenAI:
    return client(slow)


def done(sdk, response_id: str) -> bool:
    return sdk.responses.retrieve(response_id).status not in ("queued", "in_progress")


def test_a_background_response_is_queued_then_read_back_as_the_foreground_one(slow, sdk):
    whole = sdk.responses.create(model="fake", input="hi", extra_body=STOP)
    r = sdk.responses.create(model="fake", input="hi", extra_body=STOP, background=True)
    assert r.status == "queued" and r.background and r.output == []
    assert wait_for(lambda: done(sdk, r.id))
    got = sdk.responses.retrieve(r.id)
    assert got.status == "completed" and got.background
    assert got.output_text == whole.output_text == "The answer is 42"
    assert got.usage.output_tokens == whole.usage.output_tokens
    assert [i.content[0].text for i in sdk.responses.input_items.list(r.id).data] == ["hi"]
    follow = sdk.responses.create(model="fake", input="more", previous_response_id=r.id,
                                  extra_body=STOP)
    assert follow.status == "completed"
    assert slow.engine.admission.requests == 0
    with pytest.raises(openai.BadRequestError) as error:
        sdk.responses.create(model="fake", input="hi", background=True, store=False)
    assert error.value.param == "store"


def test_a_running_background_response_is_cancelled(slow, sdk):
    r = sdk.responses.create(model="fake", input="hi", max_output_tokens=300, background=True)
    assert wait_for(lambda: sdk.responses.retrieve(r.id).status == "in_progress")
    cancelled = sdk.responses.cancel(r.id)
    assert cancelled.status == "cancelled" and cancelled.id == r.id
    assert f"{r.id}-0" in slow.engine.aborted
    assert wait_for(lambda: slow.engine.admission.requests == 0)
    assert sdk.responses.retrieve(r.id).status == "cancelled"
    assert sdk.responses.cancel(r.id).status == "cancelled"  # again: as it is
    with pytest.raises(openai.BadRequestError) as error:
        sdk.responses.create(model="fake", input="x", previous_response_id=r.id)
    assert error.value.param == "previous_response_id" and "cancelled" in error.value.message
    finished = sdk.responses.create(model="fake", input="hi", extra_body=STOP, background=True)
    assert wait_for(lambda: done(sdk, finished.id))
    assert sdk.responses.cancel(finished.id).status == "completed"  # too late: left as it is
    foreground = sdk.responses.create(model="fake", input="hi", extra_body=STOP)
    with pytest.raises(openai.BadRequestError):
        sdk.responses.cancel(foreground.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.cancel("resp_nope")
    running = sdk.responses.create(model="fake", input="hi", max_output_tokens=300,
                                   background=True)
    sdk.responses.delete(running.id)  # a running one is cancelled, then forgotten
    assert f"{running.id}-0" in slow.engine.aborted
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(running.id)


def test_a_background_stream_runs_on_without_its_client_and_resumes(slow, sdk):
    stream = sdk.responses.create(model="fake", input="hi", max_output_tokens=40,
                                  background=True, stream=True)
    first = []
    for event in stream:
        first.append(event)
        if len(first) == 6:
            break
    stream.close()  # the client leaves; the response runs on
    response_id = first[0].response.id
    assert first[0].type == "response.created" and first[0].response.status == "queued"
    assert first[1].type == "response.queued" and first[1].response.status == "queued"
    assert first[2].type == "response.in_progress"
    assert first[2].response.status == "in_progress"
    assert wait_for(lambda: done(sdk, response_id))
    assert sdk.responses.retrieve(response_id).output_text == (REPLY * 2)[:40]
    rest = list(sdk.responses.retrieve(response_id, stream=True, starting_after=5))
    events = first + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed" and events[-1].response.status == "incomplete"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == (REPLY * 2)[:40] == events[-1].response.output_text
    again = list(sdk.responses.retrieve(response_id, stream=True))
    assert [e.type for e in again] == [e.type for e in events]
    assert list(sdk.responses.retrieve(response_id, stream=True,
                                       starting_after=len(events) - 1)) == []


def test_a_stored_foreground_response_reads_back_while_it_streams(slow, sdk):
    stream = sdk.responses.create(model="fake", input="hi", max_output_tokens=60, stream=True)
    events = iter(stream)
    response_id = next(events).response.id
    while next(events).type != "response.output_text.delta":
        pass
    running = sdk.responses.retrieve(response_id)
    assert running.status == "in_progress" and not running.background
    with pytest.raises(openai.BadRequestError) as error:
        sdk.responses.create(model="fake", input="x", previous_response_id=response_id)
    assert "in_progress" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        list(sdk.responses.retrieve(response_id, stream=True))
    assert error.value.param == "stream"
    last = list(events)[-1]
    assert last.type == "response.completed" and last.response.status == "incomplete"
    assert sdk.responses.retrieve(response_id).output_text == last.response.output_text
    left = sdk.responses.create(model="fake", input="hi", max_output_tokens=300, stream=True)
    left_id = next(iter(left)).response.id
    left.close()  # its client left: aborted, and not kept
    assert wait_for(lambda: f"{left_id}-0" in slow.engine.aborted)
    assert wait_for(lambda: slow.engine.admission.requests == 0)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(left_id)


def test_a_background_response_past_the_request_timeout_fails():
    engine = FakeEngine(delay=0.05, max_model_len=400)
    with serve(engine, request_timeout_s=0.3) as running:
        sdk = client(running)
        r = sdk.responses.create(model="fake", input="hi", max_output_tokens=200,
                                 background=True)
        assert wait_for(lambda: done(sdk, r.id))
        got = sdk.responses.retrieve(r.id)
        assert got.status == "failed" and got.error.code == "timeout"
        assert engine.admission.requests == 0 and f"{r.id}-0" in engine.aborted


def test_a_background_response_the_engine_aborts_fails(slow, sdk):
    """What a drain that ran out of time does (``Served.abort_all``): the engine aborts the
    request; the response ends ``failed``, not ``completed`` with a cut-short text."""
    r = sdk.responses.create(model="fake", input="hi", max_output_tokens=300, background=True)
    assert wait_for(lambda: sdk.responses.retrieve(r.id).status == "in_progress")
    slow.engine.abort(f"{r.id}-0")
    assert wait_for(lambda: done(sdk, r.id))
    got = sdk.responses.retrieve(r.id)
    assert got.status == "failed" and got.error.code == "aborted"
    assert list(sdk.responses.retrieve(r.id, stream=True))[-1].type == "response.failed"


class _Watch:
    def __init__(self):
        self.stopped = 0

    async def stop(self):
        self.stopped += 1


def test_a_background_run_cancelled_before_it_began_still_ends():
    """The run's task may not have started when ``cancel`` comes: the response still ends
    ``cancelled``, its log closes and its watch stops (the engine request is aborted)."""
    async def scenario():
        started = []

        async def run():
            started.append(True)

        stored = Stored({"id": "resp_1", "status": "queued"}, [], log=EventLog())
        stored.watch, stored.task = _Watch(), asyncio.create_task(run())
        await stored.cancel()
        followed = [event async for event in stored.log.follow()]
        return started, stored, followed

    started, stored, followed = asyncio.run(scenario())
    assert started == [] and stored.response["status"] == "cancelled"
    assert stored.log.closed and followed == [] and stored.watch.stopped == 1


class GatedEngine(FakeEngine):
    """The fake engine whose requests wait at a gate before their first token, and may fail
    (``fail_after`` tokens: a ``RequestFailedError``, as the engine raises for one request)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gate = threading.Event()
        self.fail_after: int | None = None

    async def generate(self, prompt_ids, params, request_id, prompt=None, priority=0,
                       cache_salt=None):
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        if self.fail_after == 0:
            raise RequestFailedError(f"request {request_id} failed: injected")
        n = 0
        async for out in super().generate(prompt_ids, params, request_id, prompt):
            n += 1
            if self.fail_after is not None and n > self.fail_after:
                raise RequestFailedError(f"request {request_id} failed: injected")
            yield out


@pytest.fixture
def gated():
    engine = GatedEngine(delay=0.01, max_model_len=400)
    with serve(engine) as running:
        running.engine = engine
        yield running


def test_a_background_create_answers_before_the_engine_takes_it(gated):
    sdk = client(gated)
    r = sdk.responses.create(model="fake", input="hi", extra_body=STOP, background=True)
    assert r.status == "queued" and sdk.responses.retrieve(r.id).status == "queued"
    assert gated.engine.admission.requests == 1  # its room is held while it waits
    with httpx.Client(base_url=gated.url, timeout=10) as http:  # followers see it queued
        with http.stream("GET", f"/v1/responses/{r.id}", params={"stream": "true"}) as reply:
            lines = reply.iter_lines()
            seen = [json.loads(next(x for x in lines if x.startswith("data: "))[6:])
                    for _ in range(2)]
    assert [(e["type"], e["sequence_number"], e["response"]["status"]) for e in seen] == [
        ("response.created", 0, "queued"), ("response.queued", 1, "queued")]
    gated.engine.gate.set()
    assert wait_for(lambda: done(sdk, r.id))
    assert sdk.responses.retrieve(r.id).output_text == "The answer is 42"
    gated.engine.fail_after = 0  # the engine refuses it: the response fails, readable
    refused = sdk.responses.create(model="fake", input="hi", background=True)
    assert wait_for(lambda: done(sdk, refused.id))
    got = sdk.responses.retrieve(refused.id)
    assert got.status == "failed" and got.error.code == "request_failed"
    assert list(sdk.responses.retrieve(refused.id, stream=True))[-1].type == "response.failed"
    assert wait_for(lambda: gated.engine.admission.requests == 0)


def test_a_streamed_response_that_fails_stays_readable_as_failed(gated):
    gated.engine.gate.set()
    gated.engine.fail_after = 5
    sdk = client(gated)
    events = list(sdk.responses.create(model="fake", input="hi", max_output_tokens=50,
                                       stream=True))
    assert events[-1].type == "response.failed"
    got = sdk.responses.retrieve(events[0].response.id)
    assert got.status == "failed" and got.error.code == "request_failed"
    with pytest.raises(openai.APIStatusError):  # a whole one answers the error instead
        sdk.responses.create(model="fake", input="hi", max_output_tokens=50)


def test_a_cancelled_background_stream_closes_its_open_item(slow, sdk):
    r = sdk.responses.create(model="fake", input="hi", max_output_tokens=300, background=True)
    assert wait_for(lambda: sdk.responses.retrieve(r.id).status == "in_progress")
    followed = sdk.responses.retrieve(r.id, stream=True)
    seen = []
    for event in followed:
        seen.append(event.type)
        if event.type == "response.output_text.delta" and len(seen) > 8:
            sdk.responses.cancel(r.id)
    assert seen[-1] == "response.output_item.done"  # the item closed; the stream ended
    got = sdk.responses.retrieve(r.id)
    assert got.status == "cancelled" and got.output[0].status == "incomplete"
