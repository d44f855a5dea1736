"""``MODEL_CARD.md`` of a package, in the Hugging Face model-card layout (YAML metadata, then the sections), from the
numbers of its report."""

from __future__ import annotations

from typing import Any


def model_card(r: dict[str, Any], meta: dict[str, Any]) -> str:
    s, m, ci = r["summary"], r["metrics"], r["intervals"]

    def interval(name: str) -> str:
        low, high = ci.get(name, {}).get("low"), ci.get(name, {}).get("high")
        return f"{m[name]:.4f} ({low:.4f}-{high:.4f})" if low is not None else f"{m[name]:.4f}"

    rob = r["robustness"]
    worst = sorted(rob["rows"], key=lambda x: -x["relative_drop"])[:3]
    weak = sorted(r["per_class"], key=lambda c: c["f1"])[:3]
    cal = r["calibration"]
    lines = [
        "---",
        "library_name: cls-ray",
        "pipeline_tag: image-classification",
        "tags: [image-classification, timm, cls-ray]",
        "model-index:",
        f"- name: {s['name']}",
        "  results:",
        "  - task: {type: image-classification}",
        f"    dataset: {{name: {s['dataset']!r}, type: image-folder, split: {r['split']}}}",
        "    metrics:",
        f"    - {{type: accuracy, value: {m['top1']:.4f}}}",
        f"    - {{type: f1, name: macro F1, value: {m['f1_macro']:.4f}}}",
        "---",
        "",
        f"# {s['name']} (version {s['version']})",
        "",
        "## Model details",
        f"- Architecture: `{s['architecture']}` (timm), {s['parameters']:,} parameters, input "
        f"{'x'.join(map(str, s['input_size']))}",
        f"- Training mode: {s['training_mode']}" + (f" from `{s['pretrained']}`" if s.get("pretrained") else ""),
        f"- Weights: {s['weights']}; version = first 12 hex digits of the SHA-256 of `model.safetensors`",
        f"- Classes ({len(s['classes'])}): " + ", ".join(s["classes"]),
        "",
        "## Training data and split",
        f"- Dataset: `{s['dataset']}` (manifest digest `{meta.get('dataset', {}).get('manifest_digest', 'n/a')}`)",
        "- Split sizes: " + ", ".join(f"{k} {v}" for k, v in sorted(s["split_sizes"].items())),
        "",
        "## Evaluation results",
        f"On the {r['split']} split ({int(m['num_samples'])} images), with 95% bootstrap intervals:",
        "",
        "| metric | value (95% interval) |",
        "|---|---|",
        *(f"| {n} | {interval(n)} |" for n in ("top1", "top5", "precision_macro", "recall_macro", "f1_macro")),
        "",
        "## Robustness",
        (
            f"On {rob['images']} images (clean top-1 {rob['clean_top1']:.4f}), the largest drops: "
            + "; ".join(f"{x['corruption']} severity {x['severity']}: top-1 {x['top1']:.4f}" for x in worst)
            if worst
            else "Not measured."
        ),
        "",
        "## Calibration",
        f"Expected calibration error {cal['ece_before']:.4f}; {cal['ece_after']:.4f} with temperature "
        f"{cal['temperature']:.3f} fitted on {cal['fitted_on']}"
        + (" (applied: recorded in model.json)." if meta.get("calibration") else " (not applied; `--calibrate`)."),
        "",
        "## Known failure classes",
        "Lowest F1: " + ", ".join(f"{c['class']} ({c['f1']:.3f})" for c in weak),
        *(
            [
                f"Likely label errors in the {r['split']} split (cleanlab): "
                f"{r['label_issues']['count']} of {int(r['metrics']['num_samples'])} images "
                "(`cls-ray audit` lists them)."
            ]
            if (r.get("label_issues") or {}).get("count") is not None
            else []
        ),
        "",
        "## How to use",
        "```bash",
        "cls-ray serve PACKAGE                 # HTTP: POST an image to /predict",
        "cls-ray predict PACKAGE IMAGES/ OUT/  # batch scoring of a folder or s3:// prefix on Ray Data",
        "```",
        "",
    ]
    return "\n".join(lines)
