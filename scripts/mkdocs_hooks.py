"""MkDocs hook: links from docs/ to repository files outside docs/ (``../charts/...``, ``../compose.yaml``).

The pages link such files relatively, so the links work where the Markdown is read in the repository. Those files
are not part of the site, and MkDocs would warn (fail, with ``strict``) that they are not found among the
documentation files. This hook checks each one exists in the repository (a missing one fails the build, as a broken
link to a page does) and, on the site, shows it as its repository path in code instead of a link to nowhere.
Links between pages are left to MkDocs's own validation (see ``validation`` in mkdocs.yml).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match) -> str:
        text, target = match["text"], match["target"]
        if "://" in target or target.startswith(("#", "mailto:", "/")):
            return match[0]
        path = posixpath.normpath(posixpath.join("docs", page_dir, target.split("#", 1)[0]))
        if path == "docs" or path.startswith("docs/"):
            return match[0]  # a page or file of the site: MkDocs checks it
        if path.startswith("../") or not (root / path).exists():
            raise PluginError(f"{page.file.src_uri}: link '{target}' names {path}, which is not in the repository")
        shown = path + ("/" if (root / path).is_dir() else "")
        return text if text.strip("`") == path else f"{text} (`{shown}`)"

    # Links may wrap across lines; fenced code is left alone.
    out, chunk, fenced = [], [], False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            if not fenced and chunk:
                out.append(LINK.sub(rewrite, "\n".join(chunk)))
                chunk = []
            fenced = not fenced
            out.append(line)
        elif fenced:
            out.append(line)
        else:
            chunk.append(line)
    if chunk:
        out.append(LINK.sub(rewrite, "\n".join(chunk)))
    return "\n".join(out)
