"""The ``xds`` command line: help for every option, one-line errors with exit codes, and the
generate/chat/plan commands (over a fake engine where the model does not matter)."""

from __future__ import annotations

import io
import sys
import types

import pytest

from serving.entrypoints import cli
from tests.serving.fake_engine import REPLY, FakeEngine

COMMANDS = ["serve", "generate", "chat", "bench"]


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_explains_every_option(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and all(name in out for name in [*COMMANDS, "plan"])
    for command in COMMANDS:
        code, out, _ = run([command, "--help"], capsys)
        assert code == 0
        parser = cli.build_parser()._subparsers._group_actions[0].choices[command]
        for action in parser._actions:
            assert action.help, f"{command} {action.option_strings} has no help"
            for flag in action.option_strings:
                assert flag in out


@pytest.mark.parametrize("argv", [
    [],
    ["nonsense"],
    ["generate", "--max-tokens", "-3", "hi"],
    ["serve", "--port", "eighty"],
    ["serve", "--port", "70000"],
    ["bench", "--request-rate", "0"],
    ["chat", "--dtype", "float8"],
    ["generate", "--kv-cache-gib", "0", "hi"],
    ["generate", "--kv-cache-gib", "inf", "hi"],
    # sampling values are checked before the model loads (they exited 1 after loading it)
    ["generate", "--temperature", "-1", "hi"],
    ["generate", "--temperature", "nan", "hi"],
    ["chat", "--top-p", "2"],
    ["generate", "--top-p", "0", "hi"],
    ["generate", "--top-k", "-5", "hi"],
])
def test_bad_options_exit_2(argv, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and "error:" in err and "Traceback" not in err


def test_runtime_errors_are_one_line(capsys, monkeypatch):
    code, _, err = run(["generate", "--model", "/no/such/model", "hi"], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("xds: error: model '/no/such/model'")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = run(["generate", "--log-level", "error"], capsys)
    assert code == 1 and err.strip() == "xds: error: no prompt given (pass it as an argument " \
        "or on stdin)"


@pytest.fixture
def fake_engine(monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr(cli, "load_engine", lambda args: engine)
    return engine


def test_flags_spelled_with_underscores_are_taken(fake_engine, capsys):
    """vLLM's parser takes --max_tokens for --max-tokens; values keep their underscores."""
    assert cli.dashed(["generate", "--max_tokens=3", "--stop", "a_b", "x_y", "--", "--a_b"]) \
        == ["generate", "--max-tokens=3", "--stop", "a_b", "x_y", "--", "--a_b"]
    code, out, _ = run(["generate", "--max_tokens", "5", "Hi"], capsys)
    assert code == 0 and out == REPLY[:5] + "\n"


def test_generate_streams_text(fake_engine, capsys, monkeypatch):
    code, out, _ = run(["generate", "--max-tokens", "5", "Hi", "there"], capsys)
    assert code == 0 and out == REPLY[:5] + "\n" + REPLY[:5] + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\n\ntwo\n"))
    code, out, _ = run(["generate", "--max-tokens", "3", "--stop", "e"], capsys)
    assert code == 0 and out == "Th\nTh\n"
    assert fake_engine.started is False  # shut down


def test_chat_with_piped_stdin(fake_engine, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/reset\nHello\n/exit\nignored\n"))
    code, out, _ = run(["chat", "--max-tokens", "4", "--system", "Be brief."], capsys)
    assert code == 0 and out == (REPLY[:4] + "\n") * 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    code, out, _ = run(["chat", "--max-tokens", "4", "--chat-template", "{{ messages }}"], capsys)
    assert code == 0 and fake_engine.tokenizer.chat_template == "{{ messages }}"
    code, _, err = run(["chat", "--chat-template", "{% if %}"], capsys)
    assert code == 1 and "not a valid Jinja template" in err


def test_generate_takes_the_models_generation_config(fake_engine, capsys):
    """Flags left out take the model's defaults (vLLM's --generation-config), its
    max_new_tokens the default and the most; flags given win, greedy where neither says."""
    fake_engine.sampling_defaults = {"temperature": 0.6, "top_k": 20, "max_tokens": 4}
    seen = []
    generate = fake_engine.generate
    fake_engine.generate = lambda ids, params, *a, **kw: (seen.append(params),
                                                          generate(ids, params, *a, **kw))[1]
    code, out, _ = run(["generate", "Hi"], capsys)
    assert code == 0 and out == REPLY[:4] + "\n"
    assert (seen[-1].temperature, seen[-1].top_k, seen[-1].max_tokens) == (0.6, 20, 4)
    code, out, _ = run(["generate", "--max-tokens", "9", "--temperature", "0", "Hi"], capsys)
    assert code == 0 and (seen[-1].temperature, seen[-1].top_k, seen[-1].max_tokens) == (0, 20, 4)
    fake_engine.sampling_defaults = {}
    code, out, _ = run(["generate", "Hi"], capsys)
    assert (seen[-1].temperature, seen[-1].top_k, seen[-1].max_tokens) == (0.0, 0, 64)
    args = cli.build_parser().parse_args(["chat"])
    assert cli.sampling(args, 1000, {"max_tokens": 300}).max_tokens == 300  # the default
    assert cli.sampling(args, 1000, {"max_tokens": 100}).max_tokens == 100
    # the sampler's seed: --sampling-seed, else --seed (vLLM's --seed: runs sample alike)
    assert cli.sampling(args, 1000).seed == 0 and cli.sampling(args, 1000, None, 2).seed == 2
    args = cli.build_parser().parse_args(["chat", "--seed", "7", "--sampling-seed", "3"])
    assert cli.sampling(args, 1000).seed == 3


def test_serve_checks_its_front_end_before_loading(monkeypatch, capsys, tmp_path):
    """A missing tool-call parser, a template that does not compile, a port in use or an
    unknown host: a one-line error (exit 1) before the model loads (vLLM binds first)."""
    import socket

    monkeypatch.setattr(cli, "load_engine", lambda args: pytest.fail("loaded the model"))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv, says in ((["--enable-auto-tool-choice"], "needs --tool-call-parser"),
                           (["--chat-template", str(broken)], "not a valid Jinja template"),
                           (["--host", "127.0.0.1", "--port", port], "cannot listen there"),
                           (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid'")):
            code, _, err = run(["serve", *argv], capsys)
            assert code == 1 and "Traceback" not in err, (argv, err)
            assert err.strip().splitlines()[-1].startswith("xds: error:") and says in err


def test_output_files_are_checked_before_the_run(monkeypatch, capsys, tmp_path):
    """--trace without a deployment (nothing records one), an unwritable --trace, --output
    or --plot, and a --plot that is no image: one line before anything loads or runs."""
    monkeypatch.setattr(cli, "load_engine", lambda args: pytest.fail("loaded the model"))
    monkeypatch.setattr(cli, "COMMANDS", {})  # nothing may run
    missing = str(tmp_path / "no" / "such" / "dir" / "f.json")
    for argv, says in (
            (["generate", "--trace", str(tmp_path / "t.json"), "hi"], "give --deployment"),
            (["generate", "--deployment", "configs/deployments/cpu8-pd.yaml", "--trace",
              missing, "hi"], "--trace " + missing),
            (["bench", "--output", missing], "--output " + missing),
            (["bench", "--plot", str(tmp_path / "x.txt")], "name an image file"),
            (["bench", "--plot", str(tmp_path / "no" / "x.png")], "cannot write a file there")):
        code, _, err = run(argv, capsys)
        assert code == 1 and says in err and "Traceback" not in err, (argv, err)


def test_launch_refuses_a_negative_grace(capsys):
    code, _, err = run(["launch", "--grace", "-1", "--", "generate", "hi"], capsys)
    assert code == 2 and "--grace must be 0 or more seconds, got -1" in err


def test_a_prompt_past_the_context_is_named(fake_engine, capsys):
    fake_engine.max_model_len = 8
    code, out, err = run(["generate", "Hi", "x " * 20], capsys)
    assert code == 1 and out == REPLY[:5] + "\n"  # the first prompt's text, then the error
    assert "prompt 2 of 2 has" in err and "the context holds 8" in err


def test_a_prompt_that_is_not_utf8_is_named_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_engine", lambda args: pytest.fail("loaded the model"))
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python reads Latin-1 argv
    code, _, err = run(["generate", "fine", bad], capsys)
    assert code == 1 and "prompt 2 is not UTF-8 text: byte 0xe9 at character 3" in err


def test_cpu_devices_fewer_than_the_layout_needs_are_refused(capsys):
    code, _, err = run(["generate", "--cpu-devices", "1", "--num-dp-groups", "3", "hi"], capsys)
    assert code == 1 and "--cpu-devices 1: the layout needs 3 devices (--num-dp-groups)" in err


def test_address_check_binds_as_the_server_would():
    """An empty host is every interface (not checked); '::' is probed IPv6-only, as asyncio
    binds it, so an IPv4 listener on the same port does not make it 'in use'."""
    import socket

    from serving.entrypoints.server import check_address

    check_address("", 8000)
    try:
        with socket.socket(socket.AF_INET6) as six:
            six.bind(("::", 0))
    except OSError:
        pytest.skip("no IPv6 here")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        check_address("::", taken.getsockname()[1])  # would say "cannot listen there"


def test_plan_delegates(monkeypatch, capsys):
    seen = []
    module = types.ModuleType("sharding.plan")
    module.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "sharding.plan", module)
    assert cli.main(["plan", "--deployment", "x.yaml"]) == 3
    assert seen == [["--deployment", "x.yaml"]]


def test_generate_on_a_disaggregated_deployment_saves_a_trace(capsys, tmp_path):
    """The real engine: a config-only DeepSeek-V3 (byte tokenizer) with PD on 8 devices."""
    import json

    trace = tmp_path / "trace.json"
    code, out, err = run(["generate", "--model", "configs/models/deepseek-v3-tiny.json",
                          "--deployment", "configs/deployments/cpu8-pd.yaml", "--dtype",
                          "float32", "--max-tokens", "4", "--max-num-seqs", "4",
                          "--trace", str(trace), "Hello"], capsys)
    assert code == 0, err
    assert out.strip()  # random weights, but some text came back
    for role in ("prefill", "transfer", "decode"):
        assert role in err  # the per-role summary
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["cat"] for e in events if e["ph"] == "X"} >= {"prefill", "transfer", "decode"}


def test_a_vllm_serve_launch_line_carries_over(monkeypatch, capsys, caplog):
    """`vllm serve MODEL` with the flags vLLM users pass: the model positional, `4k`/`4K`
    lengths, `--dtype half`, `-tp 1`, `--trust-remote-code`, `--revision main`, `--tokenizer`
    naming the model, `--data-parallel-size`; each was "unrecognized arguments" (exit 2).
    Flags with another meaning here are refused with a line saying why."""
    seen = {}
    monkeypatch.setattr(cli, "COMMANDS", {"serve": lambda args: seen.update(vars(args))})
    code, _, err = run(["serve", "smollm2", "--max-model-len", "4K", "--dtype", "half",
                        "-tp", "1", "--trust-remote-code", "--revision", "main",
                        "--tokenizer", "smollm2", "--data-parallel-size", "2",
                        "--gpu-memory-utilization", "0.9", "--disable-log-requests",
                        "--uvicorn-log-level", "warning", "--response-role", "bot",
                        "--max-logprobs", "5"], capsys)
    assert code == 0, err
    assert seen["model"] == "smollm2" and seen["max_model_len"] == 4096
    assert seen["dtype"] == "float16" and seen["num_dp_groups"] == 2
    assert seen["response_role"] == "bot" and seen["max_logprobs"] == 5
    assert "--gpu-memory-utilization has no effect" in caplog.text
    run(["serve", "--max-model-len", "4k"], capsys)
    assert seen["max_model_len"] == 4000
    for argv, says in ((["serve", "a", "--model", "b"], "the model is given twice"),
                       (["serve", "-tp", "2"], "--tensor-parallel-size 2"),
                       (["serve", "--revision", "v2"], "nothing is downloaded"),
                       (["serve", "--tokenizer", "/elsewhere"], "--tokenizer '/elsewhere'"),
                       (["serve", "--max-logprobs", "50"], "--max-logprobs must be in 0..20"),
                       (["serve", "--gpu-memory-utilization", "2"], "must be in (0, 1]")):
        code, _, err = run(argv, capsys)
        assert code == 1 and says in err and "Traceback" not in err, (argv, err)
    code, _, err = run(["serve", "--max-model-len", "4x"], capsys)
    assert code == 2 and "4096, 4k or 4K" in err
    run(["serve", "--max-model-len", "1.001k"], capsys)  # exact: float arithmetic said 1000.99
    assert seen["max_model_len"] == 1001
    for spelling in ("auto", "-1", "AUTO"):  # vLLM's: the longest the KV cache holds
        run(["serve", "--max-model-len", spelling], capsys)
        assert seen["max_model_len"] == "auto"
    code, _, err = run(["serve", "--max-model-len", "-2"], capsys)
    assert code == 2 and "4096, 4k or 4K" in err
    # --served-model-name takes several names: a model after it was swallowed as one, and the
    # default model served silently
    code, _, err = run(["serve", "--served-model-name", "a", "smollm2"], capsys)
    assert code == 1 and "--served-model-name took the model 'smollm2'" in err


def test_the_api_key_comes_from_vllm_s_variable_too(monkeypatch):
    from serving.entrypoints.cli_vllm import api_key

    args = cli.build_parser().parse_args(["serve"])
    monkeypatch.delenv("XDS_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "v")  # a vLLM deployment's key: it ran open
    assert api_key(args) == "v"
    monkeypatch.setenv("XDS_API_KEY", "x")
    assert api_key(args) == "x"
    args.api_key = "flag"
    assert api_key(args) == "flag"


def test_help_answers_without_importing_jax():
    """``xds --help`` and a command's help parse arguments only: JAX and the engine load on
    first use (``xds_jax`` names load lazily), so help answers in well under a second."""
    import subprocess

    code = ("import sys\nfrom serving.entrypoints.cli import main\n"
            "for argv in (['--help'], ['serve', '--help'], ['generate', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('jax', 'xds_jax.llm') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    import xds_jax

    assert xds_jax.LLM.__name__ == "LLM" and "SamplingParams" in dir(xds_jax)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        xds_jax.nope  # noqa: B018
