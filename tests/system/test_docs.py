"""The docs: the configuration reference is generated from settings.py and cannot drift; the README stays short and
its links lead somewhere. (`make docs` builds the whole site with `mkdocs build --strict`, which fails on a broken
link between pages.) In-process: no servers, nothing from inferencehub.protocol."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "scripts" / "gen_config_docs.py"


def generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_is_what_the_generator_renders_from_settings_now():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == generator().render(), "docs/configuration.md is stale: run scripts/gen_config_docs.py"


def test_the_configuration_page_lists_every_field_of_every_settings_class():
    from dataclasses import fields

    from inferencehub import settings

    gen = generator()
    page = gen.render()
    classes = gen.settings_classes()
    assert {c.__name__ for c in classes} >= {"GatewaySettings", "InferenceSettings", "UpSettings"}
    for cls in classes:
        section = page.split(f"## `{gen.command(cls)}`", 1)[1].split("\n## ", 1)[0]
        for f in fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            row = next((line for line in section.splitlines() if line.startswith(f"| `{flag}` |")), None)
            assert row is not None, (cls.__name__, flag)
            assert f"`{settings.env_name(f.name)}`" in row and f.metadata["help"].split(" (")[0] in row, row
    assert "| `--port` | `INFERENCEHUB_PORT` | `8080` |" in page  # a default, rendered
    assert "`67108864` (64 MiB)" in page


def test_the_generator_check_mode_fails_on_a_stale_page(tmp_path, monkeypatch):
    ok = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    gen = generator()
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "PAGE", tmp_path / "configuration.md")
    gen.PAGE.write_text(gen.render().replace("INFERENCEHUB_PORT", "INFERENCEHUB_PORTS", 1))  # a hand edit
    monkeypatch.setattr(sys, "argv", ["gen_config_docs.py", "--check"])
    assert gen.main() == 1
    monkeypatch.setattr(sys, "argv", ["gen_config_docs.py"])
    assert gen.main() == 0 and gen.PAGE.read_text() == gen.render()  # regenerated


def test_the_readme_is_short_and_its_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [t.split("#", 1)[0] for t in targets if "://" not in t and not t.startswith("#")]
    assert len(local) >= 10
    for target in local:
        assert (ROOT / target).exists(), target
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    linked = {Path(t).name for t in local if t.startswith("docs/")}
    assert pages - linked <= {"index.md", "chart.md"}, pages - linked  # every page reachable from the README


def test_the_docs_pages_link_only_to_files_that_exist():
    """Links from docs/ into the repository (outside the site): mkdocs_hooks.py fails the build on a missing one;
    this checks the same without building, and that every page is in mkdocs.yml's nav."""
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f": {page.name}" in nav, page.name
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#", 1)[0]
            if "://" in target or not path:
                continue
            assert (page.parent / path).exists(), f"{page.name}: {target}"
