"""The ``cls-ray serve`` command end to end, and its upload page in a real headless Chromium.

The command runs as a separate process (its own local Ray instance), exactly as a person starts it; the page is
driven through Playwright: the API key prompt, choosing a file, dropping a file, changing top-k.
"""

from __future__ import annotations

import base64
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from test_serve import make_digits_package

from cls_ray.predict import predict_files

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY_ENV = "CLS_RAY_BROWSER_TEST_KEY"
KEY = "browser-key-42"
CLI = [sys.executable, "-m", "cls_ray.cli"]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-browser")
    uri = str(root / "package")
    images = make_digits_package(uri, root, n_images=4)
    return {"uri": uri, "images": images, "root": root}


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


@pytest.fixture(scope="module")
def served(package):
    """``cls-ray serve PACKAGE`` in its own process; yields the URL it printed, then stops it with Ctrl+C."""
    port = free_port()
    overrides = [
        f"serve.port={port}",
        "serve.num_cpus=0.5",
        "serve.ingress_num_cpus=0.5",
        "serve.max_replicas=1",
        "serve.ingress_max_replicas=1",
        f"serve.api_key_env={KEY_ENV}",
    ]
    env = {**os.environ, KEY_ENV: KEY, "RAY_ADDRESS": "local"}  # a fresh local Ray, never someone else's cluster
    cmd = CLI + ["serve", package["uri"]] + [arg for o in overrides for arg in ("--set", o)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    url = None
    deadline = time.monotonic() + 240
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line.startswith("Serving "):
            url = line.split(" at ", 1)[1].split()[0].rstrip("/")
    assert url == f"http://127.0.0.1:{port}", f"cls-ray serve printed no URL (exit code {proc.poll()})"
    yield {"url": url, "proc": proc}
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield instance
        instance.close()


def _drop_file(page, path: Path) -> None:
    """Drop a file on the drop zone the way a browser does: a DragEvent carrying a DataTransfer."""
    page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            const drop = document.getElementById("drop");
            drop.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
            drop.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name],
    )


def test_upload_page_classifies_chosen_and_dropped_images(served, package, browser, tmp_path):
    expected = predict_files(package["uri"], [str(p) for p in package["images"]], k=5)
    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.goto(served["url"] + "/")
    page.wait_for_selector("#keyrow", state="visible")  # /v1/models answered 401: the page asks for the key
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.wait_for_function("document.querySelectorAll('#topk option').length === 10")
    assert "digits" in page.inner_text("#model") and "resnet10t" in page.inner_text("#model")

    first = package["images"][0]
    page.set_input_files("#file", str(first))
    page.wait_for_function("document.querySelectorAll('.bar-row').length === 5")
    names = page.locator(".bar-name").all_text_contents()
    assert names == [t["class"] for t in expected[0]["top_k"]]
    assert first.name in page.inner_text("#status")
    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")

    page.select_option("#topk", "3")  # changing top-k classifies the last image again
    page.wait_for_function("document.querySelectorAll('.bar-row').length === 3")
    assert page.locator(".bar-name").all_text_contents() == names[:3]

    second = package["images"][1]
    _drop_file(page, second)
    page.wait_for_function(f"document.getElementById('status').textContent.includes('{second.name}')")
    assert page.locator(".bar-name").first.text_content() == expected[1]["top_k"][0]["class"]
    widths = page.eval_on_selector_all(".bar-fill", "els => els.map((e) => e.getBoundingClientRect().width)")
    assert widths == sorted(widths, reverse=True) and widths[0] > 0

    page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a png"}])
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "not a recognised image" in page.inner_text("#error")
    page.close()


def test_cli_write_config_and_clean_stop(served, package, tmp_path, capsys):
    from cls_ray.cli import main

    out = tmp_path / "serve.yaml"
    assert main(["serve", package["uri"], "--write-config", str(out), "--set", "serve.port=9100"]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["http_options"]["port"] == 9100
    assert doc["applications"][0]["args"]["model_uri"] == package["uri"]
    assert main(["serve", str(tmp_path / "nope"), "--write-config", str(out)]) == 1
    assert "not a model package" in capsys.readouterr().err
    assert main(["serve", package["uri"], "--write-config", str(out), "--set", "serve.max_batch_size=0"]) == 2
    assert "serve.max_batch_size" in capsys.readouterr().err

    proc = served["proc"]  # the served command stops cleanly on Ctrl+C
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0
