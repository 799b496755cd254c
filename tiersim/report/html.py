"""Assemble one self-contained HTML page: plotly.js embedded once, no network, no random ids.

The page must open offline (an air-gapped capacity review, an e-mail attachment), so the script
is inlined in <head> and every figure div is rendered without its own copy. Div ids are derived
from the section and figure names, so the same inputs give the same bytes.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from tiersim.atomic import dumps

# No "Share chart..." button: it uploads the figure to Plotly Cloud, which an offline report must not offer.
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "showSendToCloud": False,
               "toImageButtonOptions": {"format": "png", "scale": 2}}

STYLE = """
body { font-family: Inter, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2937; margin: 0; background: #f3f4f6; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 32px 48px; }
header { background: #111827; color: #f9fafb; padding: 22px 32px; }
header h1 { margin: 0 0 8px; font-size: 26px; }
header .facts { font-size: 15px; line-height: 1.7; }
header .facts b { color: #93c5fd; font-weight: 600; }
table.inputs { border-collapse: collapse; margin: 14px 0 0; font-size: 13px; color: #e5e7eb; }
table.inputs th, table.inputs td { border-bottom: 1px solid #374151; padding: 4px 14px 4px 0; text-align: left; }
table.inputs th { color: #9ca3af; font-weight: 500; }
section { background: #ffffff; border-radius: 8px; padding: 18px 22px 8px; margin: 22px 0; box-shadow: 0 1px 3px rgba(0,0,0,0.08); }
section h2 { margin: 0 0 6px; font-size: 20px; }
section p.summary { margin: 2px 0; font-size: 15px; line-height: 1.5; }
section p.source { margin: 2px 0 10px; font-size: 12px; color: #6b7280; }
div.figure { margin: 12px 0 18px; }
header nav { margin-top: 12px; font-size: 14px; }
header nav a { color: #bfdbfe; }
footer { font-size: 12px; color: #6b7280; text-align: center; padding-bottom: 24px; }
"""


@dataclass
class Section:
    """One input's block: a heading, key numbers in words, and its figures (name, figure)."""

    key: str
    title: str
    source: str
    summary: list[str] = field(default_factory=list)
    figures: list[tuple[str, go.Figure]] = field(default_factory=list)


def figure_id(section_key: str, name: str) -> str:
    """The div id of one figure; tests and links find figures by it."""
    return f"{section_key}-{name.replace('_', '-')}"


def render_page(title: str, facts: dict[str, list[str]], inputs: list[dict[str, str]], sections: list[Section],
                meta: dict) -> str:
    """The whole page as a string (the caller writes it atomically)."""
    esc = html.escape
    fact_html = " &nbsp;·&nbsp; ".join(f"{esc(k)}: <b>{esc(', '.join(v))}</b>" for k, v in facts.items())
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(str(row[c]))}</td>" for c in ("kind", "source", "model", "gpu", "trace",
                                                                  "tiersim_version")) + "</tr>"
        for row in inputs)
    table = ("<table class='inputs'><tr><th>input</th><th>file</th><th>model</th><th>GPU / device</th><th>trace</th>"
             f"<th>tiersim</th></tr>{rows}</table>")
    toc = " · ".join(f"<a href='#{esc(s.key)}'>{esc(s.title)}</a>" for s in sections)
    body = [f"<header><h1>{esc(title)}</h1><div class='facts'>{fact_html}</div>{table}"
            f"<nav>{toc}</nav></header><main>"]
    for section in sections:
        body.append(f"<section id='{esc(section.key)}'><h2>{esc(section.title)}</h2>")
        body.extend(f"<p class='summary'>{esc(line)}</p>" for line in section.summary)
        body.append(f"<p class='source'>from {esc(section.source)}</p>")
        for name, fig in section.figures:
            div_id = figure_id(section.key, name)
            div = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id, config=PLOT_CONFIG,
                              default_width="100%", default_height=f"{fig.layout.height or 480}px")
            body.append(f"<div class='figure' data-figure='{esc(name)}'>{div}</div>")
        body.append("</section>")
    body.append(f"</main><footer>{esc(meta.get('generator', 'tiersim'))} · {esc(meta.get('created', ''))} · "
                "interactive: hover for numbers, drag to zoom, double-click to reset</footer>")
    meta_json = dumps(meta, sort_keys=True).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title>"
        f"<meta name='generator' content='{esc(meta.get('generator', 'tiersim'))}'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<script type='application/json' id='tiersim-report'>{meta_json}</script>"
        f"<style>{STYLE}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script>"
        "</head><body>" + "\n".join(body) + "</body></html>\n"
    )
