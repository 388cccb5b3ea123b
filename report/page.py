"""The report's HTML page and text: figure titles and captions, the per-theme tables, the page itself."""
from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence

from .figures import ThemeRow, fmt, sorted_by_srcc

CAPTIONS = {
    "per_theme_metrics": "SRCC and PLCC between predicted and true scores within each theme, best SRCC first; "
                         "n is the theme's number of images. Themes with fewer than 2 images (or constant "
                         "scores) have no correlation: n/a.",
    "per_theme_means": "Mean true score (circle) and mean predicted score (diamond) of each theme: a gap shows "
                       "a theme the model over- or under-rates as a whole.",
    "scatter": "Every image's predicted against its true score; points on the dashed line are exact.",
    "histograms": "How true and predicted scores are spread: a narrow predicted histogram means the model "
                  "stays near the mean.",
    "distributions": "ava variant: the true vote distribution (votes) and the predicted distribution over the "
                     "scores 1..10 of images spread over the true score.",
    "rgb_attention": "The RGB-distribution attention (RGBNet): the model's 224x224 input, its 12x12 average "
                     "patch colours (de-normalised for display) and the 144x144 cosine similarity of the "
                     "ImageNet-normalised patch colours that feeds head_rgb (patches in row-major order).",
    "hidden_nodes": "Theme hidden-node activations (paper, Figure 7): for each of the 100 hidden nodes of the "
                    "theme branch (tygertnet), how many images have it as their most positive (top) and most "
                    "negative (bottom) node. Node indices are arbitrary: compare the shape of the "
                    "counts (a few dominant nodes or a spread), not the positions, with the paper.",
    "best_worst": "The images the model scores highest and lowest, with their true and predicted scores.",
}
TITLES = {
    "per_theme_metrics": "Per-theme SRCC and PLCC", "per_theme_means": "Mean scores per theme",
    "scatter": "Predicted against true scores", "histograms": "Score histograms",
    "distributions": "Predicted against true score distributions", "rgb_attention": "RGB-distribution attention",
    "hidden_nodes": "Theme hidden-node activations", "best_worst": "Best and worst scored images",
}


def theme_table(rows: Sequence[ThemeRow]) -> str:
    head = "<tr><th>theme</th><th>images</th><th>SRCC</th><th>PLCC</th><th>mean true</th><th>mean predicted</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(r.theme)}</td><td>{r.n}</td><td>{fmt(r.srcc)}</td><td>{fmt(r.plcc)}"
        f"</td><td>{fmt(r.mean_true, 2)}</td><td>{fmt(r.mean_pred, 2)}</td></tr>"
        for r in sorted_by_srcc(rows))
    return f'<table class="themes">{head}{body}</table>'


def markdown_table(rows: Sequence[ThemeRow]) -> str:
    lines = ["| theme | images | SRCC | PLCC | mean true | mean predicted |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.theme} | {r.n} | {fmt(r.srcc)} | {fmt(r.plcc)} | {fmt(r.mean_true, 2)} "
              f"| {fmt(r.mean_pred, 2)} |" for r in sorted_by_srcc(rows)]
    return "\n".join(lines)


_SCRIPT = ("window.addEventListener('load',function(){var b=[].filter.call(document.images,function(i){"
           "return !i.complete||i.naturalWidth===0;});document.body.setAttribute('data-broken-images',b.length);});")
_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
          "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
          "p.caption{color:#444}p.note{color:#8a4b00}")


def render_html(title: str, facts: Sequence[tuple[str, str]], pngs: Mapping[str, bytes],
                rows: Sequence[ThemeRow], notes: Sequence[str]) -> str:
    """One self-contained page: the facts table, then every figure (embedded PNG) with its caption."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
             f"<h1>{html.escape(title)}</h1><table class='facts'>"]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts]
    parts.append("</table>")
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    for name, png in pngs.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2 id='{name}'>{html.escape(TITLES[name])}</h2>"
                     f"<p class='caption'>{html.escape(CAPTIONS[name])}</p>"
                     f"<img alt='{html.escape(TITLES[name])}' src='data:image/png;base64,{data}'>")
        if name == "per_theme_metrics":
            parts.append(theme_table(rows))
    parts.append("</body></html>\n")
    return "".join(parts)
