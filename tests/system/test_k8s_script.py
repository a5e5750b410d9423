"""scripts/k8s.sh, checked offline: kind, minikube, kubectl, helm, docker and curl are stand-in executables on
PATH that record their arguments and answer what the script asks. What is proven: every kubectl and helm call
names the cluster's own context, the chart is installed with --create-namespace and content-tagged images,
object names come from the cluster (by the chart's labels), the HPA status is read by jsonpath and printed as
`cpu: 4%/60%`, the port-forward is stopped and temporary files removed whether the run succeeds, a step fails, or
the script gets SIGINT, SIGTERM or SIGHUP; podman builds and loads through an image archive; an old bash or
another shell gets a clear message."""

from __future__ import annotations

import json
import os
import re
import shutil
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
    if tool == "kind":
        with open(state / "kind-provider.txt", "a") as log:
            log.write(os.environ.get("KIND_EXPERIMENTAL_PROVIDER", "") + "\n")
    fail = os.environ.get("STUB_FAIL", "")
    if fail and fail in line:
        print(f"{tool}: failing as the test asked", file=sys.stderr)
        sys.exit(1)

    def out(text):
        sys.stdout.write(text)
        sys.exit(0)

    if tool == "kind" and args == ["version"]:
        out(os.environ.get("STUB_KIND_VERSION", ""))
    if tool == "podman" and args[:1] == ["save"]:
        Path(args[args.index("-o") + 1]).write_bytes(b"an image archive")
    if tool == "kind" and args[:2] == ["load", "image-archive"] and not Path(args[2]).is_file():
        print(f"kind: no archive at {args[2]}", file=sys.stderr)
        sys.exit(1)
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
    if tool == "curl" and os.environ.get("STUB_NOT_READY") and any(a.endswith("/readyz") for a in args):
        sys.exit(22)  # the gateway is slow to get ready: the script keeps polling
    if tool == "curl" and any("/v2/models/mock/infer" in a for a in args):
        out("HTTP/1.1 200 OK\nx-inferencehub-replica: pod-a\n\n{}")
    if tool == "curl":
        out('{"outputs": []}')
    sys.exit(0)
    '''
).lstrip()
TOOLS = ["kind", "minikube", "kubectl", "helm", "docker", "podman", "curl"]
# The real commands the script uses besides the stand-ins (for a PATH that has no docker at all).
SYSTEM_TOOLS = ["git", "mktemp", "cp", "rm", "grep", "sed", "sort", "uniq", "awk", "date", "sleep", "dirname"]
BASH = shutil.which("bash")


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir, state, temp = tmp_path / "bin", tmp_path / "state", tmp_path / "tmp"
    bin_dir.mkdir()
    state.mkdir()
    temp.mkdir()
    text = STUB.replace("#!PYTHON", f"#!{sys.executable}")
    for tool in TOOLS:
        path = bin_dir / tool
        path.write_text(text)
        path.chmod(0o755)
    return tmp_path


def environment(stubs: Path, fail: str = "", **env: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{stubs / 'bin'}:{os.environ['PATH']}",
        "TMPDIR": str(stubs / "tmp"),  # the script's temporary files go here: the tests check they are removed
        "KIND_EXPERIMENTAL_PROVIDER": "",
        "STUB_STATE": str(stubs / "state"),
        "STUB_FAIL": fail,
        "STUB_GATEWAY_SERVICE": GATEWAY_SERVICE,
        "CLUSTER": "hub-test",
        "RELEASE": "rel",
        "NAMESPACE": "team-a",
        "DEMO_SECONDS": "30",
        **env,
    }


def run(stubs: Path, *args: str, fail: str = "", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(SCRIPT), *args], capture_output=True, text=True, env=environment(stubs, fail, **env), timeout=60
    )


def assert_no_temporary_files(stubs: Path) -> None:
    assert not list((stubs / "tmp").iterdir()), list((stubs / "tmp").iterdir())


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
    assert not any(c[0] == "podman" for c in recorded)
    assert_forward_stopped(stubs)
    assert_no_temporary_files(stubs)
    # The cluster runs the pinned node image (k8s/kind-cluster.yaml), created from that file.
    create = next(c for c in recorded if c[:3] == ["kind", "create", "cluster"])
    assert create[create.index("--config") + 1] == "k8s/kind-cluster.yaml"


def podman_install_checks(stubs: Path, recorded: list[list[str]]) -> None:
    assert not any(c[0] == "docker" for c in recorded)
    builds = [c for c in recorded if c[:2] == ["podman", "build"]]
    images = sorted(c[c.index("-t") + 1] for c in builds)
    assert [i.split(":")[0] for i in images] == ["localhost/inferencehub-gateway", "localhost/inferencehub-inference"]
    tag = images[0].split(":", 1)[1]
    saves = [c for c in recorded if c[:2] == ["podman", "save"]]
    assert sorted(c[-1] for c in saves) == images
    assert all(c[c.index("--format") + 1] == "docker-archive" for c in saves)
    archives = sorted(c[c.index("-o") + 1] for c in saves)
    loads = [c for c in recorded if c[:2] == ["kind", "load"]]
    # Never `kind load docker-image` (it reads from a Docker daemon); the archives podman wrote instead.
    assert {c[2] for c in loads} == {"image-archive"}
    assert sorted(c[3] for c in loads) == archives and all(c[-2:] == ["--name", "hub-test"] for c in loads)
    install = next(c for c in recorded if c[0] == "helm" and "upgrade" in c)
    # The nodes know the images by podman's name, localhost/...: the chart's repositories say so.
    for component in ("gateway", "inference"):
        assert f"{component}.image.repository=localhost/inferencehub-{component}" in install
        assert f"{component}.image.tag={tag}" in install
    # kind itself runs its nodes on podman.
    providers = set((stubs / "state" / "kind-provider.txt").read_text().split())
    assert providers == {"podman"}
    assert_forward_stopped(stubs)
    assert_no_temporary_files(stubs)  # the archives too


def test_kind_experimental_provider_podman_builds_with_podman_and_loads_image_archives(stubs):
    done = run(stubs, "kind", "up", KIND_EXPERIMENTAL_PROVIDER="podman")  # docker is there too: podman wins
    assert done.returncode == 0, done.stderr
    assert_bound_to(stubs, "kind-hub-test")
    podman_install_checks(stubs, calls(stubs))


def test_podman_is_used_when_there_is_no_docker(stubs):
    (stubs / "bin" / "docker").unlink()
    system = stubs / "system"
    system.mkdir()
    for tool in SYSTEM_TOOLS:
        (system / tool).symlink_to(shutil.which(tool))
    done = run(stubs, "kind", "up", PATH=f"{stubs / 'bin'}:{system}")
    assert done.returncode == 0, done.stderr
    podman_install_checks(stubs, calls(stubs))


def test_an_unknown_provider_is_refused_before_anything_runs(stubs):
    done = run(stubs, "kind", "up", KIND_EXPERIMENTAL_PROVIDER="nerdctl")
    assert done.returncode == 1
    assert "KIND_EXPERIMENTAL_PROVIDER=nerdctl: this script builds with docker or podman" in done.stderr
    assert calls(stubs) == []
    assert_no_temporary_files(stubs)


@pytest.mark.parametrize(
    ("shell", "said"),
    [
        # macOS's /bin/bash: run for real by bash with the version macOS's reports (BASH_VERSION is the one
        # version variable a script can set; the guard reads it, so it reads what bash 3.2 would show).
        ("bash 3.2", "this shell is bash 3.2.57(1)-release"),
        ("bash 4.3", "this shell is bash 4.3.48(1)-release"),
        ("sh", "this shell is not bash"),  # `sh scripts/k8s.sh ...`: dash, a real other shell
    ],
)
def test_an_old_bash_or_another_shell_gets_a_clear_message(stubs, shell, said):
    if shell == "sh":
        command = [shutil.which("dash") or "sh", str(SCRIPT), "kind", "up"]
    else:
        version = {"bash 3.2": "3.2.57(1)-release", "bash 4.3": "4.3.48(1)-release"}[shell]
        command = [BASH, "-c", f'BASH_VERSION="{version}"; . "$0" kind up', str(SCRIPT)]
    done = subprocess.run(command, capture_output=True, text=True, env=environment(stubs), timeout=30)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: scripts/k8s.sh needs bash 4.4 or newer; " + said), done.stderr
    assert "brew install bash" in done.stderr
    assert "syntax error" not in done.stderr and "Bad substitution" not in done.stderr
    assert calls(stubs) == []  # nothing ran


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_to_the_script_stops_its_port_forward(stubs, sig):
    # Only the script gets the signal (kill PID, a CI runner's timeout, a closed ssh session's shell), not the
    # port-forward beside it: the script's trap must stop it. The gateway never gets ready, so the script is
    # polling through the port-forward when the signal comes.
    script = subprocess.Popen(
        [BASH, str(SCRIPT), "kind", "up"],
        env=environment(stubs, STUB_NOT_READY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (stubs / "state" / "port-forward.pid").exists(), timeout=30, what="the port-forward")
        script.send_signal(sig)
        assert script.wait(timeout=30) == 128 + sig
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
    assert_forward_stopped(stubs)
    assert_no_temporary_files(stubs)


@pytest.mark.parametrize(("version", "warned"), [("v0.20.0", True), ("v0.32.1", True), ("v0.33.0", False)])
def test_a_kind_older_than_the_pinned_node_image_is_warned_about(stubs, version, warned):
    done = run(stubs, "kind", "up", STUB_KIND_VERSION=f"kind {version} go1.25.1 linux/amd64")
    assert done.returncode == 0, done.stderr
    warning = f"warning: kind {version} is older than v0.33.0, whose node image k8s/kind-cluster.yaml pins"
    assert (warning in done.stderr) == warned, done.stderr
    # The release the script names is the one k8s/kind-cluster.yaml says its node image comes from.
    assert "kind v0.33.0 lists in its release notes" in (ROOT / "k8s" / "kind-cluster.yaml").read_text()


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
    assert_no_temporary_files(stubs)


def test_ctrl_c_stops_the_port_forward(stubs):
    # Ctrl-C signals the whole foreground process group; the backgrounded port-forward ignores SIGINT (as
    # background jobs of a script do), so only the script's EXIT trap can stop it.
    script = subprocess.Popen(
        [BASH, str(SCRIPT), "kind", "up"],
        env=environment(stubs, STUB_HANG="/v2/models/iris/infer"),
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
    assert_no_temporary_files(stubs)


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
