"""The feature browser as a static site: index.html (a sortable table of latents), one page per
latent under latents/, and features.json with the same data. Everything inline (CSS, JS, SVG):
no server, no network, no external fonts. All token text goes through `esc`."""

from __future__ import annotations

import html
import json
from pathlib import Path

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse;width:100%}th,td{padding:3px 8px;border-bottom:1px solid #ddd;
text-align:left}th{cursor:pointer;background:#f3f3f3;user-select:none}td.n{text-align:right;
font-variant-numeric:tabular-nums}tr:hover{background:#fafafa}
.ex{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:3px 0;padding:3px 0;
border-bottom:1px dotted #ddd}.ex .v{display:inline-block;width:5.5em;color:#666}
.t{border-radius:2px}.f{outline:2px solid #c40;font-weight:bold}.ws{color:#999}
.tok{font-family:ui-monospace,monospace;background:#eef;padding:0 3px;border-radius:2px}
.cols{display:flex;gap:3em}.meta{color:#555}a{color:#15c}
"""

SORT_JS = """
document.querySelectorAll('th').forEach(function(th,col){th.addEventListener('click',function(){
var tb=th.closest('table').tBodies[0],rows=Array.from(tb.rows),up=th.dataset.dir!=='up';
th.dataset.dir=up?'up':'down';rows.sort(function(a,b){var x=a.cells[col].dataset.v,
y=b.cells[col].dataset.v,nx=parseFloat(x),ny=parseFloat(y);var c=(isNaN(nx)||isNaN(ny))?
x.localeCompare(y):nx-ny;return up?c:-c;});rows.forEach(function(r){tb.appendChild(r);});});});
"""

_VISIBLE = {"\n": "\u21b5", "\r": "\u240d", "\t": "\u2192"}


def esc(text: str) -> str:
    """HTML-escape text, quotes included."""
    return html.escape(text, quote=True)


def visible(tok: str, spaces: bool = False) -> str:
    """Token text with newlines/tabs as glyphs; a token of only spaces (or any space, with
    spaces=True) shown as a middle dot, so whitespace tokens are visible."""
    out = "".join(_VISIBLE.get(c, c) for c in tok)
    if spaces or not tok.strip(" "):
        out = out.replace(" ", "\u00b7")
    return out or "\u2205"


def page(title: str, body: str, script: str = "") -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n{body}\n"
            + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


def index_page(data: dict) -> str:
    rows = []
    for f in data["latents"]:
        i = f["index"]
        rows.append(f"<tr><td class=\"n\" data-v=\"{i}\"><a href=\"latents/{i}.html\">{i}</a></td>"
                    f"<td class=\"n\" data-v=\"{f['frequency']:.8g}\">{f['frequency']:.3%}</td>"
                    f"<td class=\"n\" data-v=\"{f['max_activation']:.6g}\">"
                    f"{f['max_activation']:.3g}</td>"
                    f"<td data-v=\"{esc(f['label'])}\">{esc(visible(f['label']))}</td></tr>")
    body = (f"<h1>SAE features: {esc(data['hook'])}</h1>"
            f"<p class=\"meta\">SAE {esc(data['sae'])} &middot; cache {esc(data['cache'])} "
            f"({esc(data['cache_id'])}) &middot; held-out chunks {esc(str(data['holdout_chunks']))}"
            f" &middot; {data['tokens_scanned']} tokens scanned &middot; {len(data['latents'])} "
            f"of {data['d_sae']} latents &middot; click a column to sort</p>"
            "<table id=\"latents\"><thead><tr><th>latent</th><th>frequency</th><th>max act</th>"
            "<th>label (top tokens)</th></tr></thead><tbody>\n" + "\n".join(rows)
            + "\n</tbody></table>")
    return page("SAE features", body, SORT_JS)


def histogram_svg(hist: dict, w: int = 420, h: int = 120) -> str:
    """Inline SVG bar chart of the non-zero activations (bins of hist['bin_width'])."""
    counts, width = hist["counts"], hist["bin_width"]
    if not any(counts):
        return "<p class=\"meta\">never fires on the scanned tokens</p>"
    last = max(j for j, c in enumerate(counts) if c) + 1
    top, bw = max(counts), (w - 40) / last
    bars = []
    for j, c in enumerate(counts[:last]):
        bh = (h - 25) * c / top
        bars.append(f"<rect x=\"{30 + j * bw:.1f}\" y=\"{h - 20 - bh:.1f}\" width=\""
                    f"{max(bw - 1, 1):.1f}\" height=\"{bh:.1f}\" fill=\"#e60\"><title>"
                    f"[{j * width:.3g}, {(j + 1) * width:.3g}): {c}</title></rect>")
    return (f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" "
            f"role=\"img\"><line x1=\"30\" y1=\"{h - 20}\" x2=\"{w - 10}\" y2=\"{h - 20}\" "
            f"stroke=\"#888\"/>{''.join(bars)}<text x=\"30\" y=\"{h - 5}\" font-size=\"11\">0"
            f"</text><text x=\"{w - 10}\" y=\"{h - 5}\" font-size=\"11\" text-anchor=\"end\">"
            f"{last * width:.3g}</text><text x=\"2\" y=\"12\" font-size=\"11\">{top}</text></svg>")


def example_html(ex: dict, scale: float) -> str:
    """One top example: context tokens shaded by this latent's activation on them, the firing
    token outlined."""
    spans = []
    for j, (tok, act) in enumerate(zip(ex["text"], ex["activations"], strict=True)):
        alpha = min(max(act / scale, 0.0), 1.0) if scale > 0 else 0.0
        cls = "t f" if j == ex["center"] else "t"
        ws = " ws" if not tok.strip() else ""
        spans.append(f"<span class=\"{cls}{ws}\" style=\"background:rgba(255,110,0,{alpha:.2f})\""
                     f" title=\"{act:.3g}\">{esc(visible(tok))}</span>")
    return (f"<div class=\"ex\"><span class=\"v\">{ex['activation']:.3g}</span>"
            + "".join(spans) + "</div>")


def token_list(items: list[dict]) -> str:
    return "<table>" + "".join(
        f"<tr><td><span class=\"tok\">{esc(visible(t['token'], spaces=True))}</span></td>"
        f"<td class=\"n\">{t['logit']:+.3f}</td></tr>" for t in items) + "</table>"


def latent_page(f: dict, data: dict) -> str:
    examples = "\n".join(example_html(ex, f["max_activation"]) for ex in f["examples"])
    body = (f"<p><a href=\"../index.html\">&larr; all latents</a></p>"
            f"<h1>Latent {f['index']}</h1><p class=\"meta\">{esc(data['hook'])} &middot; "
            f"frequency {f['frequency']:.4%} ({f['fired']} of {data['tokens_scanned']} tokens) "
            f"&middot; max activation {f['max_activation']:.4g} &middot; label "
            f"{esc(visible(f['label']))}</p>"
            f"<h2>Activation histogram (non-zero)</h2>{histogram_svg(f['histogram'])}"
            f"<div class=\"cols\"><div><h2>Promoted tokens</h2>{token_list(f['promoted'])}</div>"
            f"<div><h2>Suppressed tokens</h2>{token_list(f['suppressed'])}</div></div>"
            f"<h2>Top activations</h2><div id=\"examples\">"
            + (examples or "<p class=\"meta\">no activations</p>") + "</div>")
    return page(f"Latent {f['index']}", body)


SITE_FILES = ("index.html", "features.json")  # and latents/, a folder


def write_site(out: Path, data: dict) -> Path:
    """Write index.html, latents/<i>.html and features.json under out; returns index.html."""
    (out / "latents").mkdir(parents=True, exist_ok=True)
    for f in data["latents"]:
        (out / "latents" / f"{f['index']}.html").write_text(latent_page(f, data), encoding="utf-8")
    (out / "features.json").write_text(json.dumps(data), encoding="utf-8")
    index = out / "index.html"
    index.write_text(index_page(data), encoding="utf-8")
    return index
