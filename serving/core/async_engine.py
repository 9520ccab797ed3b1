"""The engine for asyncio callers (the HTTP server): streaming generation, aborts, admission.

Each DP group runs in its own thread; outputs travel from the group straight to the request's
asyncio queue (``loop.call_soon_threadsafe``), never through a central loop. Prompt
log-probabilities (``SamplingParams.prompt_logprobs``) are computed apart from the groups'
steps (``serving.core.prompt_scoring``), on a worker thread, before the request is submitted;
``max_tokens=0`` requests are only scored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from typing import Any

import numpy as np

from serving.core.admission import Admission
from serving.core.engine_args import EngineArgs
from serving.core.output_kinds import OutputShaper, aborted_output
from serving.core.prompt_scoring import PromptScoring, ScoringCancelled
from serving.core.request import Request
from serving.core.request_outcomes import (
    Aborted,
    DuplicateRequestError,
    EngineDeadError,
    request_failure,
)
from xds_jax.embedding import embedding_options
from xds_jax.engine_config import EngineConfig, check_priority
from xds_jax.errors import ConfigError
from xds_jax.llm import LLM
from xds_jax.outputs import RequestMetrics, RequestOutput
from xds_jax.sampling.beam_search import BeamSearch, BeamSearchParams, next_logprobs
from xds_jax.sampling.params import SamplingParams
from xds_jax.sequence import salt_bytes

IDS_KEPT = 4096  # request ids remembered: those announced (``expect``) and not yet submitted


def remember(ids: OrderedDict[str, bool], request_id: str) -> None:
    ids[request_id] = True
    while len(ids) > IDS_KEPT:
        ids.popitem(last=False)


def _discard(work: asyncio.Future) -> None:
    """Read the outcome of scoring no one waits for any more (asyncio would log an error)."""
    if not work.cancelled():
        work.exception()


ABORTED = object()  # put in a request's output queue by abort: its stream ends there


def report(loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, out: RequestOutput) -> None:
    """Hand a group's output to the request's stream, on its event loop (one that closed
    stopped reading: an aborted request's caller may have gone)."""
    try:
        loop.call_soon_threadsafe(outputs.put_nowait, out)
    except RuntimeError:  # the loop is closed
        pass


class AsyncEngine:
    """Streams ``RequestOutput``s for requests submitted from asyncio: cumulative, or as the
    request's ``SamplingParams.output_kind`` asks (``serving.core.output_kinds``)."""

    def __init__(self, llm: LLM, admission: Admission | None = None):
        self.llm = llm
        self.engine = llm.engine
        self.admission = admission or Admission(EngineArgs.max_num_queued_reqs,
                                                EngineArgs.max_num_queued_tokens)
        self.model_name = llm.model_name
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self.cfg = llm.cfg
        self.sampling_defaults = llm.sampling_defaults  # generation_config.json's (the server's)
        self._beams: dict[str, set[str]] = {}  # running beam searches: their round's requests
        # ids a caller announced (``expect``) whose ``generate`` has not submitted them yet:
        # True once aborted, so a request whose client left meanwhile is never run
        self._expected: OrderedDict[str, bool] = OrderedDict()
        # running requests' output queues: an abort ends the stream at once, not when the
        # group next steps (a stalled group steps late)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False  # shut down: new requests raise EngineDeadError
        self._starting = threading.Lock()  # a first request from two loops starts it once
        # requests whose prompt is being scored: (cancel flag, loop, future an abort cancels)
        self._scoring: dict[str, tuple[threading.Event, asyncio.AbstractEventLoop,
                                       asyncio.Future]] = {}

    @property
    def scoring(self) -> PromptScoring:
        """The prompt scorers (built on first use: most servers never score a prompt)."""
        return self.llm.scoring

    @classmethod
    def from_args(cls, args: EngineArgs) -> AsyncEngine:
        config = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
        admission = Admission(args.max_num_queued_reqs, args.max_num_queued_tokens)
        return cls(LLM(config=EngineConfig(**config)), admission)

    @property
    def scheduling_policy(self) -> str:
        """``"fcfs"`` or ``"priority"`` (``EngineConfig.scheduling_policy``)."""
        return self.llm.config.scheduling_policy

    def start(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine was shut down; it cannot be started again")
        with self._starting:  # once, whoever starts it first (a first request, the caller)
            self.engine.start()

    def shutdown(self) -> None:
        """Stop the engine: running streams end now with "abort", later ``generate`` calls
        raise ``EngineDeadError``."""
        self._closed = True
        for request_id in list(self._beams) + list(self._streams) + list(self._scoring):
            self.abort(request_id)
        self.engine.shutdown()

    def can_serve(self) -> bool:
        """A new request can run now (``Engine.can_serve``)."""
        return self.engine.can_serve()

    @property
    def is_running(self) -> bool:
        """Started and not shut down (vLLM's ``AsyncLLM.is_running``)."""
        return self.engine.started and not self._closed

    @property
    def errored(self) -> bool:
        """Running but unable to serve a request: no group in service (vLLM's name)."""
        return self.is_running and not self.can_serve()

    async def check_health(self) -> None:
        """Raise ``EngineDeadError`` unless a new request can run now (vLLM's)."""
        if self._closed or not self.can_serve():
            raise EngineDeadError("the engine cannot serve a request now")

    async def get_tokenizer(self):
        return self.tokenizer

    def stats(self) -> dict:
        """The engine's counters, the KV blocks free and in all (summed over groups; cached
        blocks no sequence holds count as free) and what admission holds now."""
        blocks = [g.scheduler.block_manager for g in self.engine.groups]
        return self.engine.stats() | {
            "kv_free_blocks": sum(b.num_free_blocks for b in blocks),
            "kv_total_blocks": sum(b.num_blocks for b in blocks),
            "admitted_seqs": self.admission.slots, "admitted_tokens": self.admission.tokens}

    def _prompt_of(self, given: Any, prompt: str | None) -> tuple[str | None, list[int]]:
        """The text and token ids of what ``generate`` was given: token ids (a list, tuple or
        numpy array of integers; ``prompt`` their text, if known) or vLLM's prompt forms, a
        string or ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}`` (``InvalidPromptError``
        for anything else)."""
        if isinstance(given, str | dict):
            return self.llm.prompt_ids_of(given)
        if isinstance(given, np.ndarray):
            given = given.tolist()
        return prompt, self.llm.prompt_ids_of({"prompt_token_ids": given})[1]

    async def generate(self, prompt_ids: Any = None, params: SamplingParams | None = None,
                       request_id: str | None = None, prompt: Any = None,
                       priority: int = 0, cache_salt: str | None = None, *,
                       sampling_params: SamplingParams | None = None,
                       lora_request: None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs until the request finishes or is aborted. ``prompt_ids``:
        token ids, or a string / vLLM prompt dict (``_prompt_of``); ``params`` None: the
        model's defaults (``LLM.get_default_sampling_params``). vLLM's keywords work too:
        ``generate(prompt=..., sampling_params=..., request_id=...)``. An engine not started
        yet starts (vLLM's ``AsyncLLM`` runs once built).

        Raises (before yielding) ``PromptTooLongError``/``InvalidPromptError`` for bad input
        (``SamplingParamsError`` for a ``priority`` other than 0 without priority scheduling,
        or a ``cache_salt`` that is not a non-empty string).
        Admission is the caller's (``self.admission.admit`` for a whole HTTP request).
        ``EngineDeadError`` after ``shutdown``; ``DuplicateRequestError`` for the id of a
        request still running.
        """
        if self._closed:
            raise EngineDeadError("the engine was shut down; it takes no more requests")
        if lora_request is not None:
            raise ConfigError("LoRA adapters are not supported; lora_request must be None")
        if sampling_params is not None:
            if params is not None:
                raise ConfigError("give params or sampling_params, not both")
            params = sampling_params
        if prompt_ids is None:  # vLLM's keyword: the prompt itself
            prompt_ids, prompt = prompt, None
        if request_id is not None:
            self._refuse_taken(request_id)
        prompt, prompt_ids = self._prompt_of(prompt_ids, prompt)
        params = self.llm.get_default_sampling_params() if params is None else params
        prompt_ids = self.llm.truncate_prompt(prompt_ids, params)
        self.llm.check_prompt(prompt_ids, params)
        request_id = request_id or self._new_id()
        self._start_once()
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request = Request(
            request_id, prompt, list(prompt_ids), params,
            self.llm.make_sequences(prompt_ids, params, priority, cache_salt),
            on_output=lambda out: report(loop, outputs, out),
        )
        scored = None
        if params.prompt_logprobs is not None:
            scored = await self._score_prompt(request_id, prompt_ids, params.prompt_logprobs)
        if self._expected.pop(request_id, False):  # aborted before it was submitted
            request.abort()
        shaper = OutputShaper(params.output_kind)  # cumulative, delta or final only
        if request.finished:  # max_tokens=0: the prompt only (or aborted already)
            yield shaper.shape(dataclasses.replace(request.snapshot(), prompt_logprobs=scored))
            return
        self._refuse_taken(request_id)  # taken by another stream while the prompt scored?
        self._streams[request_id] = (loop, outputs)
        last, submitted = None, False
        try:
            self.engine.submit(request)  # a DuplicateRequestError: the id is another's
            submitted = True
            while True:
                out = await outputs.get()
                if out is ABORTED:  # aborted here: the group drops it when it next steps
                    yield shaper.shape(aborted_output(request, last, scored))
                    return
                if out.error is not None:
                    raise request_failure(request_id, out)
                out.prompt_logprobs = scored
                last = out
                if (shaped := shaper.shape(out)) is not None:
                    yield shaped
                if out.finished:
                    return
        finally:
            if self._streams.get(request_id, (None, None))[1] is outputs:  # still its own
                del self._streams[request_id]
            if submitted and not request.finished:
                self.engine.abort(request_id)
            elif submitted:
                self.engine.release(request_id)

    async def embed(self, prompt_ids: Any, pooling: str | None = None,
                    normalize: bool | None = None) -> np.ndarray:
        """The prompt's embedding (``LLM.embed``), computed on a worker thread; the prompt in
        any form ``generate`` takes."""
        pooling, normalize = embedding_options(self.llm, pooling, normalize)
        prompt_ids = self._prompt_of(prompt_ids, None)[1]
        self.llm.check_prompt(prompt_ids, SamplingParams(max_tokens=0))
        return await asyncio.get_running_loop().run_in_executor(
            None, self.scoring.embed, list(prompt_ids), pooling, normalize)

    async def beam_search(self, prompt_ids: Any, params: BeamSearchParams,
                          request_id: str | None = None, prompt: str | None = None,
                          priority: int = 0,
                          cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Beam search (``xds_jax.sampling.beam_search``): each round's live beams run as
        one-token requests of their own (of ``priority`` and ``cache_salt``), concurrently;
        yields one finished output, the best ``beam_width`` beams best first (finish reason
        "abort" for all when aborted)."""
        if self._closed:
            raise EngineDeadError("the engine was shut down; it takes no more requests")
        prompt, prompt_ids = self._prompt_of(prompt_ids, prompt)
        self.llm.check_prompt(prompt_ids, SamplingParams(max_tokens=params.max_tokens))
        check_priority(priority, self.scheduling_policy)
        salt_bytes(cache_salt)
        request_id = request_id or self._new_id()
        search = BeamSearch(prompt_ids, params, self.llm.eos_token_ids)
        each_round, arrival = params.round_params(), time.monotonic()
        live = self._beams[request_id] = set()
        aborted = self._expected.pop(request_id, False)

        async def extend(beam_id: str, tokens: list[int]) -> RequestOutput | None:
            live.add(beam_id)
            final = None
            try:
                async for out in self.generate(tokens, each_round, beam_id, priority=priority,
                                               cache_salt=cache_salt):
                    final = out
            finally:
                live.discard(beam_id)
            return final

        try:
            for r in itertools.count():
                if request_id not in self._beams:  # aborted between rounds
                    aborted = True
                if aborted or search.done:
                    break
                finals = await asyncio.gather(*(
                    extend(f"{request_id}-beam{r}.{j}", tokens)
                    for j, tokens in enumerate(search.round_prompts())))
                if any(f is None or f.outputs[0].finish_reason == "abort" for f in finals):
                    aborted = True
                    break
                search.advance([next_logprobs(f) for f in finals])
        finally:
            self._beams.pop(request_id, None)
        outputs = search.outputs(self.tokenizer, params.logprobs)
        for c in outputs:
            c.finish_reason = "abort" if aborted else c.finish_reason
        scored = None
        if params.prompt_logprobs is not None and not aborted:
            scored = await self._score_prompt(request_id, prompt_ids, params.prompt_logprobs)
        yield RequestOutput(request_id, prompt, list(prompt_ids), outputs, finished=True,
                            metrics=RequestMetrics(arrival, finished_time=time.monotonic()),
                            prompt_logprobs=scored)

    async def _score_prompt(self, request_id: str, prompt_ids: list[int],
                            top_n: int) -> list | None:
        """The prompt's logprobs, scored on a worker thread; None where the request is
        aborted first (its client left, its time ran out): a prompt still waiting for the
        scorer is then never scored, and one being scored is not waited for."""
        loop = asyncio.get_running_loop()
        cancelled, aborted = threading.Event(), loop.create_future()
        self._scoring[request_id] = (cancelled, loop, aborted)
        work = loop.run_in_executor(None, self.scoring.score, list(prompt_ids), top_n,
                                    cancelled)
        try:
            await asyncio.wait((work, aborted), return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.set()  # aborted, cancelled or done: nothing more to start
            aborted.cancel()
            if self._scoring.get(request_id, (None,))[0] is cancelled:
                del self._scoring[request_id]
            if not work.done():  # aborted: it ends unread
                work.add_done_callback(_discard)
        if not work.done():
            return None
        try:
            return work.result()
        except ScoringCancelled:
            return None

    def _new_id(self) -> str:
        """A request id of the engine's own, which no caller's id can be (vLLM's are random
        too): a caller naming its requests "req-0", "req-1", ... would collide with a count."""
        return f"req-{uuid.uuid4().hex}"

    def _start_once(self) -> None:
        """Start the engine on its first request if the caller has not."""
        if not self.engine.started:
            self.start()

    def _refuse_taken(self, request_id: str) -> None:
        """``DuplicateRequestError`` for the id of a request running here or placed at the
        engine (an ``LLM.generate`` request's own id)."""
        if self._running(request_id) or self.engine.placed(request_id):
            raise DuplicateRequestError(f"request id {request_id!r} is already running")

    def _running(self, request_id: str) -> bool:
        """A request of this id streams, searches beams or has its prompt scored now."""
        return request_id in self._streams or request_id in self._beams \
            or request_id in self._scoring

    def _end_stream(self, request_id: str) -> None:
        """End a running request's stream now (``generate`` yields its aborted output)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, ABORTED)

    def expect(self, request_ids: list[str]) -> None:
        """Announce ids about to be passed to ``generate`` / ``beam_search``: one aborted
        before its call submits it is not run (a server's client may leave while it reads
        the prompt). An abort of any other id not running is a no-op, as in vLLM."""
        for request_id in request_ids:
            remember(self._expected, request_id)
            self._expected[request_id] = False

    def abort(self, request_id: str | Iterable[str]) -> Aborted:
        """Stop a request (or each of several) now and free its KV blocks; its stream ends
        with "abort" (a beam search: its running round's requests). Done on return; the
        result may be awaited, as vLLM's ``abort`` coroutine is."""
        if not isinstance(request_id, str):
            for one in request_id:
                self.abort(one)
            return Aborted()
        beams = self._beams.pop(request_id, None)
        for beam_id in list(beams or ()):
            self.engine.abort(beam_id)
            self._end_stream(beam_id)
        scoring = self._scoring.get(request_id)
        if scoring is not None:  # its prompt is being scored (prompt_logprobs)
            cancelled, loop, aborted = scoring
            cancelled.set()
            loop.call_soon_threadsafe(aborted.cancel)
            remember(self._expected, request_id)  # not submitted yet: it ends when it would be
        if beams is None:
            self.engine.abort(request_id)
            self._end_stream(request_id)
            if request_id in self._expected:  # announced, not submitted yet (its client
                self._expected[request_id] = True  # left while its prompt was read)
        return Aborted()
