"""Render the report as one self-contained HTML page: inline CSS, inline PNGs (data: URIs), a few lines of inline
script for sortable tables; nothing is fetched from anywhere, so it opens from disk or from an S3 download."""

from __future__ import annotations

import html
import json
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222}h1{margin-bottom:0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
p.why{color:#555;margin-top:-.4em;font-style:italic}table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f4f4f4;cursor:pointer}
td.l,th.l{text-align:left}.flag{background:#fde2e2}.grid{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:200px;font-size:12px}figure img{image-rendering:pixelated;width:96px;height:auto}
.note{background:#fff7d6;border-left:4px solid #e0b400;padding:.4em .8em}nav a{margin-right:1em}
.pics{display:flex;gap:4px}img.plot{max-width:100%}
"""

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v || a.cells[col].textContent;
      var y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""

SECTIONS = [
    ("summary", "Summary", "What was evaluated, on what, and how well, with 95% bootstrap confidence intervals."),
    ("curves", "Training curves", "How loss, validation accuracy and learning rate moved during training."),
    ("confusion", "Confusion matrix", "Which true classes (rows) get predicted as which classes (columns)."),
    (
        "top-losses",
        "Top losses",
        "The wrong predictions the model was most sure about: often label errors or hard cases.",
    ),
    ("gallery", "Examples per class", "The most confident correct and the worst wrong examples of every class."),
    ("gradcam", "Grad-CAM", "Where in the image the model looked for the class it predicted (red: most evidence)."),
    (
        "robustness",
        "Robustness",
        "Accuracy when the images get worse (noise, blur, compression, light, colour, framing), at three severities.",
    ),
    (
        "calibration",
        "Calibration",
        "Whether a predicted probability of 0.8 is right 80% of the time; a fitted "
        "temperature corrects over- or under-confidence.",
    ),
    ("slices", "Slices", "Accuracy per group of images (source, device...), to find groups the model fails."),
    (
        "label-issues",
        "Label issues",
        "Images whose given label is probably wrong (cleanlab's confident learning on this split's predictions): "
        "check these labels before trusting the metrics above.",
    ),
]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _f(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _img(src: str | None, alt: str, cls: str = "") -> str:
    if not src:
        return ""
    return f'<img src="{src}" alt="{_e(alt)}"' + (f' class="{cls}"' if cls else "") + ">"


def _figure(item: dict[str, Any], with_cam: bool = True) -> str:
    pics = _img(item.get("thumbnail"), item["path"]) + (
        _img(item.get("gradcam"), "Grad-CAM of " + item["path"]) if with_cam else ""
    )
    return (
        f'<figure><div class="pics">{pics}</div><figcaption>{_e(item["path"])}<br>true <b>{_e(item["true"])}</b>, '
        f"predicted <b>{_e(item['predicted'])}</b> ({item['probability']:.2f}); loss {item['loss']:.2f}"
        "</figcaption></figure>"
    )


def _section(key: str, body: str) -> str:
    title, why = next((t, w) for k, t, w in SECTIONS if k == key)
    return f'<section id="{key}"><h2>{_e(title)}</h2><p class="why">{_e(why)}</p>{body}</section>'


def _summary(r: dict[str, Any]) -> str:
    s, m, ci = r["summary"], r["metrics"], r["intervals"]
    facts = [
        ("model", f"{s['name']} version {s['version']}"),
        ("architecture", s["architecture"]),
        ("input size", "x".join(map(str, s["input_size"]))),
        ("parameters", f"{s['parameters']:,}"),
        ("training mode", s["training_mode"] + (f" from {s['pretrained']}" if s.get("pretrained") else "")),
        ("dataset", s["dataset"]),
        (
            "classes",
            f"{len(s['classes'])}: " + ", ".join(s["classes"][:20]) + (" ..." if len(s["classes"]) > 20 else ""),
        ),
        ("split sizes", ", ".join(f"{k} {v}" for k, v in sorted(s["split_sizes"].items()))),
        ("evaluated on", f"{r['split']} ({int(m['num_samples'])} images)"),
    ]
    rows = "".join(f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(v)}</td></tr>' for k, v in facts)
    metric_rows = "".join(
        f"<tr><td class='l'>{name}</td><td>{_f(m[name])}</td><td>{_f(ci.get(name, {}).get('low'))}</td>"
        f"<td>{_f(ci.get(name, {}).get('high'))}</td></tr>"
        for name in ("top1", "top5", "precision_macro", "recall_macro", "f1_macro")
    )
    return (
        f"<table>{rows}</table><table><thead><tr><th class='l'>metric</th><th>value</th><th>95% low</th>"
        f"<th>95% high</th></tr></thead><tbody>{metric_rows}</tbody></table>"
    )


def _per_class(r: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td class='l'>{_e(c['class'])}</td><td>{c['precision']:.4f}</td><td>{c['recall']:.4f}</td>"
        f"<td data-v='{c['f1']}'>{c['f1']:.4f}</td><td>{c['support']}</td></tr>"
        for c in sorted(r["per_class"], key=lambda c: c["f1"])
    )
    pairs = "".join(
        f"<tr><td class='l'>{_e(p['true'])}</td><td class='l'>{_e(p['predicted'])}</td><td>{p['count']}</td>"
        f"<td>{p['share']:.3f}</td></tr>"
        for p in r["confused_pairs"]
    )
    return (
        "<h3>Per class (click a column to sort; worst F1 first)</h3><table class='sortable' id='per-class'><thead>"
        "<tr><th class='l'>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr></thead>"
        f"<tbody>{rows}</tbody></table><h3>Most confused pairs</h3>"
        + (
            "<table><thead><tr><th class='l'>true</th><th class='l'>predicted as</th><th>images</th>"
            f"<th>share of the true class</th></tr></thead><tbody>{pairs}</tbody></table>"
            if pairs
            else "<p>No image was confused with another class.</p>"
        )
    )


def _robustness(r: dict[str, Any], plot: str | None) -> str:
    rob = r["robustness"]
    if not rob["rows"]:
        return "<p class='note'>No corruptions were configured (report.corruptions is empty).</p>"
    rows = "".join(
        f"<tr><td class='l'>{_e(x['corruption'])}</td><td>{x['severity']}</td><td>{_e(x['parameter'])}</td>"
        f"<td>{x['top1']:.4f}</td><td>{100 * x['relative_drop']:.1f}%</td></tr>"
        for x in rob["rows"]
    )
    worst = ", ".join(f"{_e(c['class'])} ({100 * c['mean_drop']:.1f} points)" for c in rob["classes"])
    desc = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in rob.get("descriptions", {}).items())
    return (
        f"<p>On {rob['images']} images of the split (clean top-1 {rob['clean_top1']:.4f}), each corrupted before "
        "the serving preprocessing; seeded, so the numbers repeat.</p>"
        f"{_img(plot, 'robustness plot', 'plot')}<table class='sortable'><thead><tr><th class='l'>corruption</th>"
        "<th>severity</th><th>parameter</th><th>top-1</th><th>relative drop</th></tr></thead>"
        f"<tbody>{rows}</tbody></table><p>Classes that suffer most (mean accuracy drop): {worst}</p><ul>{desc}</ul>"
    )


def _calibration(r: dict[str, Any], plot: str) -> str:
    c = r["calibration"]
    return (
        f"<p>Expected calibration error on {_e(r['split'])}: <b>{c['ece_before']:.4f}</b> as trained, "
        f"<b>{c['ece_after']:.4f}</b> with temperature T = {c['temperature']:.3f} fitted on the "
        f"{_e(c['fitted_on'])} split (T &gt; 1: the model was over-confident). Negative log-likelihood "
        f"{c['nll_before']:.4f} -> {c['nll_after']:.4f}. <code>cls-ray report --calibrate</code> writes T into the "
        "package, and serve and predict then use it.</p>"
        + (f"<p class='note'>Caution: {_e(c['note'])}.</p>" if c.get("note") else "")
        + _img(plot, "reliability diagram", "plot")
    )


SLICE_ROWS = 100


def _label_issues(r: dict[str, Any]) -> str:
    li = r.get("label_issues") or {}
    if li.get("count") is None:
        return f"<p class='note'>Not computed: {_e(li.get('note') or 'no result')}.</p>"
    if not li["count"]:
        return "<p>cleanlab flags no image of this split.</p>"
    figures = "".join(
        f'<figure><div class="pics">{_img(i.get("thumbnail"), i["path"])}</div><figcaption>{_e(i["path"])}<br>'
        f"given <b>{_e(i['true'])}</b>, probably <b>{_e(i['predicted'])}</b> ({i['probability']:.2f}); "
        f"label quality {i['label_quality']:.3f}</figcaption></figure>"
        for i in li["items"]
    )
    return (
        f"<p>{li['count']} of {int(r['metrics']['num_samples'])} images flagged; the {len(li['items'])} most likely "
        f"first (<code>cls-ray audit</code> writes the full list as CSV and JSON).</p><div class='grid'>{figures}</div>"
    )


def _slices(r: dict[str, Any]) -> str:
    s = r["slices"]
    if not s["groups"]:
        return f"<p class='note'>{_e(s['note'])}</p>"
    # Many small groups (one per patient, say) would flood the page: the weakest SLICE_ROWS groups of a useful
    # size are shown, small ones after them; report.json has every group.
    big = [g for g in s["groups"] if g["images"] >= r["config"]["slice_min_images"]]
    small = [g for g in s["groups"] if g["images"] < r["config"]["slice_min_images"]]
    shown = (big + small)[:SLICE_ROWS]
    rows = "".join(
        f"<tr class='{'flag' if g['flagged'] else ''}'><td class='l'>{_e(g['group'])}</td><td>{g['images']}</td>"
        f"<td>{g['top1']:.4f}</td><td>{'below the split by more than the threshold' if g['flagged'] else ''}</td></tr>"
        for g in shown
    )
    more = (
        f"<p class='note'>{len(s['groups']) - len(shown)} more groups in report.json.</p>"
        if len(shown) < len(s["groups"])
        else ""
    )
    return (
        f"<p>Groups from the {_e(s['source'])}; flagged rows are far below the overall top-1 "
        f"({r['metrics']['top1']:.4f}).</p><table class='sortable'><thead><tr><th class='l'>group</th>"
        f"<th>images</th><th>top-1</th><th class='l'>flag</th></tr></thead><tbody>{rows}</tbody></table>{more}"
    )


def render(r: dict[str, Any], plots: dict[str, Any]) -> str:
    """The page of report ``r`` with its ``plots`` (data: URIs of PNGs)."""
    s = r["summary"]
    nav = "".join(f'<a href="#{k}">{_e(t)}</a>' for k, t, _ in SECTIONS)
    curves = (
        _img(plots["curves"], "training curves", "plot")
        if plots.get("curves")
        else f"<p class='note'>No training curves: {_e(r['history_note'])}.</p>"
    )
    counts, rates = plots["confusion"]
    confusion = (
        f"<div class='grid'>{_img(counts, 'confusion matrix (counts)', 'plot')}"
        f"{_img(rates, 'confusion matrix (row-normalised)', 'plot')}</div>" + _per_class(r)
    )
    top = (
        "<div class='grid'>" + "".join(_figure(i) for i in r["top_losses"]) + "</div>"
        if r["top_losses"]
        else "<p>No image of this split is misclassified.</p>"
    )
    gallery = "".join(
        f"<h3>{_e(c)}</h3><div class='grid'>"
        + "".join(_figure(i, with_cam=False) for i in g["correct"] + g["wrong"])
        + "</div>"
        for c, g in r["gallery"].items()
    )
    g = r["gradcam"]
    if g["error"]:
        cam = f"<p class='note'>Grad-CAM cannot explain this model: {_e(g['error'])}</p>"
    elif g["overlays"]:
        cam = (
            f"<p>Target layer <code>{_e(g['layer'])}</code>, for the predicted class; the top losses and "
            "correct examples per class.</p><div class='grid'>" + "".join(_figure(i) for i in g["overlays"]) + "</div>"
        )
    else:
        cam = "<p class='note'>No images were selected for Grad-CAM (report.gradcam_max_images is 0).</p>"
    body = "".join(
        [
            _section("summary", _summary(r)),
            _section("curves", curves),
            _section("confusion", confusion),
            _section("top-losses", top),
            _section("gallery", gallery),
            _section("gradcam", cam),
            _section("robustness", _robustness(r, plots.get("robustness"))),
            _section("calibration", _calibration(r, plots["reliability"])),
            _section("slices", _slices(r)),
            _section("label-issues", _label_issues(r)),
        ]
    )
    data = json.dumps({"format_version": r["format_version"], "model": s["name"], "version": s["version"]})
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<title>cls-ray report: {_e(s['name'])} {_e(s['version'])} on {_e(r['split'])}</title>"
        f"<style>{CSS}</style></head><body><h1>{_e(s['name'])} <small>version {_e(s['version'])}</small></h1>"
        f"<p>Report of <code>{_e(r['model_uri'])}</code> on the <b>{_e(r['split'])}</b> split of "
        f"<code>{_e(s['dataset'])}</code>, made by cls-ray in {r['seconds']:.0f} s.</p><nav>{nav}</nav>{body}"
        f"<script type='application/json' id='report-meta'>{_e(data)}</script><script>{SORT_JS}</script>"
        "</body></html>"
    )
