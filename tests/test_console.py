"""What `cls-ray train` prints, as a user sees it: quiet in a pipe (plain lines, as in CI logs and `ray job logs`: the
session's shared training run, :func:`conftest.trained_package`, is such a run), and with -v in a pseudo-terminal
(the live bar, with Ray's own output back). The terminal run starts its own local Ray instance; it is also the
suite's run of a frozen backbone from a weights file, with a tracking server that is down."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import RAY_NOISE, TRAINED_PACKAGE_OVERRIDES, console_lines, free_port, write_digits_folders
from safetensors.torch import load_file

from cls_ray.config import IngestConfig
from cls_ray.data.ingest import ingest
from cls_ray.models import save_weights_file

pytestmark = pytest.mark.ray

CLI = str(Path(sys.executable).with_name("cls-ray"))
ARGS = [
    "--set", "model.name=resnet10t", "--set", "model.image_size=32", "--set", "model.crop_pct=1.0",
    "--set", "data.batch_size=16", "--set", "data.auto_augment=null", "--set", "data.decode_cpus=0.5",
    "--set", "data.decode_concurrency=1", "--set", "train.epochs=2", "--set", "train.num_workers=1",
]  # fmt: skip


def line_budget(epochs: int) -> int:
    """Lines of a quiet run: what it does (3), the result (2), a line per epoch and at most one in-epoch progress
    line per epoch (one every 30 s within an epoch: these epochs take seconds, the first one's start-up longer)."""
    return 5 + 2 * epochs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("console")
    folders = write_digits_folders(root / "folders", per_class=20)
    ingest(str(folders), str(root / "data"), IngestConfig(), summary=False)
    return str(root / "data")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _train_in_pty(dataset: str, tmp_path: Path, *overrides: str) -> str:
    """``cls-ray -v train`` in a pseudo-terminal; its output as the terminal got it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows x 120 columns
    command = [CLI, "-v", "train", "--data", dataset, *ARGS, "--set", f"train.storage_path={tmp_path / 'runs'}"]
    command += [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=_env(), close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0, b"".join(chunks)[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_quiet_console_in_a_pipe_prints_progress_once_and_no_ray_noise(trained_package):
    text = trained_package["train_log"].read_text()
    epochs = int(next(o for o in TRAINED_PACKAGE_OVERRIDES if o.startswith("train.epochs=")).split("=")[1])
    lines = console_lines(text)
    assert not [line for line in lines if RAY_NOISE.search(line)], text
    assert len(lines) == len(set(lines)), f"a line printed twice: {text}"
    assert len(lines) <= line_budget(epochs), text
    ends = [line for line in lines if re.match(rf"epoch \d/{epochs} \| train_loss [\d.]+ \| \d+ img/s", line)]
    assert [int(line[6]) for line in ends] == list(range(1, epochs + 1)), text  # every epoch once, in order
    assert all("| ETA " in line for line in ends[:-1]), text  # the time left, after every epoch but the last
    assert any("wrote model package" in line for line in lines) and "Traceback" not in text


def test_terminal_run_of_a_frozen_pretrained_backbone_shows_a_live_bar_and_rays_output(dataset, tmp_path):
    """-v in a terminal: tqdm's bar redrawn in place, Ray's own worker output back, cls-ray's epoch lines once each.
    (Quiet, Ray's output is off whatever the stream: the pipe test above.) The run starts from a weights file with the
    backbone frozen (its weights and BatchNorm statistics come out unchanged, the 3-class head is replaced by a
    10-class one), tracked in MLflow at an address where nothing listens (said once, the run goes on) and in
    TensorBoard."""
    source = timm.create_model("resnet10t", num_classes=3)
    weights = str(tmp_path / "pretrained.safetensors")
    save_weights_file(source, weights)
    down = f"http://127.0.0.1:{free_port()}"
    frozen = [f"model.pretrained={weights}", "model.mode=frozen", "train.run_name=frozen"]
    frozen += ["train.tracking=[mlflow,tensorboard]", f"tracking.mlflow_uri={down}", "tracking.timeout_s=2"]
    text = _train_in_pty(dataset, tmp_path, *frozen)
    assert re.search(r"epoch 1/2: +\d+%\|", text), text[-3000:]  # tqdm's bar, redrawn in place
    assert "img/s, data wait" in text and "run ETA" in text
    assert re.search(r"\((RayTrainWorker|TrainController) pid=", text), text[-3000:]
    lines = [line for line in console_lines(text) if not re.search(r"\d+%\|", line)]  # the bar's redraws aside
    epochs = [line for line in lines if re.match(r"epoch [12]/2 \| train_loss", line)]
    assert len(epochs) == 2, text[-3000:]  # printed once each (by the driver)

    said = [line for line in lines if "not tracked" in line]
    assert len(said) == 1 and down in said[0], text[-3000:]
    run = tmp_path / "runs" / "frozen"
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*.epoch*"))) == 2
    packaged = load_file(str(run / "package" / "model.safetensors"))
    original = load_file(weights)
    head = {"fc.weight", "fc.bias"}
    assert packaged["fc.weight"].shape == (10, source.num_features)
    backbone = set(packaged) - head
    assert backbone == set(original) - head
    for name in backbone:  # weights and BatchNorm statistics: a frozen backbone gets no update
        assert torch.equal(packaged[name], original[name]), name
