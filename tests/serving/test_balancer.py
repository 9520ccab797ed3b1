"""Placement policy: health, capacity, prefix affinity, load, prompt length."""

import pytest

from serving.core.balancer import PREFIX_BLOCK, Balancer, NoHealthyGroupError
from serving.core.dp_group import GroupLoad


def load(i, running=0, waiting=0, kv=0.0, healthy=True, cap=8):
    return GroupLoad(i, running, waiting, kv, healthy, cap)


def test_skips_unhealthy_and_full_groups():
    b = Balancer()
    assert b.choose([load(0, healthy=False), load(1)], [1, 2, 3]) == 1
    assert b.choose([load(0, running=8), load(1, running=3)], [1, 2, 3]) == 1
    with pytest.raises(NoHealthyGroupError):
        b.choose([load(0, healthy=False)], [1])


def test_prefix_affinity_beats_load():
    b = Balancer()
    prompt = list(range(3 * PREFIX_BLOCK))
    first = b.choose([load(0), load(1)], prompt)
    loads = [load(0, running=2 if first == 0 else 0), load(1, running=2 if first == 1 else 0)]
    assert b.choose(loads, prompt[: 2 * PREFIX_BLOCK] + [7] * 10) == first


def test_affinity_follows_only_prefixes_of_the_same_cache_salt():
    """A salted request cannot share another salt's blocks: no pull towards where they went
    (and no clue to where that was); its own salt's prefixes attract it as before."""
    b = Balancer()
    prompt = list(range(3 * PREFIX_BLOCK))
    first = b.choose([load(0), load(1)], prompt, b"tenant-a")
    busy = [load(0, running=4 if first == 0 else 0), load(1, running=4 if first == 1 else 0)]
    assert b.choose(busy, prompt, b"tenant-b") == 1 - first  # the idle group
    assert b.choose(busy, prompt) == 1 - first  # unsalted: no affinity either
    assert b.choose(busy, prompt, b"tenant-a") == first


def test_least_loaded_wins():
    b = Balancer()
    assert b.choose([load(0, running=6, kv=0.5), load(1, running=1)], [5] * 10) == 1


def test_long_and_short_prompts_go_to_different_groups():
    b = Balancer()
    idle = [load(0), load(1)]
    short_group = b.choose(idle, [1] * 8)
    long_group = b.choose(idle, [2] * 3000)  # no shared prefix, same load: length decides
    assert long_group != short_group
    assert b.choose(idle, [3] * 12) == short_group
    assert b.choose(idle, [4] * 2500) == long_group
