"""A request as the engine tracks it: its sequences (``n`` samples), timing and who to tell.

No JAX here. Outputs go straight from the DP group that runs the request to ``on_output``
(xDeepServe's output shortcut): nothing central relays tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from xds_jax.outputs import RequestMetrics, RequestOutput
from xds_jax.sampling.params import SamplingParams
from xds_jax.sequence import Sequence, failure_text, samples_outcome


@dataclasses.dataclass(eq=False)
class Request:
    """One client request and its ``n`` sequences."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    on_output: Callable[[RequestOutput], None] | None = None
    metrics: RequestMetrics = dataclasses.field(
        default_factory=lambda: RequestMetrics(arrival_time=time.monotonic())
    )
    error: str | None = None  # why the engine failed this request, if it did
    failure: Exception | None = None  # the exception behind ``error``
    _sent_text: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def of_sequence(cls, seq: Sequence) -> Request:
        """A request holding one ready-made sequence (``LLM.generate`` runs its own)."""
        return cls(f"seq-{seq.seq_id}", None, seq.prompt_ids, seq.params, [seq])

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def abort(self) -> None:
        for s in self.seqs:
            s.abort()

    def fail(self, error: Exception) -> None:
        """End the request because processing it raised ``error`` (finish reason "abort";
        outputs carry it as ``failure`` and its text as ``error``)."""
        self.error, self.failure = failure_text(error), error
        for s in self.seqs:
            s.fail(error, self.error)
        self.abort()

    def mark_tokens(self, now: float) -> None:
        """Record first/last token times after a step that produced tokens."""
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.last_token_time = now
        if self.finished and self.metrics.finished_time is None:
            self.metrics.finished_time = now

    def snapshot(self) -> RequestOutput:
        """Cumulative output so far; unfinished text holds back a possible stop-string tail."""
        if not self._sent_text:
            self._sent_text = ["" for _ in self.seqs]
        outputs = []
        for i, s in enumerate(self.seqs):
            self._sent_text[i] += s.new_text()
            out = s.output()
            outputs.append(dataclasses.replace(out, text=self._sent_text[i])
                           if not s.finished else out)
        # a sample may end failed alone (its grammar refused to go on): the request reports it
        outcome = samples_outcome(self.seqs)
        if self.error is not None:
            outcome |= {"error": self.error, "failure": self.failure}
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outputs,
                             finished=self.finished, metrics=self.metrics, **outcome)

