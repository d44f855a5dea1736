"""What `cls-ray train` prints, as a user sees it: in a pseudo-terminal (live bar), in a pipe (plain lines, as in CI
logs and `ray job logs`), and with -v (Ray's own output back). Each run starts its own local Ray instance."""

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
from conftest import RAY_NOISE, console_lines, write_digits_folders

from cls_ray.config import IngestConfig
from cls_ray.data.ingest import ingest

pytestmark = pytest.mark.ray

CLI = str(Path(sys.executable).with_name("cls-ray"))
ARGS = [
    "--set", "model.name=resnet10t", "--set", "model.image_size=32", "--set", "model.crop_pct=1.0",
    "--set", "data.batch_size=16", "--set", "data.auto_augment=null", "--set", "data.decode_cpus=0.5",
    "--set", "data.decode_concurrency=1", "--set", "train.epochs=2", "--set", "train.num_workers=1",
]  # fmt: skip
#: Lines of a 2-epoch run in quiet mode: what it does (3), in-epoch progress, 2 epoch lines, the result (2).
LINE_BUDGET = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("console")
    folders = write_digits_folders(root / "folders", per_class=20)
    ingest(str(folders), str(root / "data"), IngestConfig(), summary=False)
    return str(root / "data")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _train_in_pipe(dataset: str, tmp_path: Path, *extra: str) -> str:
    command = [CLI, *extra, "train", "--data", dataset, *ARGS, "--set", f"train.storage_path={tmp_path / 'runs'}"]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), timeout=600)
    text = done.stdout.decode(errors="replace")
    assert done.returncode == 0, text[-3000:]
    return text


def _train_in_pty(dataset: str, tmp_path: Path) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows x 120 columns
    command = [CLI, "train", "--data", dataset, *ARGS, "--set", f"train.storage_path={tmp_path / 'runs'}"]
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


def test_quiet_console_in_a_pipe_prints_progress_once_and_no_ray_noise(dataset, tmp_path):
    text = _train_in_pipe(dataset, tmp_path)
    lines = console_lines(text)
    assert not [line for line in lines if RAY_NOISE.search(line)], text
    assert len(lines) == len(set(lines)), f"a line printed twice: {text}"
    assert len(lines) <= LINE_BUDGET, text
    epochs = [line for line in lines if re.match(r"epoch [12]/2 \| train_loss [\d.]+ \| \d+ img/s", line)]
    assert len(epochs) == 2 and "| ETA " in epochs[0], text  # every epoch once; the time left after the first
    assert any("wrote model package" in line for line in lines) and "Traceback" not in text


def test_terminal_shows_a_live_bar(dataset, tmp_path):
    text = _train_in_pty(dataset, tmp_path)
    assert re.search(r"epoch 1/2: +\d+%\|", text), text[-3000:]  # tqdm's bar, redrawn in place
    assert "img/s, data wait" in text and "run ETA" in text
    lines = [line for line in console_lines(text) if not re.search(r"\d+%\|", line)]  # the bar's redraws aside
    assert not [line for line in lines if RAY_NOISE.search(line)], text[-3000:]
    assert sum(1 for line in lines if re.match(r"epoch [12]/2 \| train_loss", line)) == 2


def test_verbose_brings_back_rays_own_output(dataset, tmp_path):
    text = _train_in_pipe(dataset, tmp_path, "-v")
    assert re.search(r"\((RayTrainWorker|TrainController) pid=", text), text[-3000:]
    epochs = [line for line in console_lines(text) if re.search(r"epoch [12]/2 \| train_loss", line)]
    assert len(epochs) == 2, text[-3000:]  # still printed once each (by the driver)
