"""Compiled programs never take the process past Linux's memory-mapping limit: past half of it
``make_room`` drops them (``jax.clear_caches``), and an engine keeps serving the same tokens
across the drop."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams, memory_maps

pytestmark = pytest.mark.skipif(memory_maps.map_count() is None,
                                reason="no /proc/self/maps (not Linux)")


@pytest.fixture
def limit(monkeypatch, tmp_path):
    """Set the mapping limit this process believes it has (a file standing for
    /proc/sys/vm/max_map_count); the real count stays real."""
    path = tmp_path / "max_map_count"
    monkeypatch.setattr(memory_maps, "MAX_MAP_COUNT", str(path))
    monkeypatch.setitem(memory_maps._state, "floor", 0)

    def set_limit(value: int) -> None:
        path.write_text(f"{value}\n")

    return set_limit


def _compile_programs(count: int) -> list:
    """``count`` distinct compiled programs, kept alive by their jitted functions."""
    x = jnp.ones((8, 8))
    fns = [jax.jit(lambda a, i=i: jnp.tanh(a @ a + i).sum() * jnp.sin(a).mean())
           for i in range(count)]
    for f in fns:
        f(x).block_until_ready()
    return fns


def test_below_half_the_limit_nothing_is_dropped(limit):
    fns = _compile_programs(2)
    limit(4 * memory_maps.map_count())
    assert not memory_maps.make_room()
    assert all(f._cache_size() == 1 for f in fns)


def test_past_half_the_limit_the_programs_and_their_mappings_go(limit, caplog):
    fns = _compile_programs(20)
    before = memory_maps.map_count()
    limit(before + 10)  # more than half held
    clears = memory_maps.clears()
    with caplog.at_level(logging.WARNING, logger="xds_jax.memory_maps"):
        assert memory_maps.make_room("the test")
    assert memory_maps.clears() == clears + 1
    assert all(f._cache_size() == 0 for f in fns)
    assert memory_maps.map_count() < before - 20 * 3  # each program mapped >= 3 regions
    assert "vm.max_map_count" in caplog.text and "before the test" in caplog.text
    assert float(fns[0](jnp.ones((8, 8)))) == pytest.approx(
        float(jnp.tanh(jnp.full((8, 8), 8.0)).sum() * np.sin(1.0)), rel=1e-6)


def test_mappings_held_elsewhere_are_not_cleared_again_and_again(limit, caplog):
    limit(memory_maps.map_count())  # the count alone is over half: a drop cannot help
    with caplog.at_level(logging.WARNING, logger="xds_jax.memory_maps"):
        assert memory_maps.make_room()
    assert "something else holds them" in caplog.text
    assert not memory_maps.make_room()  # not again until as many mappings again are added


def test_a_shape_compiles_again_after_a_drop(limit):
    shapes = memory_maps.ProgramShapes()
    limit(1 << 30)
    assert shapes.first_launch(("decode", 4), "a") and not shapes.first_launch(("decode", 4), "a")
    limit(memory_maps.map_count() + 10)
    assert shapes.first_launch(("prefill", 16), "b")  # dropped everything before it compiles
    assert ("prefill", 16) in shapes and ("decode", 4) not in shapes
    limit(1 << 30)
    assert shapes.first_launch(("decode", 4), "a") and list(shapes) != []


def test_an_engine_serves_the_same_tokens_across_a_drop(limit):
    """A new prefill shape past the limit drops every program mid-serving (the engine's own
    step programs included); they compile again and the tokens are those of a run without
    the drop."""
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, llm.cfg.vocab_size, n).tolist() for n in (5, 40, 90)]
    expected = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params)]
    clears, compiles = memory_maps.clears(), llm.engine.stats()["compiles"]
    limit(memory_maps.map_count() + 10)
    longer = rng.integers(0, llm.cfg.vocab_size, 200).tolist()  # a new width: it compiles
    got = llm.generate([{"prompt_token_ids": p} for p in prompts + [longer]], params)
    assert memory_maps.clears() > clears
    # the new width, then shapes launched before the drop count again: they recompile, and
    # the heartbeat's compile grace covers them
    assert llm.engine.stats()["compiles"] >= compiles + 2
    assert [o.outputs[0].token_ids for o in got[:3]] == expected
    limit(1 << 30)
    again = llm.generate([{"prompt_token_ids": longer}], params)[0]
    assert again.outputs[0].token_ids == got[3].outputs[0].token_ids
