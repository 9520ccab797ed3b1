"""Stop strings, ``n > 1``, ``max_tokens`` and logprobs under MTP speculation: a stop string
that completes inside a run of accepted drafts ends the output (tokens, text, reasons,
logprobs) exactly where the run without speculation ends it, colocated, under PD and under
MA. The mimic checkpoints accept most drafts (k = 3: runs of up to 4 tokens a step), and a
byte tokenizer gives them text; the stop strings are cut from the unstopped reference text
so that each first completes at a chosen token."""

import pytest

import serving.core.spec_state as spec_state
from tests.collectives.cases import need_devices
from tests.mtp_checkpoint import make_mimic_checkpoint
from tests.serving.test_disaggregation import ma
from tests.serving.test_spec_decode import (  # noqa: F401 (an autouse fixture)
    PROMPTS,
    draft_at_every_batch_size,
    spec,
)
from xds_jax import LLM, SamplingParams
from xds_jax.loading.loader import load_config
from xds_jax.sequence import Sequence
from xds_jax.text.byte_tokenizer import byte_tokenizer

K = 3
MAX_TOKENS = 36


def _with_tokenizer(path):
    byte_tokenizer(load_config(str(path)))._backend.save(str(path / "tokenizer.json"))
    return str(path)


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    return _with_tokenizer(make_mimic_checkpoint(tmp_path_factory.mktemp("stop_mimic")))


@pytest.fixture(scope="module")
def mimic_moe(tmp_path_factory):
    return _with_tokenizer(make_mimic_checkpoint(tmp_path_factory.mktemp("stop_moe"), moe=True))


def _texts(llm, prompt, token_ids) -> list[str]:
    """The text a sequence shows after each of its tokens (index 0: none yet)."""
    seq = Sequence(prompt, SamplingParams(max_tokens=len(token_ids) + 1, ignore_eos=True),
                   tokenizer=llm.tokenizer)  # never finished: the text as it streams
    texts = [seq.text]
    for t in token_ids:
        seq.append(t)
        texts.append(seq.text)
    return texts


def _stop_at(texts: list[str], j: int, inside: bool) -> str | None:
    """A stop string that first completes when token ``j`` arrives: the 3 characters before
    the end of its text (``inside``: 2 characters short of it, so the cut with the stop
    string included falls inside the token's text)."""
    end = len(texts[j]) - (2 if inside else 0)
    stop = texts[j][end - 3:end]
    if end - 3 < 0 or end <= len(texts[j - 1]) or "\ufffd" in stop or not stop.strip():
        return None
    return stop if texts[j].find(stop) == end - 3 else None


def cases(model: str) -> tuple[list, list[SamplingParams]]:
    """Prompts and sampling params: stop strings completing at several tokens (excluded and
    included, with logprobs), ``n = 2`` with a stop string, ``max_tokens`` of every residue
    modulo ``k + 1``, and an unmatched stop string."""
    ref = LLM(model, engine="reference", dtype="float32", use_param_cache=False)
    free = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = ref.generate([{"prompt_token_ids": p} for p in PROMPTS], free)
    prompts, params = [], []
    for p, out in zip(PROMPTS, outs, strict=True):
        texts = _texts(ref, p, out.outputs[0].token_ids)
        found = 0
        for j in range(4, MAX_TOKENS - 2):
            include = found % 2 == 1
            stop = _stop_at(texts, j, inside=include and found % 4 == 1)
            if stop is None:
                continue
            prompts.append(p)
            params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                         stop=[stop, "never\x00"], logprobs=found % 3,
                                         include_stop_str_in_output=include, n=1 + found % 2))
            found += 1
            if found == 4:
                break
    for i, m in enumerate(range(5, 5 + K + 1)):
        prompts.append(PROMPTS[i % len(PROMPTS)])
        params.append(SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=1,
                                     stop=["never\x00"]))
    return prompts, params


def run_cases(monkeypatch, model: str, **options) -> tuple[list, list, list]:
    """(reference outputs, speculative outputs, per verified row (tokens kept, accepted + 1))."""
    prompts, params = cases(model)
    requests = [{"prompt_token_ids": p} for p in prompts]
    ref = LLM(model, engine="reference", dtype="float32", use_param_cache=False)
    expected = ref.generate(requests, params)
    rows = []
    verify = spec_state._emit_verified

    def recording(seqs, num_drafts, drafts, logits, vocab_size, greedy_BK1):
        before = [len(s.output_ids) if s is not None else 0 for s in seqs]
        accepted = verify(seqs, num_drafts, drafts, logits, vocab_size, greedy_BK1)
        rows.extend((s, len(s.output_ids) - b, int(a) + 1)
                    for s, b, a in zip(seqs, before, accepted, strict=True) if s is not None)
        return accepted

    monkeypatch.setattr(spec_state, "_emit_verified", recording)
    llm = LLM(model, dtype="float32", use_param_cache=False, speculative_config=spec(K),
              max_num_seqs=8, **options)
    got = llm.generate(requests, params)
    assert llm.engine.stats()["kv_usage"] == 0
    return expected, got, rows


def assert_same_ends(expected, got, rows) -> None:
    for r, g in zip(expected, got, strict=True):
        assert len(g.outputs) == len(r.outputs)
        for a, b in zip(r.outputs, g.outputs, strict=True):
            assert (b.token_ids, b.text) == (a.token_ids, a.text)
            assert (b.finish_reason, b.stop_reason) == (a.finish_reason, a.stop_reason)
            if a.logprobs is None:
                assert b.logprobs is None
                continue
            assert len(b.logprobs) == len(b.token_ids)
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                assert set(x) == set(y)
                for t in x:
                    assert y[t].logprob == pytest.approx(x[t].logprob, abs=1e-4)
    # the test exercises what it claims: stop strings fired inside accepted runs
    cut = [s for s, kept, verified in rows if kept < verified]
    assert cut and all(isinstance(s.stop_reason, str) for s in cut)
    stops = [o for r in expected for o in r.outputs if isinstance(o.stop_reason, str)]
    assert len(stops) >= 8 and any(o.finish_reason == "length" for r in expected
                                   for o in r.outputs)


def test_colocated_stop_strings_end_where_the_plain_run_ends(mimic, monkeypatch):
    assert_same_ends(*run_cases(monkeypatch, mimic))


def test_pd_stop_strings_end_where_the_plain_run_ends(mimic, monkeypatch):
    need_devices(8)
    assert_same_ends(*run_cases(monkeypatch, mimic,
                                deployment="configs/deployments/cpu8-pd.yaml"))


def test_ma_stop_strings_end_where_the_plain_run_ends(mimic_moe, tmp_path, monkeypatch):
    need_devices(8)
    assert_same_ends(*run_cases(monkeypatch, mimic_moe,
                                deployment=ma(tmp_path, domains=1, dp=2, experts=2)))
