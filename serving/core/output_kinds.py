"""The outputs a streaming caller of ``AsyncEngine.generate`` gets: the final output of a
request aborted before the engine reported it (``aborted_output``), and, by the request's
``SamplingParams.output_kind`` (vLLM's ``RequestOutputKind``): every cumulative output as the
engine reports it, only what each adds (``DELTA``: new text, token ids and logprobs; the
prompt's log-probabilities on the first), or the finished one alone (``FINAL_ONLY``)."""

from __future__ import annotations

import dataclasses

from serving.core.request import Request
from xds_jax.outputs import CompletionOutput, RequestOutput
from xds_jax.sampling.params import RequestOutputKind


class OutputShaper:
    """Turns one request's cumulative outputs into what its ``output_kind`` asks, in order."""

    def __init__(self, kind: RequestOutputKind):
        self.kind = kind
        self._sent: dict[int, tuple[int, int, int]] = {}  # index: (tokens, chars, logprobs)
        self._done: set[int] = set()  # samples whose finished delta went out
        self._first = True

    def shape(self, out: RequestOutput) -> RequestOutput | None:
        """What to yield for ``out`` (None: nothing now)."""
        if self.kind is RequestOutputKind.CUMULATIVE:
            return out
        if self.kind is RequestOutputKind.FINAL_ONLY:
            return out if out.finished else None
        deltas = [d for c in out.outputs if (d := self._delta(c)) is not None]
        if not deltas and not self._first and not out.finished:
            return None  # nothing new for anyone
        shaped = dataclasses.replace(out, outputs=deltas,
                                     prompt_logprobs=out.prompt_logprobs if self._first else None)
        self._first = False
        return shaped

    def _delta(self, c: CompletionOutput) -> CompletionOutput | None:
        """What ``c`` adds since the last output (None: nothing; a sample that finished is
        reported once, with its finish reason)."""
        if c.index in self._done:
            return None
        tokens, chars, logprobs = self._sent.get(c.index, (0, 0, 0))
        if (tokens, chars) == (len(c.token_ids), len(c.text)) and not c.finish_reason \
                and c.index in self._sent:
            return None
        self._sent[c.index] = (len(c.token_ids), len(c.text),
                               len(c.logprobs) if c.logprobs is not None else 0)
        if c.finish_reason:
            self._done.add(c.index)
        return dataclasses.replace(
            c, text=c.text[chars:], token_ids=list(c.token_ids[tokens:]),
            logprobs=None if c.logprobs is None else c.logprobs[logprobs:])


def aborted_output(request: Request, last: RequestOutput | None,
                   scored: list | None = None) -> RequestOutput:
    """The final output of a request aborted before the engine reported it: the last output
    yielded, every unfinished choice ended with "abort" (built on the event loop: the
    request's own state belongs to its group's thread)."""
    if last is None:
        logprobs = [] if request.params.logprobs is not None else None
        last = RequestOutput(request.request_id, request.prompt, request.prompt_ids,
                             [CompletionOutput(i, "", [], logprobs=logprobs)
                              for i in range(len(request.seqs))],
                             metrics=request.metrics, prompt_logprobs=scored)
    outputs = [c if c.finish_reason else dataclasses.replace(c, finish_reason="abort")
               for c in last.outputs]
    return dataclasses.replace(last, outputs=outputs, finished=True)
