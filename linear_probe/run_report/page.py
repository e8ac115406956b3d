"""The report's HTML: one self-contained page (images embedded as data URIs, inline CSS, no script, no network)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .6rem 1rem .6rem 0; font-size: .9rem; display: inline-table;
        vertical-align: top; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr.this td { background: #eef7ee; font-weight: 600; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #555; } .note { color: #666; font-size: .9rem; }
code { background: #f5f5f5; padding: 0 .2rem; } .grid { display: flex; flex-wrap: wrap; gap: 1rem; }
.grid figure { flex: 1 1 420px; }
"""


@dataclass
class Section:
    """A titled block of the page: paragraphs, tables and figures in order."""

    title: str
    parts: list[str] = field(default_factory=list)

    def text(self, text: str, note: bool = False) -> Section:
        self.parts.append(f'<p class="note">{html.escape(text)}</p>' if note else f"<p>{html.escape(text)}</p>")
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], highlight: int | None = None) -> Section:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        body = "".join(
            f'<tr{" class=this" if i == highlight else ""}>'
            + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
            for i, row in enumerate(rows)
        )
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def figures(self, images: Sequence[tuple[Path, str]]) -> Section:
        """PNG files embedded side by side (each with its caption)."""
        tiles = "".join(_figure(path, caption) for path, caption in images)
        self.parts.append(f'<div class="grid">{tiles}</div>' if len(images) > 1 else tiles)
        return self


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    alt = html.escape(caption, quote=True)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}" title="{html.escape(path.name)}">'
            f"<figcaption>{html.escape(caption)} (<code>{html.escape(path.name)}</code>)</figcaption></figure>")


def render(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    toc = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections))
    body = "".join(f'<section id="s{i}"><h2>{html.escape(s.title)}</h2>{"".join(s.parts)}</section>'
                   for i, s in enumerate(sections))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=note>{html.escape(subtitle)}</p><ol>{toc}</ol>{body}"
            f"</body></html>\n")
