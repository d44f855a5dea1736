"""Serving benchmark: throughput and latency of the Ray Serve endpoint under concurrent load on loopback.

Three runs against the same model package, the same replicas and the same cores:

1. dynamic batching (``@serve.batch``, ``--max-batch-size``) under ``--concurrency`` concurrent clients;
2. the same replica switched in place (its ``reconfigure`` method) to ``max_batch_size=1``, same load;
3. one client at a time on (2), against calling the model directly in this process with the same images, the same
   preprocessing and a batch of one: the difference is what the HTTP path adds per request.

The runs alternate over ``--rounds`` rounds and the medians are reported, so a change in the machine's load hits
every variant alike. The load comes from a separate process (aiohttp, keep-alive connections). Besides wall-clock
latency, the CPU time the Serve proxy, ingress and model processes spend per request is recorded: on a shared
machine wall time grows with everyone else's load, CPU time much less. Images are real Fashion-MNIST pictures
(Debian package ``dataset-fashion-mnist``) encoded as PNG. Run: ``.venv/bin/python benchmarks/serve.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import io
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import timm
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import FASHION_MNIST_DIR, read_fashion_mnist  # noqa: E402

from cls_ray.config import ServeConfig  # noqa: E402
from cls_ray.models import model_data_config  # noqa: E402
from cls_ray.package import save_model_package  # noqa: E402
from cls_ray.predict import Predictor  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv3_small_050", help="timm architecture (random weights)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients in runs 1 and 2")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds of all runs; medians are reported")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each run")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    p.add_argument("--model-cpus", type=int, default=1, help="CPUs (torch threads) of the model replica")
    p.add_argument("--num-images", type=int, default=64, help="distinct images cycled through")
    p.add_argument(
        "--direct-ingress",
        action="store_true",
        help="Ray Serve's experimental direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1): the ingress "
        "replica listens on port 8000 itself, no proxy hop",
    )
    p.add_argument(
        "--model-only",
        action="store_true",
        help="only the model alone (no Serve, no Ray): batch of 1 vs --max-batch-size, on --device",
    )
    p.add_argument("--device", default="cpu", help="device of --model-only (cuda: channels-last + --amp)")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnx"],
        help="model runtime of the replica and the direct baseline (onnx: the package is exported first)",
    )
    p.add_argument("--int8", action="store_true", help="with --backend onnx: serve the int8 export")
    p.add_argument(
        "--topology",
        default="split",
        choices=["split", "single"],
        help="serve.topology: ingress and model replicas (1 CPU each by default), or one deployment whose replica "
        "(--model-cpus + 1 CPUs) decodes and runs the model",
    )
    p.add_argument("--fashion-mnist-dir", type=Path, default=FASHION_MNIST_DIR)
    p.add_argument("--output", help="also write the results as JSON here")
    args = p.parse_args()
    if args.int8 and args.backend != "onnx":
        p.error("--int8 needs --backend onnx")
    args.precision = "int8" if args.int8 else "fp32"
    return args


def make_package(root: Path, model_name: str, image_size: int) -> str:
    model = timm.create_model(model_name, num_classes=10).eval()
    meta = {
        "architecture": model_name,
        "classes": [f"class_{i}" for i in range(10)],
        "name": "bench",
        "data_config": model_data_config(model, image_size),
    }
    return save_model_package(str(root / "package"), model, meta)


def export_for_backend(model_uri: str, payloads: list[bytes], args: argparse.Namespace) -> None:
    """With ``--backend onnx``: export the package (fp32, and int8 with ``--int8``), checked on the payloads.

    The weights are random, so int8's accuracy is meaningless here: its tolerance is lifted (its fp32 check holds)."""
    if args.backend != "onnx":
        return
    from cls_ray.config import ExportConfig
    from cls_ray.export import export_package

    folder = Path(model_uri).parent / "calibration"
    folder.mkdir()
    for i, data in enumerate(payloads):
        (folder / f"{i:05d}.png").write_bytes(data)
    cfg = ExportConfig(max_images=len(payloads), int8_max_accuracy_drop=1.0)
    for r in export_package(model_uri, "onnx", int8=args.int8, calibration_data=str(folder), cfg=cfg):
        print(
            f"exported {r['file']}: {r['bytes'] / 1e6:.2f} MB, max abs diff {r['parity']['max_abs_diff']:.2e}, "
            f"top-1 agreement {r['parity']['top1_agreement']:.3f}"
        )


def make_payloads(num_images: int, side: int, root: Path = FASHION_MNIST_DIR) -> list[bytes]:
    images, _ = read_fashion_mnist(num_images, root)
    payloads = []
    for gray in images:
        buf = io.BytesIO()
        Image.fromarray(gray).resize((side, side), Image.Resampling.BICUBIC).convert("RGB").save(buf, "PNG")
        payloads.append(buf.getvalue())
    return payloads


async def _load(url: str, payloads: list[bytes], concurrency: int, duration: float, warmup: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = total = 0
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + duration
    headers = {"Content-Type": "image/png"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def client(i: int) -> None:
            nonlocal errors, total
            while (t0 := time.perf_counter()) < end:
                async with session.post(url, data=payloads[i % len(payloads)], headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
                total += 1
                if t0 >= measure_from:
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1
                i += concurrency

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return {**summarize(latencies, duration, errors), "total_requests": total}


def summarize(latencies: list[float], duration: float, errors: int = 0) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    return {
        "requests": len(ms),
        "errors": errors,
        "throughput_rps": len(ms) / duration,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "mean_ms": statistics.fmean(ms),
    }


def run_load(url: str, payloads: list[bytes], concurrency: int, duration: float, warmup: float) -> dict:
    """The load generator, in its own (spawned) process so it does not share this one's interpreter."""
    return asyncio.run(_load(url, payloads, concurrency, duration, warmup))


def load_from_process(
    pool: cf.ProcessPoolExecutor, url: str, payloads: list[bytes], concurrency: int, args: argparse.Namespace
) -> dict:
    return pool.submit(run_load, url, payloads, concurrency, args.duration, args.warmup).result()


def measure_direct(
    model_uri: str,
    payloads: list[bytes],
    duration: float,
    threads: int,
    backend: str = "torch",
    precision: str = "fp32",
) -> dict:
    """The same preprocessing and forward pass, batch of one, called in-process: the no-HTTP baseline."""
    torch.set_num_threads(threads)
    predictor = Predictor.from_uri(model_uri, backend=backend, precision=precision)
    for data in payloads[:8]:
        predictor.predict_batch([predictor.preprocess(data)])
    latencies = []
    end = time.perf_counter() + duration
    cpu_start = time.process_time()
    i = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        predictor.predict_batch([predictor.preprocess(payloads[i % len(payloads)])])
        latencies.append(time.perf_counter() - t0)
        i += 1
    return {**summarize(latencies, duration), "cpu_ms_per_request": (time.process_time() - cpu_start) * 1000 / i}


def serve_config(args: argparse.Namespace, port: int, max_batch_size: int) -> ServeConfig:
    return ServeConfig(
        port=port,
        app_name="bench",
        min_replicas=1,
        max_replicas=1,
        ingress_max_replicas=1,
        num_cpus=args.model_cpus,
        ingress_num_cpus=1,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_ongoing_requests=max(64, 2 * args.max_batch_size),
        backend=args.backend,
        onnx_precision=args.precision,
        topology=args.topology,
    )


SERVE_ROLES = {
    "proxy": "ProxyActor",
    "ingress": "ServeReplica:bench:ClassifierIngress",
    "model": "ServeReplica:bench:ClassifierModel",
}
"""Process titles of each role; with ``--topology single`` the one replica counts as the model (ingress: 0)."""
SINGLE_ROLES = {
    "proxy": "ProxyActor",
    "ingress": "ServeReplica:bench:ClassifierIngress",
    "model": "ServeReplica:bench:Classifier ",
}


def serving_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this cluster's Serve proxy, ingress and model replica processes
    (Ray's workers are children of this process). CPU time is not inflated by other jobs the way wall time is."""
    import psutil

    totals = dict.fromkeys(SERVE_ROLES, 0.0)
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:
            continue
        for role, marker in SERVE_ROLES.items():
            if marker in title:
                totals[role] += times.user + times.system
    return totals


def idle_cpu_rate(seconds: float) -> dict[str, float]:
    """CPU seconds per second each Serve role uses with no request in flight."""
    before = serving_cpu_seconds()
    time.sleep(seconds)
    after = serving_cpu_seconds()
    return {role: (after[role] - before[role]) / seconds for role in SERVE_ROLES}


def replica_stats(url: str) -> dict:
    return requests.get(f"{url}/v1/stats", timeout=30).json()


def _set_batching(model, url: str, max_batch_size: int, wait_s: float, replica: str) -> None:
    """Switch the one model replica's batching in place (its reconfigure method) and check it is the same one."""
    model.reconfigure.remote({"max_batch_size": max_batch_size, "batch_wait_timeout_s": wait_s}).result()
    assert replica_stats(url)["replica"] == replica, "the model replica was replaced"


def run_serving(args: argparse.Namespace, model_uri: str, payloads: list[bytes]) -> dict[str, list[dict]]:
    """``args.rounds`` rounds of (batching, max_batch_size=1, one client, direct call), alternated so that a
    change in the machine's load hits every variant alike."""
    import ray
    from ray import serve

    from cls_ray.serve.app import start_serving, stop_serving
    from cls_ray.serve.deployment import MODEL_DEPLOYMENT, SINGLE_DEPLOYMENT

    if args.topology == "single":
        SERVE_ROLES.update(SINGLE_ROLES)
    if args.direct_ingress:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"  # read by Serve's processes, so set before ray.init
    ray.init(address="local", include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
    port = 8000 if args.direct_ingress else _free_port()
    results: dict[str, list[dict]] = {"batched": [], "unbatched": [], "sequential_http": [], "direct": []}
    ctx = multiprocessing.get_context("spawn")
    try:
        with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            url = start_serving(model_uri, serve_config(args, port, args.max_batch_size))
            predict = f"{url}/v1/predict"
            name = SINGLE_DEPLOYMENT if args.topology == "single" else MODEL_DEPLOYMENT
            model = serve.get_deployment_handle(name, app_name="bench")
            replica = replica_stats(url)["replica"]
            idle = idle_cpu_rate(args.warmup + args.duration)
            results["idle_cpu_ms_per_s"] = {role: rate * 1000 for role, rate in idle.items()}
            for _ in range(args.rounds):
                for key, size, wait, clients in (
                    ("batched", args.max_batch_size, args.batch_wait_timeout_s, args.concurrency),
                    ("unbatched", 1, 0.0, args.concurrency),
                    ("sequential_http", 1, 0.0, 1),
                ):
                    _set_batching(model, url, size, wait, replica)
                    cpu_before, t0 = serving_cpu_seconds(), time.perf_counter()
                    result = load_from_process(pool, predict, payloads, clients, args)
                    cpu_after, wall = serving_cpu_seconds(), time.perf_counter() - t0
                    # Minus what the processes burn when idle (Ray's background threads), per request of the run.
                    result["cpu_ms_per_request"] = {
                        role: max(0.0, cpu_after[role] - cpu_before[role] - idle[role] * wall)
                        * 1000
                        / max(1, result["total_requests"])
                        for role in SERVE_ROLES
                    }
                    result["mean_batch_size"] = replica_stats(url)["mean_batch_size"]
                    results[key].append(result)
                results["direct"].append(
                    measure_direct(model_uri, payloads, args.duration, args.model_cpus, args.backend, args.precision)
                )
    finally:
        stop_serving()
        ray.shutdown()
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(args: argparse.Namespace, results: dict[str, list[dict]]) -> dict:
    """Print the side-by-side table (medians over the rounds) and the two ratios; returns the summary."""
    print(
        f"\nmodel {args.model} @ {args.image_size}px, 1 model replica ({args.model_cpus} CPU), 1 ingress replica, "
        f"{multiprocessing.cpu_count()} cores, {args.rounds} rounds of {args.duration:.0f} s (medians), "
        f"load average before/after: {results['load']}"
    )
    print(f"{'run':<34}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'errors':>8}")
    rows = [
        (f"batching, {args.concurrency} clients", "batched"),
        (f"max_batch_size=1, {args.concurrency} clients", "unbatched"),
        ("max_batch_size=1, 1 client (HTTP)", "sequential_http"),
        ("direct call, batch 1", "direct"),
    ]
    summary: dict = {}
    for label, key in rows:
        runs = results[key]
        row = {m: _median(runs, m) for m in ("throughput_rps", "p50_ms", "p99_ms")}
        row["errors"] = sum(r["errors"] for r in runs)
        row["mean_batch_size"] = _median(runs, "mean_batch_size") if "mean_batch_size" in runs[0] else None
        batch = f"{row['mean_batch_size']:.1f}" if row["mean_batch_size"] is not None else "-"
        print(
            f"{label:<34}{row['throughput_rps']:>9.1f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{batch:>7}"
            f"{row['errors']:>8}"
        )
        summary[key] = row
    idle = ", ".join(f"{role} {rate:.1f}" for role, rate in results["idle_cpu_ms_per_s"].items())
    print(f"\nidle CPU use subtracted (ms per s): {idle}")
    print(f"{'CPU ms per request':<34}{'proxy':>9}{'ingress':>9}{'model':>9}{'total':>9}")
    for label, key in rows:
        runs = results[key]
        if key == "direct":
            cpu = {"total": statistics.median(r["cpu_ms_per_request"] for r in runs)}
        else:
            cpu = {role: statistics.median(r["cpu_ms_per_request"][role] for r in runs) for role in SERVE_ROLES}
            cpu["total"] = sum(cpu.values())
        cells = "".join(f"{cpu[role]:>9.2f}" if role in cpu else f"{'-':>9}" for role in (*SERVE_ROLES, "total"))
        print(f"{label:<34}{cells}")
        summary[key]["cpu_ms_per_request"] = cpu
    summary["speedup"] = summary["batched"]["throughput_rps"] / summary["unbatched"]["throughput_rps"]
    summary["added_ms_p50"] = summary["sequential_http"]["p50_ms"] - summary["direct"]["p50_ms"]
    summary["added_cpu_ms"] = (
        summary["sequential_http"]["cpu_ms_per_request"]["total"] - summary["direct"]["cpu_ms_per_request"]["total"]
    )
    print(f"\nthroughput with dynamic batching: {summary['speedup']:.2f}x of max_batch_size=1 (target >= 4x)")
    print(
        f"added per request by the HTTP path (p50, 1 client): {summary['added_ms_p50']:.2f} ms wall, "
        f"{summary['added_cpu_ms']:.2f} ms CPU (target <= 2 ms)"
    )
    return summary


def measure_model_batching(model_uri: str, payloads: list[bytes], args: argparse.Namespace) -> dict:
    """What batching gains at the model alone: images/s of ``predict_batch`` at batch 1 and at --max-batch-size."""
    if args.device == "cpu":
        torch.set_num_threads(args.model_cpus)
    predictor = Predictor.from_uri(
        model_uri, device=args.device, amp=args.amp, backend=args.backend, precision=args.precision
    )
    arrays = [predictor.preprocess(data) for data in payloads]
    rates = {}
    for size in (1, args.max_batch_size):
        batch = (arrays * (1 + size // len(arrays)))[:size]
        for _ in range(5):
            predictor.predict_batch(batch)  # .cpu() inside synchronises with the GPU
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < args.duration / 2:
            predictor.predict_batch(batch)
            n += 1
        rates[size] = size * n / (time.perf_counter() - start)
    speedup = rates[args.max_batch_size] / rates[1]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.model_cpus} CPU thread(s)"
    amp = args.amp if args.device != "cpu" else "none"
    backend = f"{args.backend} {args.precision}" if args.backend == "onnx" else "torch"
    print(
        f"\nmodel alone ({args.model} @ {args.image_size}px, {backend}, {name}, amp {amp}):"
        f" batch 1 {rates[1]:.0f} img/s, batch {args.max_batch_size} {rates[args.max_batch_size]:.0f} img/s"
        f" = {speedup:.1f}x"
    )
    return {
        "batch_1_img_s": rates[1],
        f"batch_{args.max_batch_size}_img_s": rates[args.max_batch_size],
        "speedup": speedup,
        "device": name,
        "backend": backend,
    }


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cls-ray-serve-bench-") as tmp:
        model_uri = make_package(Path(tmp), args.model, args.image_size)
        payloads = make_payloads(args.num_images, args.image_size, args.fashion_mnist_dir)
        export_for_backend(model_uri, payloads, args)
        model_alone = measure_model_batching(model_uri, payloads, args)
        if args.model_only:
            return
        results: dict = run_serving(args, model_uri, payloads)
    results["load"] = f"{load_before:.1f}/{os.getloadavg()[0]:.1f}"
    summary = report(args, results)
    summary["model_alone"] = model_alone
    if args.output:
        Path(args.output).write_text(
            json.dumps({"args": vars(args), "runs": results, "summary": summary}, indent=2, default=str)
        )


if __name__ == "__main__":
    main()
