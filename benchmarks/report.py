"""Cost of ``cls-ray report`` against ``cls-ray evaluate`` of the same model on the same split, side by side.

Input: a model package and a cls-ray dataset (by default what ``make demo`` leaves: the final Fashion-MNIST model
in ``demo_output/runs/final/package`` and the dataset in ``demo_output/dataset``). Measured in one run, on one
local Ray instance of ``--cores`` CPUs (its start excluded from both):

- baseline: ``cls_ray.evaluate.evaluate`` of the split (one clean pass, metrics files written);
- cls-ray report: ``cls_ray.report.build.build_report`` of the same split with the configured report settings
  (clean pass, every corruption at every severity on the capped robustness sample, Grad-CAM sample, bootstrap,
  calibration on the validation split, page written into a scratch directory; the model card is written into the
  package, as ``cls-ray report`` does).

Reported: seconds of both, the ratio, the number of images the report scored (all passes) and its images/s next
to evaluate's. Target (docs/benchmarks.md): the demo model's report within a few minutes on 2 cores (<= 5 min).

Run: ``.venv/bin/python benchmarks/report.py [--model demo_output/runs/final/package] [--data demo_output/dataset]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import machine_description  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo_output/runs/final/package")
    parser.add_argument("--data", default="demo_output/dataset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="report.KEY=VALUE")
    args = parser.parse_args(argv)

    import ray

    from cls_ray.config import load_config
    from cls_ray.evaluate import evaluate
    from cls_ray.report.build import build_report

    cfg = load_config(None, args.overrides).report
    ray.init(address="local", num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="cls-ray-bench-report-") as tmp:
            start = time.perf_counter()
            metrics = evaluate(args.model, args.data, args.split, output_dir=str(Path(tmp) / "eval"))
            eval_s = time.perf_counter() - start
            start = time.perf_counter()
            report = build_report(args.model, args.data, args.split, output_dir=str(Path(tmp) / "report"), cfg=cfg)
            report_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    images = int(metrics["num_samples"])
    robustness = report.get("robustness") or {}
    corrupted = robustness.get("images", 0) * len(robustness.get("rows", []))
    record = {
        "benchmark": "report",
        "model": args.model,
        "architecture": report["summary"]["architecture"],
        "split": args.split,
        "images": images,
        "corruption_passes": len(robustness.get("rows", [])),
        "corrupted_images_scored": corrupted,
        "evaluate_s": eval_s,
        "report_s": report_s,
        "report_over_evaluate": report_s / eval_s,
        "evaluate_images_per_s": images / eval_s,
        "report_images_per_s": (images + corrupted) / report_s,
        "clean_top1_evaluate": metrics["top1"],
        "clean_top1_report": report["metrics"]["top1"],
        "cores": args.cores,
        "machine": machine_description(),
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
