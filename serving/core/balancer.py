"""The control plane's placement policy: which DP group gets a request.

As in xDeepServe: never a group that is unhealthy or at its sequence limit (while another has
room); among the rest prefer a group that already holds the request's prompt prefix (its
prefix cache will skip that prefill), then the least loaded (KV use plus queued work, in coarse
steps), then the group whose recent prompts are closest in length, so long and short prompts
do not share a group and make stragglers of each other. Prefix affinity and prompt lengths are
remembered here, from placements, so the policy reads no group-internal state.
"""

from __future__ import annotations

import collections
import hashlib
import math

from serving.core.dp_group import GroupLoad
from xds_jax.errors import XdsError

PREFIX_BLOCK = 64  # tokens per affinity key
MAX_REMEMBERED = 4096
LOAD_STEP = 0.25  # loads within one step count as equal; then prompt length decides
LENGTH_EMA = 0.2  # weight of a new placement in a group's typical prompt length


class NoHealthyGroupError(XdsError, RuntimeError):
    """Every DP group is unhealthy."""


def _prefix_keys(prompt_ids: list[int], salt: bytes = b"") -> list[str]:
    """Chained keys of the prompt's leading blocks; a cache salt seeds the chain (placement
    follows only prefixes the request could share: its own salt's)."""
    keys, h = [], hashlib.blake2b(digest_size=8)
    if salt:
        h.update(b"cache_salt\0" + salt)
    for start in range(0, len(prompt_ids) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
        h.update(str(prompt_ids[start:start + PREFIX_BLOCK]).encode())
        keys.append(h.copy().hexdigest())
    return keys


class Balancer:
    """Places requests on groups; remembers which prompt prefixes went where."""

    def __init__(self) -> None:
        self._affinity: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._log_length: dict[int, float] = {}  # group -> EMA of log prompt length

    def choose(self, loads: list[GroupLoad], prompt_ids: list[int], salt: bytes = b"") -> int:
        healthy = [g for g in loads if g.healthy]
        if not healthy:
            raise NoHealthyGroupError("no healthy DP group is available")
        open_groups = [g for g in healthy if not g.full] or healthy
        keys = _prefix_keys(prompt_ids, salt)
        hits = {g.index: 0 for g in open_groups}
        for depth, key in enumerate(keys, start=1):
            group = self._affinity.get(key)
            if group in hits:
                hits[group] = depth

        log_length = math.log(max(len(prompt_ids), 1))

        def cost(g: GroupLoad) -> tuple:
            queued = (g.num_running + g.num_waiting) / max(g.max_num_seqs, 1)
            load = math.floor((g.kv_usage + queued) / LOAD_STEP)
            mismatch = abs(self._log_length.get(g.index, log_length) - log_length)
            return (-hits[g.index], load, mismatch, g.index)

        chosen = min(open_groups, key=cost).index
        old = self._log_length.get(chosen, log_length)
        self._log_length[chosen] = (1 - LENGTH_EMA) * old + LENGTH_EMA * log_length
        for key in keys:
            self._affinity[key] = chosen
            self._affinity.move_to_end(key)
        while len(self._affinity) > MAX_REMEMBERED:
            self._affinity.popitem(last=False)
        return chosen
