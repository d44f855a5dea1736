"""Ray Serve stage: a real Serve cluster on 127.0.0.1 serving a real model package, driven over real HTTP.

One Ray instance and two applications for the whole module: ``main`` (package loaded from the session's SeaweedFS
S3 server, API key required, one model replica) and ``scale`` (local package, deployed from the YAML that
``write_serve_config`` writes, through the Serve application builder; autoscaling 1..2 replicas).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import timm
import torch
import yaml
from conftest import PILLOW_IMAGES, free_port, prometheus_samples, ray_metrics_text, write_digits_folders

from cls_ray import storage
from cls_ray.config import ConfigError, ServeConfig
from cls_ray.data.transforms import create_eval_transform, normalize
from cls_ray.models import model_data_config
from cls_ray.package import save_model_package
from cls_ray.predict import predict_files

pytestmark = [pytest.mark.ray, pytest.mark.slow]

API_KEY_ENV = "CLS_RAY_TEST_SERVE_KEY"
API_KEY = "test-key-0123456789"
MODEL_NAME = "digits"
TIMEOUT = 60


def _fit_head(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> None:
    """Ridge regression of the classifier on the (standardised) pooled features, folded back into the head."""
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True).double()
        mean, std = feats.mean(0), feats.std(0) + 1e-6
        a = torch.cat([(feats - mean) / std, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
        target = torch.nn.functional.one_hot(labels, 10).double() * 8 - 4
        w = torch.linalg.solve(a.T @ a + 1.0 * torch.eye(a.shape[1], dtype=torch.float64), a.T @ target)
        weight = (w[:-1] / std[:, None]).T
        model.get_classifier().weight.copy_(weight.float())
        model.get_classifier().bias.copy_((w[-1] - weight @ mean).float())


def _train(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    """A short real training run (used on GPU, where it takes seconds)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=generator).to(x.device)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def make_digits_package(
    uri: str, root: Path, n_images: int = 20, train_steps: int = 0, device: str = "cpu"
) -> list[Path]:
    """A real resnet10t package for the 10 digits at 32 px, with ``n_images`` held-out digit PNGs (all classes).

    By default the convolutions stay random and only the classifier head is fitted (ridge regression on 200
    digits: cheap on a loaded CPU, and right well above chance); ``train_steps`` trains the whole model instead.
    """
    from PIL import Image

    folders = write_digits_folders(root / "digits", per_class=40)
    by_class = [sorted((folders / f"digit_{c}").glob("*.png")) for c in range(10)]
    fit = [p for paths in by_class for p in paths[:20]]
    held_out = [p for group in zip(*(paths[20:] for paths in by_class), strict=True) for p in group][:n_images]
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10).eval()
    data_config = model_data_config(model, 32)
    transform = create_eval_transform(data_config)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in fit]).to(device)
    labels = torch.tensor([int(p.parent.name.split("_")[1]) for p in fit], device=device)
    x = normalize(images, data_config["mean"], data_config["std"])
    model.to(device)
    if train_steps:
        _train(model, x, labels, train_steps)
    else:
        _fit_head(model, x, labels)
    meta = {
        "architecture": "resnet10t",
        "classes": [f"digit_{i}" for i in range(10)],
        "data_config": data_config,
        "name": MODEL_NAME,
        "metrics": {"val_top1": 0.5},
    }
    save_model_package(uri, model, meta)
    return held_out


@pytest.fixture(scope="module")
def env_for_cluster(s3_server):
    """Everything Ray's processes must inherit, set before ``ray.init``: AWS_* (s3_server), the API key, and
    fast autoscaling metric pushes."""
    extra = {
        API_KEY_ENV: API_KEY,
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    }
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    yield s3_server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def packages(env_for_cluster, tmp_path_factory):
    """The same package locally and on S3, and held-out digit images."""
    import boto3

    root = tmp_path_factory.mktemp("serve")
    local = str(root / "package")
    images = make_digits_package(local, root)
    bucket = f"serve-{os.getpid()}"
    boto3.client("s3", endpoint_url=env_for_cluster).create_bucket(Bucket=bucket)
    s3_uri = f"s3://{bucket}/models/digits"
    for name in ("model.safetensors", "model.json"):
        storage.write_bytes(storage.join(s3_uri, name), storage.read_bytes(os.path.join(local, name)))
    return {"local": local, "s3": s3_uri, "images": images, "root": root}


@pytest.fixture(scope="module")
def dashboard(packages):
    """This module's own Ray instance (with a dashboard: the state API needs it); yields the dashboard URL."""
    import ray

    context = ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        object_store_memory=400 * 1024**2,
    )
    yield f"http://{context.dashboard_url}"
    ray.shutdown()


@pytest.fixture(scope="module")
def serve_port(dashboard):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def main_url(serve_port, packages):
    from cls_ray.serve.app import start_serving

    cfg = ServeConfig(
        port=serve_port,
        app_name="main",
        route_prefix="/",
        api_key_env=API_KEY_ENV,
        min_replicas=1,
        max_replicas=1,
        ingress_max_replicas=1,
        num_cpus=0.5,
        ingress_num_cpus=0.5,
        max_batch_size=16,
        batch_wait_timeout_s=0.02,
        max_images=8,
        max_request_bytes=300_000,
        max_pixels=4_000_000,
    )
    return start_serving(packages["s3"], cfg)


KEY = {"X-API-Key": API_KEY}


def offline(packages, uri_key="s3"):
    results = predict_files(packages[uri_key], [str(p) for p in packages["images"]], k=10)
    return np.array([r["probabilities"] for r in results])


def weights_version(packages) -> str:
    """What a package's version must be: the first 12 hex digits of its weights file's SHA-256."""
    return hashlib.sha256(Path(packages["local"], "model.safetensors").read_bytes()).hexdigest()[:12]


def test_predict_files_scores_every_readable_file_and_names_the_rest(packages, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = [str(p) for p in packages["images"][:2]]
    uris = [good[0], str(tmp_path / "missing.png"), f"{packages['s3']}/no-such-image.png", str(broken), good[1]]
    results = predict_files(packages["local"], uris, k=3)

    assert [r["path"] for r in results] == uris  # one row per input, in order; the bad ones did not stop the rest
    model = {"name": MODEL_NAME, "version": weights_version(packages)}
    assert all(r["model"] == model for r in results)
    for r in (results[0], results[4]):
        assert len(r["top_k"]) == 3 and "error" not in r
    for r in (results[1], results[2]):
        assert r["reason"] == "unreadable" and r["path"] in r["error"] and "top_k" not in r
    assert results[3]["reason"] != "unreadable" and "top_k" not in results[3]


def assert_top_k_matches(top: list[dict], probs: np.ndarray, k: int) -> None:
    """The served top-k are a top-k of the offline probabilities, with the same values (float tolerance)."""
    assert len(top) == k and len({t["label"] for t in top}) == k
    for t in top:
        assert t["class"] == f"digit_{t['label']}"
        assert abs(t["probability"] - probs[t["label"]]) < 1e-5
    rest = np.delete(probs, [t["label"] for t in top])
    assert rest.size == 0 or min(t["probability"] for t in top) >= rest.max() - 1e-5
    assert top[0]["label"] == int(np.argmax(probs))


def test_http_predictions_equal_offline_for_every_encoding(main_url, packages):
    expected = offline(packages)
    paths = packages["images"]
    for path, probs in zip(paths, expected, strict=True):
        r = requests.post(
            f"{main_url}/v1/predict?top_k=3",
            data=path.read_bytes(),
            headers={**KEY, "Content-Type": "image/png"},
            timeout=TIMEOUT,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == {"name": MODEL_NAME, "version": weights_version(packages)} and body["latency_ms"] > 0
        assert_top_k_matches(body["predictions"][0]["top_k"], probs, 3)
    batch = slice(0, 8)
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in paths[batch]]
    r = requests.post(f"{main_url}/v1/predict", files=files, data={"top_k": "4"}, headers=KEY, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [p.name for p in paths[batch]]
    for pred, probs in zip(preds, expected[batch], strict=True):
        assert_top_k_matches(pred["top_k"], probs, 4)
    payload = {"images": [base64.b64encode(p.read_bytes()).decode() for p in paths[batch]], "top_k": 2}
    r = requests.post(f"{main_url}/v1/predict", json=payload, headers=KEY, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    for pred, probs in zip(r.json()["predictions"], expected[batch], strict=True):
        assert_top_k_matches(pred["top_k"], probs, 2)
    # The digits are real (two per class) and the head was fitted: the model is right far above chance (10%).
    truth = [int(p.parent.name.split("_")[1]) for p in paths]
    assert np.mean(expected.argmax(1) == np.array(truth)) >= 0.7


def test_cls_ray_predict_gives_the_answers_of_v1_predict(main_url, packages, tmp_path):
    from cls_ray.config import PredictConfig
    from cls_ray.predict import predict, read_predictions

    src = tmp_path / "incoming"
    src.mkdir()
    paths = packages["images"][:8]
    for path in paths:
        (src / path.name).write_bytes(path.read_bytes())
    predict(
        packages["s3"],
        str(src),
        str(tmp_path / "out"),
        PredictConfig(top_k=3, replica_cpus=0.5, decode_cpus=0.5, max_replicas=1),
    )
    rows = {Path(r["path"]).name: r for r in read_predictions(str(tmp_path / "out")).to_pylist()}
    assert len(rows) == len(paths)
    for path in paths:
        r = requests.post(
            f"{main_url}/v1/predict?top_k=3",
            data=path.read_bytes(),
            headers={**KEY, "Content-Type": "image/png"},
            timeout=TIMEOUT,
        )
        assert r.status_code == 200, r.text
        served = r.json()["predictions"][0]["top_k"]
        row = rows[path.name]
        assert row["top_k_classes"] == [t["class"] for t in served]
        assert np.allclose(row["top_k_probabilities"], [t["probability"] for t in served], atol=1e-5)
        assert row["model_version"] == r.json()["model"]["version"]


def test_v2_infer_with_triton_client_and_raw_json(main_url, serve_port, packages):
    import tritonclient.http as triton

    expected = offline(packages)
    paths = packages["images"][:5]
    client = triton.InferenceServerClient(
        f"127.0.0.1:{serve_port}", connection_timeout=TIMEOUT, network_timeout=TIMEOUT
    )
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL_NAME)
    meta = client.get_model_metadata(MODEL_NAME, headers=dict(KEY))
    assert meta["inputs"][0]["datatype"] == "BYTES" and meta["outputs"][0]["shape"] == [-1, 10]
    for binary in (True, False):  # binary tensor extension (the client's default), and base64 strings in JSON
        data = [p.read_bytes() for p in paths] if binary else [base64.b64encode(p.read_bytes()) for p in paths]
        tensor = triton.InferInput("image", [len(paths)], "BYTES")
        tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
        out = triton.InferRequestedOutput("probabilities", binary_data=binary)
        # (a fresh headers dict per call: the client adds its Inference-Header-Content-Length to the one given)
        result = client.infer(
            MODEL_NAME,
            [tensor],
            outputs=[out],
            headers=dict(KEY),
            request_id="r1",
            request_compression_algorithm=None if binary else "gzip",
        )
        probs = result.as_numpy("probabilities")
        assert probs.dtype == np.float32 and probs.shape == (5, 10)
        np.testing.assert_allclose(probs, expected[:5], atol=1e-5)
        assert result.get_response()["id"] == "r1"
    doc = {
        "inputs": [
            {
                "name": "image",
                "shape": [2],
                "datatype": "BYTES",
                "data": [base64.b64encode(p.read_bytes()).decode() for p in paths[:2]],
            }
        ]
    }
    r = requests.post(f"{main_url}/v2/models/{MODEL_NAME}/infer", json=doc, headers=KEY, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [2, 10]
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 10), expected[:2], atol=1e-5)
    r = requests.post(f"{main_url}/v2/models/other/infer", json=doc, headers=KEY, timeout=TIMEOUT)
    assert r.status_code == 404 and "error" in r.json()


def stats(url: str) -> dict:
    r = requests.get(f"{url}/v1/stats", headers=KEY, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_requests_are_batched(main_url, packages):
    before = stats(main_url)["batch_size_histogram"]
    data = packages["images"][0].read_bytes()

    def one(_):
        return requests.post(
            f"{main_url}/v1/predict", data=data, headers={**KEY, "Content-Type": "image/png"}, timeout=TIMEOUT
        ).status_code

    with cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(48)))
    assert codes == [200] * 48
    after = stats(main_url)
    new = {int(k): v - before.get(k, 0) for k, v in after["batch_size_histogram"].items()}
    assert sum(size * n for size, n in new.items()) == 48  # every image went through exactly one batch
    assert max(size for size, n in new.items() if n > 0) > 1  # and concurrent single-image requests shared them
    assert after["max_batch_size"] == 16 and max(new) <= 16


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG claiming a huge size (decompression bomb): IHDR only, then a minimal IDAT and IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "case",
    [
        "no_key",
        "wrong_key",
        "too_large",
        "too_large_chunked",
        "too_many_files",
        "too_many_json",
        "top_k_zero",
        "top_k_big",
        "top_k_text",
        "garbage",
        "truncated",
        "bomb",
        "bad_base64",
        "bad_json",
        "text_plain",
        "empty",
        "v2_no_key",
        "v2_bad_input",
        "v2_too_many",
        "models_no_key",
    ],
)
def test_bad_requests_get_a_clear_4xx(main_url, packages, case):
    png = packages["images"][0].read_bytes()
    img = {"Content-Type": "image/png"}
    url = f"{main_url}/v1/predict"
    v2 = f"{main_url}/v2/models/{MODEL_NAME}/infer"
    b64 = base64.b64encode(png).decode()
    cases = {
        "no_key": (401, "unauthorized", lambda: requests.post(url, data=png, headers=img)),
        "wrong_key": (401, "unauthorized", lambda: requests.post(url, data=png, headers={**img, "X-API-Key": "x"})),
        "too_large": (
            413,
            "request_too_large",
            lambda: requests.post(url, data=b"\0" * 400_000, headers={**KEY, **img}),
        ),
        "too_large_chunked": (
            413,
            "request_too_large",
            lambda: requests.post(url, data=(b"\0" * 50_000 for _ in range(8)), headers={**KEY, **img}),
        ),
        "too_many_files": (
            413,
            "too_many_images",
            lambda: requests.post(url, files=[("file", (f"{i}.png", png, "image/png")) for i in range(9)], headers=KEY),
        ),
        "too_many_json": (413, "too_many_images", lambda: requests.post(url, json={"images": [b64] * 9}, headers=KEY)),
        "top_k_zero": (422, "invalid_top_k", lambda: requests.post(f"{url}?top_k=0", data=png, headers={**KEY, **img})),
        "top_k_big": (
            422,
            "invalid_top_k",
            lambda: requests.post(url, json={"images": [b64], "top_k": 11}, headers=KEY),
        ),
        "top_k_text": (
            422,
            "invalid_top_k",
            lambda: requests.post(f"{url}?top_k=three", data=png, headers={**KEY, **img}),
        ),
        "garbage": (
            415,
            "not_an_image",
            lambda: requests.post(url, data=b"not an image at all", headers={**KEY, **img}),
        ),
        "truncated": (422, "corrupt", lambda: requests.post(url, data=png[: len(png) // 2], headers={**KEY, **img})),
        "bomb": (
            413,
            "too_many_pixels",
            lambda: requests.post(url, data=_png_header(40_000, 40_000), headers={**KEY, **img}),
        ),
        "bad_base64": (400, "invalid_base64", lambda: requests.post(url, json={"images": ["%%%"]}, headers=KEY)),
        "bad_json": (
            400,
            "invalid_json",
            lambda: requests.post(url, data=b"{", headers={**KEY, "Content-Type": "application/json"}),
        ),
        "text_plain": (
            415,
            "unsupported_media_type",
            lambda: requests.post(url, data=b"hello", headers={**KEY, "Content-Type": "text/plain"}),
        ),
        "empty": (422, "empty", lambda: requests.post(url, data=b"", headers={**KEY, **img})),
        "v2_no_key": (401, "unauthorized", lambda: requests.post(v2, json={})),
        "v2_bad_input": (
            400,
            "invalid_datatype",
            lambda: requests.post(
                v2, json={"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, headers=KEY
            ),
        ),
        "v2_too_many": (
            413,
            "too_many_images",
            lambda: requests.post(
                v2,
                json={"inputs": [{"name": "image", "shape": [9], "datatype": "BYTES", "data": [b64] * 9}]},
                headers=KEY,
            ),
        ),
        "models_no_key": (401, "unauthorized", lambda: requests.get(f"{main_url}/v1/models")),
    }
    status, reason, send = cases[case]
    r = send()
    assert r.status_code == status, r.text
    body = r.json()
    assert body["reason"] == reason and body["error"]
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_health_docs_and_metadata(main_url):
    assert requests.get(f"{main_url}/healthz", timeout=TIMEOUT).json() == {"status": "ok"}
    assert requests.get(f"{main_url}/readyz", timeout=TIMEOUT).json() == {"status": "ready"}
    info = requests.get(f"{main_url}/v1/models", headers=KEY, timeout=TIMEOUT).json()["models"][0]
    assert info["classes"] == [f"digit_{i}" for i in range(10)] and info["architecture"] == "resnet10t"
    assert info["input_size"] == [3, 32, 32] and info["metrics"] == {"val_top1": 0.5}
    spec = requests.get(f"{main_url}/openapi.json", timeout=TIMEOUT).json()
    assert {"/v1/predict", "/v1/models", "/v2/models/{name}/infer", "/healthz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert "swagger" in requests.get(f"{main_url}/docs", timeout=TIMEOUT).text.lower()
    page = requests.get(f"{main_url}/", timeout=TIMEOUT)
    assert page.status_code == 200 and 'type="file"' in page.text


def _pillow_files() -> list[Path]:
    return sorted(p for p in PILLOW_IMAGES.rglob("*") if p.is_file())


def test_serving_publishes_ray_metrics_to_the_prometheus_endpoint(main_url, packages):
    """Responses by route and status, batch sizes and forward-pass latency (``cls_ray.telemetry``) reach the
    node's Prometheus endpoint, where the dashboard's metrics view reads them."""
    data = packages["images"][2].read_bytes()
    for _ in range(3):
        r = requests.post(
            f"{main_url}/v1/predict", data=data, headers={**KEY, "Content-Type": "image/png"}, timeout=TIMEOUT
        )
        assert r.status_code == 200
    bad = requests.post(
        f"{main_url}/v1/predict", data=b"not an image", headers={**KEY, "Content-Type": "image/png"}, timeout=TIMEOUT
    )
    assert 400 <= bad.status_code < 500

    def counts(text: str, status: int) -> float:
        samples = prometheus_samples(text, "ray_cls_ray_serve_requests_total")
        return sum(
            v for labels, v in samples if labels.get("route") == "/v1/predict" and labels.get("status") == str(status)
        )

    deadline = time.monotonic() + 90  # Ray's metrics agent exports every few seconds
    while True:
        text = ray_metrics_text()
        if counts(text, 200) >= 3 and counts(text, bad.status_code) >= 1:
            break
        assert time.monotonic() < deadline, "the request counter never reached the Prometheus endpoint"
        time.sleep(2)
    batches = sum(v for _, v in prometheus_samples(text, "ray_cls_ray_serve_batch_size_count"))
    latency_sum = sum(v for _, v in prometheus_samples(text, "ray_cls_ray_serve_model_latency_seconds_sum"))
    # Ray exports a histogram's sum from its buckets' midpoints: the counts are exact, the sums approximate.
    every = sum(
        v for labels, v in prometheus_samples(text, "ray_cls_ray_serve_batch_size_bucket") if labels["le"] == "+Inf"
    )
    assert batches >= 1 and every == batches
    assert 0 < latency_sum / batches < 10  # seconds per forward pass of a tiny model: sane


def test_every_pillow_test_image_gets_200_or_4xx(main_url):
    files = _pillow_files()
    assert len(files) > 500

    def send(path: Path) -> tuple[str, int]:
        r = requests.post(
            f"{main_url}/v1/predict",
            data=path.read_bytes(),
            headers={**KEY, "Content-Type": "application/octet-stream"},
            timeout=TIMEOUT,
        )
        return path.name, r.status_code

    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, files))
    bad = [(name, code) for name, code in results if not (code == 200 or 400 <= code < 500)]
    assert not bad, bad
    codes = [code for _, code in results]
    assert codes.count(200) > 400 and sum(400 <= c < 500 for c in codes) > 20
    assert requests.get(f"{main_url}/healthz", timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{main_url}/readyz", timeout=TIMEOUT).status_code == 200


def test_write_config_builder_and_module_app(serve_port, packages, tmp_path, monkeypatch):
    """The YAML for `serve deploy` validates against Serve's own schema; its import_path + args build the app."""
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from cls_ray.serve.app import write_serve_config

    cfg = ServeConfig(
        port=serve_port,
        app_name="scale",
        route_prefix="/scale",
        max_batch_size=4,
        max_ongoing_requests=8,
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=0.5,
        num_cpus=0.5,
        ingress_num_cpus=0.25,
        ingress_max_replicas=1,
    )
    path = write_serve_config(packages["local"], cfg, str(tmp_path / "serve.yaml"))
    doc = yaml.safe_load(Path(path).read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "cls_ray.serve.app:build_app" and app.args["model_uri"] == packages["local"]
    model = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "ClassifierModel")
    assert model["autoscaling_config"]["max_replicas"] == 2 and model["max_ongoing_requests"] == 8
    assert model["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert model["user_config"] == {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}
    # `serve run` hands the args over as strings; the builder reads and checks them like the CLI's --set.
    str_args = {k: str(v) for k, v in app.args.items() if v is not None}
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), str_args)
    assert isinstance(built, Application)
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), {**str_args, "max_batch_size": "0"})
    monkeypatch.delenv("CLS_RAY_MODEL_URI", raising=False)
    with pytest.raises(ConfigError, match="CLS_RAY_MODEL_URI"):
        import_attr("cls_ray.serve.app:app")
    monkeypatch.setenv("CLS_RAY_MODEL_URI", packages["local"])
    assert isinstance(import_attr("cls_ray.serve.app:app"), Application)


def test_single_deployment_topology_answers_like_the_split_one_and_batches(serve_port, packages, tmp_path):
    """``serve.topology=single``: one deployment decodes and runs the batched model in its replica; the same API
    gives the offline answers over HTTP, concurrent requests share forward passes, and its Serve config names the
    one deployment."""
    from ray import serve

    from cls_ray.serve.app import start_serving, stop_serving, write_serve_config

    cfg = ServeConfig(
        port=serve_port,
        app_name="single",
        route_prefix="/single",
        topology="single",
        min_replicas=1,
        max_replicas=1,
        num_cpus=0.5,
        ingress_num_cpus=0.5,
        max_batch_size=16,
        batch_wait_timeout_s=0.05,
    )
    url = start_serving(packages["local"], cfg)
    try:
        assert set(serve.status().applications["single"].deployments) == {"Classifier"}
        expected = offline(packages, "local")
        paths = packages["images"]

        def ask(path: Path) -> dict:
            r = requests.post(
                f"{url}/v1/predict?top_k=3",
                data=path.read_bytes(),
                headers={"Content-Type": "image/png"},
                timeout=TIMEOUT,
            )
            assert r.status_code == 200, r.text
            return r.json()["predictions"][0]

        with cf.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, paths))
        for pred, probs in zip(answers, expected, strict=True):
            assert_top_k_matches(pred["top_k"], probs, 3)
        stats = requests.get(f"{url}/v1/stats", timeout=TIMEOUT).json()
        assert stats["images"] == len(paths) and stats["mean_batch_size"] > 1, stats  # batched in the one replica
        assert requests.get(f"{url}/healthz", timeout=TIMEOUT).status_code == 200
    finally:
        stop_serving("single")
    doc = yaml.safe_load(Path(write_serve_config(packages["local"], cfg, str(tmp_path / "s.yaml"))).read_text())
    (deployment,) = doc["applications"][0]["deployments"]
    assert deployment["name"] == "Classifier" and deployment["ray_actor_options"]["num_cpus"] == 1.0
    assert deployment["user_config"] == {"max_batch_size": 16, "batch_wait_timeout_s": 0.05}


@pytest.fixture(scope="module")
def scale_url(serve_port, packages, tmp_path_factory):
    """The ``scale`` app, deployed from the written Serve config through the builder (as `serve run` does)."""
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from cls_ray.serve.app import serve_config_dict

    cfg = ServeConfig(
        port=serve_port,
        app_name="scale",
        route_prefix="/scale",
        max_batch_size=2,
        max_ongoing_requests=4,
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=0.5,
        num_cpus=0.5,
        ingress_num_cpus=0.25,
        ingress_max_replicas=1,
    )
    app = serve_config_dict(packages["local"], cfg)["applications"][0]
    built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app["args"])
    serve.run(built, name=app["name"], route_prefix=app["route_prefix"])
    return f"http://127.0.0.1:{serve_port}/scale"


def _replica_states(app: str, deployment: str = "ClassifierModel") -> dict[str, int]:
    """Serve's count of the deployment's replicas by state (RUNNING, STARTING, ...), as `serve status` shows."""
    from ray import serve

    return {str(k): int(v) for k, v in serve.status().applications[app].deployments[deployment].replica_states.items()}


def _running_replicas(app: str, deployment: str = "ClassifierModel") -> int:
    return _replica_states(app, deployment).get("RUNNING", 0)


def test_autoscaling_scales_up_under_load_within_bounds(scale_url, packages, dashboard):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    # What Serve's controller applied (the same details `serve status` shows).
    details = ServeSubmissionClient(dashboard).get_serve_details()["applications"]["scale"]["deployments"]
    model = details["ClassifierModel"]["deployment_config"]
    auto = model["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 2, 1)
    assert auto["upscale_delay_s"] == 0.5 and model["max_ongoing_requests"] == 4
    assert model["ray_actor_options"]["num_cpus"] == 0.5 and model["user_config"]["max_batch_size"] == 2
    assert details["ClassifierIngress"]["deployment_config"]["autoscaling_config"]["max_replicas"] == 1
    assert _running_replicas("scale") == 1
    data = packages["images"][0].read_bytes()
    # The controller must decide to scale within 90 s of load; the second replica then has until 240 s to start
    # (a new replica process imports torch and loads the model while the first one is busy: on 2 loaded cores
    # that alone can take a minute). Four clients keep 4 requests in flight against a target of 1 per replica.
    started = time.monotonic()
    decide_by, stop = started + 90, started + 240
    seen: list[dict[str, int]] = []

    def scaled() -> bool:
        return bool(seen) and seen[-1].get("RUNNING", 0) >= 2

    def client(_):
        codes = []
        while time.monotonic() < stop and not scaled():
            codes.append(
                requests.post(
                    f"{scale_url}/v1/predict", data=data, headers={"Content-Type": "image/png"}, timeout=TIMEOUT
                ).status_code
            )
        return codes

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        while time.monotonic() < stop and not scaled():
            seen.append(_replica_states("scale"))
            if time.monotonic() > decide_by and max(sum(s.values()) for s in seen) < 2:
                break
            time.sleep(0.5)
        stop = time.monotonic()  # release the clients
        codes = [c for f in futures for c in f.result()]
    totals = [sum(s.values()) for s in seen]
    print(f"autoscaling: {len(codes)} requests, replica states every 0.5 s: {seen}, {stop - started:.1f} s in all")
    assert max(totals) >= 2, f"the controller never added a replica in 90 s of load: {seen}"
    assert scaled(), f"a second replica was added but never reached RUNNING in 240 s: {seen}"
    assert max(totals) <= 2 and min(s.get("RUNNING", 0) for s in seen) >= 1, seen
    assert set(codes) == {200}
    assert _running_replicas("scale") <= 2


def test_killed_model_replica_recovers(main_url, packages, dashboard):
    import ray
    from ray.util.state import list_actors

    data = packages["images"][1].read_bytes()
    replicas = [
        a
        for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")])
        if a.name and a.name.startswith("SERVE_REPLICA::main#ClassifierModel#")
    ]
    assert len(replicas) == 1
    old = replicas[0].name
    codes: list[int] = []
    stop = time.monotonic() + 90

    def client(_):
        while time.monotonic() < stop:
            r = requests.post(
                f"{main_url}/v1/predict", data=data, headers={**KEY, "Content-Type": "image/png"}, timeout=TIMEOUT
            )
            codes.append(r.status_code)
            assert "Traceback" not in r.text
            if (
                r.status_code == 200
                and killed
                and time.monotonic() > killed[0] + 1
                and sum(c == 200 for c in codes[-5:]) == 5
            ):
                return

    killed: list[float] = []
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        time.sleep(1.0)
        ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
        killed.append(time.monotonic())
        for f in futures:
            f.result()
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert codes[-1] == 200
    r = requests.post(
        f"{main_url}/v1/predict", data=data, headers={**KEY, "Content-Type": "image/png"}, timeout=TIMEOUT
    )
    assert r.status_code == 200
    new = [
        a.name
        for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")])
        if a.name and a.name.startswith("SERVE_REPLICA::main#ClassifierModel#")
    ]
    assert new and old not in new


def test_catch_all_middleware_hides_internal_errors():
    """An exception no handler knows becomes a generic JSON 500, never its message or a trace."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from cls_ray.serve.api import CatchAllMiddleware

    api = FastAPI()
    api.add_middleware(CatchAllMiddleware)

    @api.get("/boom")
    async def boom():
        raise RuntimeError("secret internal detail")

    async def call():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api, raise_app_exceptions=False), base_url="http://test"
        ) as client:
            return await client.get("/boom")

    r = asyncio.run(call())
    assert r.status_code == 500
    assert r.json() == {"error": "internal server error", "reason": "internal_error", "image": None}
    assert "secret" not in r.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_predictor_uses_channels_last_autocast_and_agrees_with_cpu(tmp_path):
    """The model replicas' GPU path (channels-last, bf16/fp16 autocast) gives the CPU's answers."""
    from cls_ray.predict import Predictor

    uri = str(tmp_path / "package")
    paths = make_digits_package(uri, tmp_path, n_images=100, train_steps=150, device="cuda")
    cpu = Predictor.from_uri(uri)
    arrays = [cpu.preprocess(p.read_bytes()) for p in paths]
    reference = cpu.predict_batch(arrays)
    for amp in ("bf16", "fp16"):
        gpu = Predictor.from_uri(uri, device="cuda", amp=amp)
        conv = next(m for m in gpu.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last)
        probs = gpu.predict_batch(arrays)
        assert probs.dtype == np.float32 and probs.shape == reference.shape
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
        assert np.abs(probs - reference).max() < 0.05
        assert np.mean(probs.argmax(1) == reference.argmax(1)) >= 0.9
        one = np.concatenate([gpu.predict_batch([a]) for a in arrays])
        assert np.abs(one - probs).max() < 0.05  # batch composition changes nothing beyond rounding
