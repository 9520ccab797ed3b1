"""Layouts of virtual CPU devices whose weight copies cannot fit this host are refused at
build, naming the numbers, instead of the process being killed for memory mid-build."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.core import host_memory
from xds_jax import LLM
from xds_jax.errors import ConfigError
from xds_jax.model.params import param_bytes

LLAMA = Path(__file__).parents[1] / "golden" / "llama"


def test_expert_bytes_counts_the_arrays_under_experts():
    import numpy as np

    tree = {"layers": [{"attn": {"q": np.zeros((2, 3), np.float32)},
                        "moe": {"experts": {"up": np.zeros((4,), np.int8)}}}]}
    assert host_memory.expert_bytes(tree) == 4 and param_bytes(tree) == 28


def test_weight_copies_past_the_hosts_memory_are_refused(monkeypatch):
    weights = LLM(str(LLAMA), dtype="float32").params
    size = param_bytes(weights)
    # room for one more copy than the loaded one: two groups build; three are refused before
    # anything is placed
    monkeypatch.setattr(host_memory, "available_bytes", lambda: int(1.5 * size))
    assert LLM(str(LLAMA), dtype="float32", num_dp_groups=2).generate(
        {"prompt_token_ids": [1, 2, 3]})[0].outputs[0].token_ids
    with pytest.raises(ConfigError, match=r"num_dp_groups: 3 groups on virtual CPU devices each "
                       r"hold a copy of the weights .* past this host's"):
        LLM(str(LLAMA), dtype="float32", num_dp_groups=3)
    monkeypatch.setattr(host_memory, "available_bytes", lambda: int(0.5 * size))
    with pytest.raises(ConfigError, match="deployment 'cpu8-pd'"):
        LLM(str(LLAMA), dtype="float32",
            deployment=str(Path(__file__).parents[2] / "configs/deployments/cpu8-pd.yaml"))


def test_available_memory_counts_the_page_cache():
    """MemAvailable (free memory and the cache the kernel can drop), not MemFree, where no
    cgroup limit is lower."""
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.exists() and limit.read_text().strip() != "max":
        pytest.skip("a cgroup memory limit applies here")
    got = host_memory.available_bytes()
    with open("/proc/meminfo") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    assert got is not None and abs(got - fields["MemAvailable"]) < 256 << 20
