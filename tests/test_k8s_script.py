"""scripts/k8s.sh, checked offline: kind, minikube, kubectl, helm, docker and curl are stand-in executables on
PATH that record their arguments and answer what the script asks. What is proven: every kubectl and helm call
names the cluster's own context, the chart is installed with --create-namespace and content-tagged images,
object names come from the cluster (by the chart's labels), the HPA status is read by jsonpath and printed as
`cpu: 4%/60%`, and the port-forward is stopped whether the run succeeds or a step fails."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, wait_for

SCRIPT = ROOT / "scripts" / "k8s.sh"
# Names the chart would not derive from the release name alone: the script must read them from the cluster.
GATEWAY_SERVICE = "custom-gateway-svc"

STUB = textwrap.dedent(
    r'''
    #!PYTHON
    """A stand-in for an outside tool: records argv, answers from a small table."""
    import json, os, sys, time
    from pathlib import Path

    tool, args = Path(sys.argv[0]).name, sys.argv[1:]
    state = Path(os.environ["STUB_STATE"])
    with open(state / "calls.jsonl", "a") as log:
        log.write(json.dumps([tool, *args]) + "\n")
    line = " ".join([tool, *args])
    hang = os.environ.get("STUB_HANG", "")
    if hang and hang in " ".join([tool, *args]):
        time.sleep(60)  # a step that takes long: the user presses Ctrl-C
    fail = os.environ.get("STUB_FAIL", "")
    if fail and fail in line:
        print(f"{tool}: failing as the test asked", file=sys.stderr)
        sys.exit(1)

    def out(text):
        sys.stdout.write(text)
        sys.exit(0)

    if tool == "kubectl" and "port-forward" in args:
        (state / "port-forward.pid").write_text(str(os.getpid()))
        time.sleep(120)  # a forward runs until it is stopped
        sys.exit(0)
    if tool == "kubectl" and "jsonpath={.items[*].metadata.name}" in line.replace("jsonpath='", "jsonpath="):
        component = next(a for a in args if "component=" in a).rsplit("=", 1)[1]
        kind = args[args.index("get") + 1]
        out({"service": {"gateway": os.environ["STUB_GATEWAY_SERVICE"]}}.get(kind, {}).get(
            component, f"rel-{kind}-{component}"))
    if tool == "kubectl" and "get" in args and "hpa" in args:
        out("4|60|2|3\n")
    if tool == "kubectl" and "get" in args and "service" in args:
        out("8080")
    if tool == "kubectl" and "get" in args and "deployment" in args and "metrics-server" not in args:
        out("inferencehub-gateway:abc123")
    if tool == "kubectl" and "get" in args and "pods" in args and "jsonpath" in line:
        out("Running\nRunning\nPending\n")
    if tool == "kubectl" and "get" in args and "job" in args:
        out("1" if ".status.succeeded" in line else "")
    if tool == "kubectl" and "apply" in args and "-" in args:
        (state / "applied.yaml").write_text(sys.stdin.read())
    if tool == "curl" and not (state / "port-forward.pid").exists():
        sys.exit(7)  # nothing listens until the port-forward runs
    if tool == "curl" and any("/v2/models/mock/infer" in a for a in args):
        out("HTTP/1.1 200 OK\nx-inferencehub-replica: pod-a\n\n{}")
    if tool == "curl":
        out('{"outputs": []}')
    sys.exit(0)
    '''
).lstrip()
TOOLS = ["kind", "minikube", "kubectl", "helm", "docker", "curl"]


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    text = STUB.replace("#!PYTHON", f"#!{sys.executable}")
    for tool in TOOLS:
        path = bin_dir / tool
        path.write_text(text)
        path.chmod(0o755)
    return tmp_path


def run(stubs: Path, *args: str, fail: str = "", **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PATH": f"{stubs / 'bin'}:{os.environ['PATH']}",
        "STUB_STATE": str(stubs / "state"),
        "STUB_FAIL": fail,
        "STUB_GATEWAY_SERVICE": GATEWAY_SERVICE,
        "CLUSTER": "hub-test",
        "RELEASE": "rel",
        "NAMESPACE": "team-a",
        "DEMO_SECONDS": "30",
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment, timeout=60)


def calls(stubs: Path) -> list[list[str]]:
    path = stubs / "state" / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_bound_to(stubs: Path, context: str) -> None:
    recorded = calls(stubs)
    assert any(c[0] == "kubectl" for c in recorded) and any(c[0] == "helm" for c in recorded)
    for call in recorded:
        if call[0] == "kubectl":
            assert call[1:3] == ["--context", context], call
        if call[0] == "helm":
            assert call[1:3] == ["--kube-context", context], call


def assert_forward_stopped(stubs: Path) -> None:
    pid = int((stubs / "state" / "port-forward.pid").read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie until its parent's shell reaps it: that is stopped too.
        stat = Path(f"/proc/{pid}/stat")
        return not stat.exists() or stat.read_text().split(") ", 1)[1].startswith("Z")

    wait_for(gone, timeout=10, what="the port-forward to stop")


def expected_tag() -> str:
    revision = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    return revision


def test_kind_up_binds_every_call_to_the_kind_context_and_deploys_content_tagged_images(stubs):
    done = run(stubs, "kind", "up")
    assert done.returncode == 0, done.stderr
    assert_bound_to(stubs, "kind-hub-test")
    recorded = calls(stubs)

    tags = {c[c.index("-t") + 1] for c in recorded if c[:2] == ["docker", "build"]}
    assert {t.split(":")[0] for t in tags} == {"inferencehub-gateway", "inferencehub-inference"}
    tag = next(iter(tags)).split(":", 1)[1]
    assert {t.split(":", 1)[1] for t in tags} == {tag}
    assert re.fullmatch(r"[0-9a-f]{12}(-[0-9a-f]{8}-dirty)?", tag), tag
    assert tag.startswith(expected_tag())
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    assert tag.endswith("-dirty") == bool(dirty.strip())

    loads = [c for c in recorded if c[:3] == ["kind", "load", "docker-image"]]
    assert sorted(c[3] for c in loads) == sorted(tags) and all(c[-2:] == ["--name", "hub-test"] for c in loads)
    install = next(c for c in recorded if c[0] == "helm" and "upgrade" in c)
    assert "--create-namespace" in install and install[install.index("--namespace") + 1] == "team-a"
    assert f"gateway.image.tag={tag}" in install and f"inference.image.tag={tag}" in install
    assert install[install.index("--install") + 1 : install.index("--install") + 3] == ["rel", "charts/inferencehub"]
    # The metrics-server flag is added only when missing, and a failing patch is an error (see below).
    assert any("patch" in c for c in recorded if c[0] == "kubectl")
    # The port-forward targets the Service the cluster has, not a name guessed from the release.
    forward = next(c for c in recorded if "port-forward" in c)
    assert f"service/{GATEWAY_SERVICE}" in forward
    assert "x-inferencehub-replica: pod-a" in done.stdout
    assert any(c[0] == "helm" and "test" in c and "rel" in c for c in recorded)
    assert_forward_stopped(stubs)


def test_minikube_uses_its_profile_as_the_context(stubs):
    done = run(stubs, "minikube", "up")
    assert done.returncode == 0, done.stderr
    assert_bound_to(stubs, "hub-test")
    assert any(c[:4] == ["minikube", "-p", "hub-test", "image"] for c in calls(stubs))


@pytest.mark.parametrize(
    "step",
    [
        "/v2/models/iris/infer",  # the smoke inference fails while the port-forward runs
        "test rel",  # helm test fails
    ],
)
def test_a_failing_step_fails_the_script_and_stops_the_port_forward(stubs, step):
    done = run(stubs, "kind", "up", fail=step)
    assert done.returncode != 0
    assert_forward_stopped(stubs)


def test_ctrl_c_stops_the_port_forward(stubs):
    # Ctrl-C signals the whole foreground process group; the backgrounded port-forward ignores SIGINT (as
    # background jobs of a script do), so only the script's EXIT trap can stop it.
    environment = {
        **os.environ,
        "PATH": f"{stubs / 'bin'}:{os.environ['PATH']}",
        "STUB_STATE": str(stubs / "state"),
        "STUB_HANG": "/v2/models/iris/infer",
        "STUB_GATEWAY_SERVICE": GATEWAY_SERVICE,
    }
    script = subprocess.Popen(
        ["bash", str(SCRIPT), "kind", "up"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for(
            lambda: any("/v2/models/iris/infer" in " ".join(c) for c in calls(stubs)), timeout=30, what="the smoke call"
        )
        os.killpg(script.pid, signal.SIGINT)
        assert script.wait(timeout=30) != 0
    finally:
        if script.poll() is None:
            script.kill()
    assert_forward_stopped(stubs)


def test_a_failing_metrics_server_patch_is_an_error(stubs):
    done = run(stubs, "kind", "up", fail="patch deployment metrics-server")
    assert done.returncode != 0
    assert not any(c[0] == "helm" for c in calls(stubs)), "the chart must not be installed after a failed step"


def test_demo_reads_the_hpa_by_jsonpath_and_prints_the_kubernetes_1_30_target_format(stubs):
    done = run(stubs, "kind", "demo")
    assert done.returncode == 0, done.stderr
    assert_bound_to_kubectl_only(stubs, "kind-hub-test")
    line = next(line for line in done.stdout.splitlines() if " hpa " in line)
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d  hpa rel-hpa-inference  cpu: 4%/60%  replicas 2 \(desired 3\)  pods: 1 Pending 2 Running",
        line,
    ), line
    for call in calls(stubs):
        if call[0] == "kubectl" and "hpa" in call:
            assert any(a.startswith("jsonpath=") or a.startswith("-o=jsonpath") for a in call) or (
                call[call.index("-o") + 1].startswith("jsonpath=")
            ), call
    # The load Job runs the deployed gateway image against the release's gateway Service.
    applied = (stubs / "state" / "applied.yaml").read_text()
    assert "image: inferencehub-gateway:abc123" in applied
    assert f"http://{GATEWAY_SERVICE}:8080" in applied


def assert_bound_to_kubectl_only(stubs: Path, context: str) -> None:
    for call in calls(stubs):
        assert call[0] == "kubectl", call
        assert call[1:3] == ["--context", context], call


def test_usage():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 2 and "kind up" in done.stdout
