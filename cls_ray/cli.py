"""The ``cls-ray`` command: parse arguments, load the config, call one stage function. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import sys

from cls_ray.config import ConfigError, RunFailed, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (local path or s3:// URI)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable",
    )


def _cmd_ingest(args: argparse.Namespace) -> int:
    from cls_ray.data.ingest import ingest

    overrides = (
        list(args.overrides)
        + (["ingest.overwrite=true"] if args.overwrite else [])
        + (["ingest.ffcv=true"] if args.ffcv else [])
    )
    cfg = load_config(args.config, overrides)
    ingest(args.src, args.dest, cfg.ingest)
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from cls_ray.data.fashion_mnist import write_fashion_mnist

    write_fashion_mnist(args.dest, source_dir=args.source, limit_per_class=args.limit_per_class)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cls_ray.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    train(args.data, cfg)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cls_ray.evaluate import evaluate

    evaluate(args.model, args.data, split=args.split, output_dir=args.output, batch_size=args.batch_size)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from cls_ray.predict import predict, print_prediction_summary

    cfg = load_config(args.config, args.overrides)
    print_prediction_summary(predict(args.model, args.src, args.dest, cfg.predict), rows=args.show)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cls_ray.report.build import build_report, print_report

    cfg = load_config(args.config, args.overrides)
    report = build_report(
        args.model, args.data, split=args.split, output_dir=args.output, cfg=cfg.report, calibrate=args.calibrate
    )
    print_report(report)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from cls_ray.audit import audit, print_audit

    overrides = list(args.overrides)
    if args.folds is not None:  # K-fold cross-validation audits the train split too, unless --splits says otherwise
        overrides += [f"audit.folds={args.folds}"] + ([] if args.splits else ["audit.splits=[train,val,test]"])
    overrides += [f"audit.splits=[{args.splits}]"] if args.splits else []
    cfg = load_config(args.config, overrides)
    print_audit(audit(args.model, args.data, output_dir=args.output, cfg=cfg.audit))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cls_ray.export import export_package, print_exports

    cfg = load_config(args.config, args.overrides)
    records = export_package(
        args.model,
        args.format,
        int8=args.int8,
        output_uri=args.output,
        calibration_data=args.calibration_data,
        cfg=cfg.export,
    )
    print_exports(records, args.output or args.model)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from cls_ray.tune.tuner import tune

    overrides = list(args.overrides) + ([f"tune.space={args.space}"] if args.space else [])
    cfg = load_config(args.config, overrides)
    tune(args.data, cfg)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from cls_ray.serve.app import serve_model, write_serve_config

    cfg = load_config(args.config, args.overrides)
    if args.write_config:
        write_serve_config(args.model, cfg.serve, args.write_config)
        return 0
    serve_model(args.model, cfg.serve, blocking=not args.detach)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from cls_ray.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    run_pipeline(cfg)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from cls_ray.pipeline import run_demo

    run_demo(workdir=args.workdir, overrides=args.overrides, keep_serving=args.keep_serving)
    return 0


def _add_model_and_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model package (local dir or s3:// URI)")
    p.add_argument("data", help="dataset written by cls-ray ingest (local dir or s3:// URI)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cls-ray", description=__doc__)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show everything: Ray's own log lines, worker output, deprecation warnings, debug logging",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="validate class folders and write Parquet shards + manifest.json")
    p.add_argument("src", help="class folders: local dir or s3://bucket/prefix")
    p.add_argument("dest", help="dataset output: local dir or s3://bucket/prefix")
    p.add_argument("--overwrite", action="store_true", help="replace a complete dataset at DEST")
    p.add_argument(
        "--ffcv",
        action="store_true",
        help="also write each split as an FFCV .beton file, for training with data.format=ffcv",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("datasets", help="write a built-in real dataset as class folders")
    p.add_argument("name", choices=["fashion-mnist"])
    p.add_argument("dest")
    p.add_argument("--source", help="directory holding the IDX .gz files (default: the Debian package's)")
    p.add_argument("--limit-per-class", type=int, default=None, help="write at most N images per class and split")
    p.set_defaults(func=_cmd_datasets)

    p = sub.add_parser("train", help="distributed training on Ray Train")
    p.add_argument("--data", required=True, help="dataset URI (holds manifest.json)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a model package on a dataset split")
    p.add_argument("model", help="model package URI")
    p.add_argument("data", help="dataset URI")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--output", default=None, help="where to write metrics (default: MODEL/eval-SPLIT)")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML page (+ report.json, MODEL_CARD.md) explaining and stress-testing a model",
    )
    _add_model_and_data_args(p)
    p.add_argument("--split", default="test", help="split to report on (default: test)")
    p.add_argument("--output", help="output folder (default: MODEL/report-SPLIT; local or s3://)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="write the temperature fitted on the validation split into the package (serve and predict use it)",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("audit", help="likely label errors (cleanlab) from the model's out-of-sample probabilities")
    _add_model_and_data_args(p)
    p.add_argument("--splits", help="comma-separated splits to audit (default: val,test; audit.splits)")
    p.add_argument(
        "--folds",
        type=int,
        help="K: audit the train split too, by K-fold cross-validation (K retrained models; audit.folds)",
    )
    p.add_argument("--output", help="output folder (default: MODEL/audit; local or s3://)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("predict", help="score every image below a folder or s3:// prefix (Ray Data) into Parquet/CSV")
    p.add_argument("model", help="model package URI")
    p.add_argument("src", help="images: local dir or s3://bucket/prefix, any depth")
    p.add_argument("dest", help="output directory (local or s3://); a re-run skips output files already written")
    p.add_argument("--show", type=int, default=5, metavar="N", help="print the first N result rows (default 5)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "export",
        help="export a model package to ONNX (optionally int8) or TorchScript, "
        "parity-checked against the package before it is recorded",
    )
    p.add_argument("model", help="model package URI")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument(
        "--int8",
        action="store_true",
        help="also a static int8 ONNX export (ONNX Runtime, QDQ), calibrated on the check's images",
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="URI",
        help="write into a copy of the package at URI instead of into the package",
    )
    p.add_argument(
        "--calibration-data",
        default=None,
        metavar="DIR",
        help="images to check (and calibrate) on instead of the package dataset's validation split; "
        "class folders named like the package's classes also give accuracies",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("tune", help="architecture + hyperparameter search (Ray Tune, Optuna, ASHA)")
    p.add_argument("--data", required=True, help="dataset URI")
    p.add_argument("--space", default=None, help="search space YAML (default: tune.space)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("serve", help="serve a model package with Ray Serve")
    p.add_argument("model", help="model package URI")
    p.add_argument("--detach", action="store_true", help="deploy and return instead of blocking")
    p.add_argument("--write-config", metavar="FILE", help="write a Serve config YAML for `serve deploy` and exit")
    _add_config_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("pipeline", help="run the whole chain from one config file")
    _add_config_args(p)
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("demo", help="the whole chain on Fashion-MNIST")
    p.add_argument("--workdir", default="demo_output")
    p.add_argument("--keep-serving", action="store_true", help="leave the model served and print its URL")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cls_ray.storage import s3_compat_env

    s3_compat_env()  # before any S3 client or Ray process starts, so every one of them inherits the choice
    from cls_ray.progress import console

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        with console(args.verbose):  # cls-ray's own lines only, unless -v
            return args.func(args)
    except ConfigError as exc:
        print(f"cls-ray {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"cls-ray {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        # Every user-facing error type of cls-ray (StorageError, IngestError, PackageError...) is one of these.
        print(f"cls-ray {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
