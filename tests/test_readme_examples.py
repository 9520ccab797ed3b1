"""The README's library examples run as written, each in a fresh Python process.

Fresh processes matter: on CPU the virtual device count is fixed when JAX starts, and a user
pasting an example has not set anything up. The examples are read from the README itself, so
the documentation cannot drift from what works.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _examples(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"### {section}\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


DISAGGREGATED = _examples("Disaggregated serving")


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # paths as written, from the repo root
    env = {k: v for k, v in os.environ.items() if k not in ("XDS_CPU_DEVICES", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, timeout=900,
                          capture_output=True, text=True)


def test_the_readme_shows_the_three_layouts():
    layouts = [re.search(r'deployment="configs/deployments/([\w-]+)\.yaml"', c).group(1)
               for c in DISAGGREGATED]
    assert layouts == ["cpu10-pd-tp3", "cpu16-ma", "cm384"]


# Each example runs in its own fresh process (sized by its deployment), so all three run from
# the small default test process rather than beside the 384-device one's engines.
@pytest.mark.parametrize("index", [0, 1, 2], ids=["pd", "pd_ma", "cm384"])
def test_readme_disaggregated_example_runs_in_a_fresh_process(index, tmp_path):
    result = _run(DISAGGREGATED[index], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.strip().splitlines()[-1]
    if index == 0:
        assert "Paris" in result.stdout and int(printed.split()[-1]) >= 1  # KV was transferred
    elif index == 1:
        assert int(printed.split()[-1]) >= 1  # MA steps ran
    else:
        assert int(printed) >= 1 and (tmp_path / "trace.json").stat().st_size > 0
