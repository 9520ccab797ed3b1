"""``logit_bias`` (OpenAI's, vLLM's ``SamplingParams.logit_bias``): added to the logits before
sampling, greedy or not, in every engine path; reported logprobs stay the model's."""

import jax.numpy as jnp
import numpy as np
import pytest

from serving.core import spec_decode
from tests.helpers import GOLDEN
from tests.mtp_checkpoint import make_mimic_checkpoint
from xds_jax import LLM, SamplingParams
from xds_jax.errors import SamplingParamsError
from xds_jax.sampling.sampler import flags_for, make_batch, sample

LOGITS = np.array([[0.0, 1.0, 5.0, 2.0, 0.5, -1.0, 3.0, 0.2],
                   [4.0, 1.0, 0.0, 2.0, 0.5, -1.0, 3.0, 0.2]], np.float32)


def _sample(params: list[SamplingParams]):
    flags = flags_for(params)
    n = len(params)
    batch = make_batch(params, [7] * n, [0] * n, [[]] * n, [[]] * n, [[]] * n, 8, flags)
    return [np.asarray(a) for a in sample(jnp.asarray(LOGITS), batch, flags)]


def test_bias_moves_the_greedy_pick_and_leaves_other_rows_and_logprobs_alone():
    tokens, lps, *_ = _sample([SamplingParams(temperature=0, logit_bias={5: 100}, logprobs=0),
                               SamplingParams(temperature=0, logprobs=0)])
    assert tokens.tolist() == [5, 0]
    raw = np.log(np.exp(LOGITS[0]) / np.exp(LOGITS[0]).sum())
    np.testing.assert_allclose(lps[0], raw[5], rtol=1e-5)  # the model's logprob, unbiased
    # a ban by -100: the next best; a small bias that does not change the order: no change
    tokens, *_ = _sample([SamplingParams(temperature=0, logit_bias={2: -100}),
                          SamplingParams(temperature=0, logit_bias={6: 0.5})])
    assert tokens.tolist() == [6, 0]


def test_bias_steers_random_draws_and_is_clipped_to_100():
    p = SamplingParams(temperature=1.0, seed=3, logit_bias={4: 1e6})
    assert p.logit_bias == {4: 100.0}
    for seed in range(8):
        tokens, *_ = _sample([SamplingParams(temperature=1.0, seed=seed, logit_bias={4: 100}),
                              SamplingParams(temperature=1.0, seed=seed, top_k=2,
                                             logit_bias={0: -100, 7: 100})])
        assert tokens.tolist() == [4, 7]


@pytest.mark.parametrize("bias", [{"5": 1.0}, {-1: 1.0}, {3: float("nan")}, {3: True}, [3]])
def test_bad_logit_bias_names_the_field(bias):
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


def test_llm_generates_the_biased_token_and_refuses_ids_outside_the_vocabulary():
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False)
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 2,
                        [SamplingParams(temperature=0, max_tokens=5, logit_bias={42: 100}),
                         SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=5,
                                        logit_bias={17: 100})])
    assert outs[0].outputs[0].token_ids == [42] * 5
    assert [o.token_ids for o in outs[1].outputs] == [[17] * 5] * 2
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        llm.generate([{"prompt_token_ids": [5]}],
                     SamplingParams(logit_bias={llm.cfg.vocab_size: 1.0}))


def test_speculative_rows_with_a_bias_decode_through_the_sampler(tmp_path, monkeypatch):
    """A biased row is not drafted (the verifier reads the raw target argmax); it samples one
    token a step while its batch-mates draft, and each gets what it would get alone."""
    monkeypatch.setattr(spec_decode, "DISABLE_BY_BATCH_SIZE", 64)
    model = str(make_mimic_checkpoint(tmp_path))
    prompts = [{"prompt_token_ids": [5, 9, 17, 33]}, {"prompt_token_ids": list(range(3, 20))}]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={9: 100}),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    ref = LLM(model, engine="reference", dtype="float32", use_param_cache=False)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    llm = LLM(model, dtype="float32", use_param_cache=False,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want and got[0] == [9] * 6
    assert llm.engine.stats()["spec_num_drafts"] > 0  # the unbiased row drafted
