"""The `inferencehub` command line: flags, env vars, and clear start-up errors."""

from __future__ import annotations

import subprocess
import sys

from conftest import Replica


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "inferencehub.cli", *args] if args[:1] != ("-m",) else [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_inference_help_lists_flags_and_env_vars():
    done = run("-m", "inferencehub.inference", "--help")
    assert done.returncode == 0
    for flag, env in [
        ("--host", "INFERENCEHUB_HOST"),
        ("--port", "INFERENCEHUB_PORT"),
        ("--metrics-port", "INFERENCEHUB_METRICS_PORT"),
        ("--models", "INFERENCEHUB_MODELS"),
    ]:
        assert flag in done.stdout and env in done.stdout
    assert "default 8081" in done.stdout and "default 8082" in done.stdout


def test_console_script_has_the_inference_subcommand():
    import shutil
    from pathlib import Path

    script = shutil.which("inferencehub") or str(Path(sys.executable).parent / "inferencehub")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "inference" in done.stdout


def test_bad_env_value_is_named():
    done = run("-m", "inferencehub.inference", env={"INFERENCEHUB_PORT": "eighty"})
    assert done.returncode == 2
    assert "INFERENCEHUB_PORT='eighty': expected int" in done.stderr


def test_env_vars_configure_the_replica(tmp_path):
    replica = Replica(env={"INFERENCEHUB_REPLICA_NAME": "from-env"})  # flags from Replica override host/ports
    try:
        replica.wait_serving()
        assert "replica from-env listening" in replica.log
    finally:
        replica.terminate()
        replica.kill()


def test_taken_port_is_a_clear_error():
    first = Replica()
    try:
        done = run(
            "-m", "inferencehub.inference", "--host", "127.0.0.1", "--port", str(first.port), "--metrics-port", "0"
        )
        assert done.returncode == 2
        assert f"cannot listen for gRPC on 127.0.0.1:{first.port}" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        first.terminate()
        first.kill()


def test_each_image_runs_its_command_with_only_its_own_extra():
    """The gateway image has no grpc health/reflection packages; the inference image has no aiohttp."""
    blocked = {"gateway": ["grpc_health", "grpc_reflection"], "inference": ["aiohttp", "orjson"]}
    for command, modules in blocked.items():
        code = (
            "import sys\n"
            + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
            + f"from inferencehub.cli import main\nmain([{command!r}, '--help'])"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "INFERENCEHUB_PORT" in done.stdout


def test_generate_prints_the_tokens_as_the_stream_brings_them(gateway):
    url = f"http://{gateway.url}"
    whole = gateway.request("POST", "/v2/models/mock-llm/generate", {"text_input": "tell me a story", "max_tokens": 6})
    assert whole.status == 200, whole
    done = run("-m", "inferencehub", "generate", "mock-llm", "tell me a story", "--max-tokens", "6", "--url", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == whole.json()["text_output"] + "\n"
    assert "finish_reason=length prompt_tokens=4 completion_tokens=6 tokens_received=6 first_token_ms=" in done.stderr

    missing = run("-m", "inferencehub", "generate", "no-such-model", "hi", "--url", url)
    assert missing.returncode == 1 and "404" in missing.stderr and "no-such-model" in missing.stderr
    late = run(
        "-m",
        "inferencehub",
        "generate",
        "mock-llm",
        "tell me a story",
        "--max-tokens",
        "500",
        "--timeout",
        "0.2",
        "--url",
        url,
    )
    assert late.returncode == 1 and "the stream failed" in late.stderr and "deadline" in late.stderr
    assert "Traceback" not in missing.stderr + late.stderr
