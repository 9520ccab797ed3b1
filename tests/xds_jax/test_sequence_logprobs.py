"""A request's logprobs hold its own top-N, whatever its batch-mates asked for (a batch's
sampler returns the widest request's N for every row)."""

from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.sequence import Sequence


def test_append_keeps_the_requests_own_top_n():
    seq = Sequence([1, 2], SamplingParams(max_tokens=4, logprobs=1))
    seq.append(7, -0.5, 2, [(3, -0.1), (7, -0.5), (9, -2.0)])  # sampled: not the top one
    assert list(seq.logprobs[0]) == [3, 7] and seq.logprobs[0][7].rank == 2
    seq.append(3, -0.1, 1, [(3, -0.1), (7, -0.5), (9, -2.0)])
    assert list(seq.logprobs[1]) == [3]


def test_batched_requests_get_the_logprobs_each_asked_for():
    llm = LLM(str(GOLDEN / "llama"), engine="reference", dtype="float32",
              use_param_cache=False)
    params = [SamplingParams(temperature=0, max_tokens=3, logprobs=n) for n in (0, 1, 4)]
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3, params)
    for out, n in zip(outs, (0, 1, 4), strict=True):
        completion = out.outputs[0]
        assert [len(e) for e in completion.logprobs] == [max(n, 1)] * 3
        assert all(t in e for t, e in zip(completion.token_ids, completion.logprobs,
                                          strict=True))
