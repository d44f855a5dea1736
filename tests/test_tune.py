"""The search stage end to end on a real Ray cluster and real data (scikit-learn digits, ingested): Optuna TPE +
ASHA over multi-worker Ray Train trials with the experiment on a real S3 server, the leaderboard, promotion of the
best trial, and resuming an experiment whose driver was killed."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import ray
import timm
from conftest import (
    assert_secret_absent,
    free_port,
    prometheus_samples,
    ray_log_texts,
    ray_metrics_text,
    write_digits_folders,
)

from cls_ray.config import IngestConfig, load_config
from cls_ray.models import save_weights_file
from cls_ray.package import read_package_meta
from cls_ray.train.history import HISTORY_DIR
from cls_ray.tune.leaderboard import COMPLETED, ERRORED, STOPPED_ASHA
from cls_ray.tune.tuner import tune

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO = Path(__file__).resolve().parents[1]

# Digits at 32 px learn within an epoch or two when augmentation stays light; warm-up off so epoch 1 already
# separates good learning rates from bad ones (ASHA decides at epoch 1).
FAST = [
    "model.image_size=32",
    "model.crop_pct=1.0",
    "data.auto_augment=null",
    "data.color_jitter=0.0",
    "data.hflip=0.0",
    "data.re_prob=0.0",
    "data.scale=[0.6, 1.0]",
    "data.label_smoothing=0.0",
    "data.batch_size=16",
    "data.eval_batch_size=128",
    "optim.warmup_epochs=0",
    "train.max_failures=0",
    "train.keep_checkpoints=1",
]

TWO_ARCHS = """
version: 1
fixed:
  model.mode: scratch
params:
  optim.lr: {loguniform: [1.0e-4, 1.0e-1]}
families:
  resnet: {architectures: [resnet10t]}
  mobilenet: {architectures: [mobilenetv3_small_050]}
"""


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One 2-CPU Ray node for the module, with the dashboard: ASHA kills the trials it stops, and Ray Train's
    PlacementGroupCleaner frees their workers' resources through the dashboard's state API. RAY_ADDRESS in the
    workers' environment points that API at this cluster when other Ray instances run on the machine. Started after
    the S3 server so its workers inherit the AWS variables."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        # Ray's memory monitor weighs the whole machine's memory: on a shared machine other jobs' memory would get
        # this node's trial workers killed. Only this node's raylet sees the higher threshold.
        env.setenv("RAY_memory_usage_threshold", "0.99")
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2,
                "object_store_memory": 400 * 1024**2,
                "include_dashboard": True,
                "dashboard_port": free_port(),
            },
        )
    context = ray.init(address=cluster.address, runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}})
    yield SimpleNamespace(address=cluster.address, dashboard_url=f"http://{context.dashboard_url}")
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def digits_dataset(tmp_path_factory) -> str:
    """60 real digits per class (420 train / 90 val / 90 test after the split): epochs of about a second."""
    from cls_ray.data.ingest import ingest

    root = tmp_path_factory.mktemp("tune-digits")
    folders = write_digits_folders(root / "folders", per_class=60)
    ingest(str(folders), str(root / "dataset"), IngestConfig(), summary=False)
    return str(root / "dataset")


def _results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _history_files(run_dir: Path) -> dict[str, bytes]:
    """Every record of a run's metrics history, by file name (each is written once, when its epoch ends)."""
    return {p.name: p.read_bytes() for p in sorted((run_dir / HISTORY_DIR).glob("*.json"))}


def _s3_json_lines(uri: str) -> list[dict]:
    from cls_ray import storage

    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


@pytest.mark.timeout(1800)  # hang guard: on a heavily shared 2-core machine this takes over 10 minutes
def test_search_on_s3_stops_trials_early_and_promotes_the_best(
    ray_cluster, digits_dataset, mlflow_server, s3_bucket, tmp_path
):
    """The search with its experiment on the real S3 server (Tune's state, trial results, checkpoints, the promoted
    package and its test evaluation all live there), tracked on a real MLflow server."""
    from cls_ray import storage
    from cls_ray.evaluate import evaluate

    space = tmp_path / "two_archs.yaml"
    space.write_text(TWO_ARCHS)
    root = f"{s3_bucket}/experiments"
    cfg = load_config(
        None,
        FAST
        + [
            f"tune.space={space}",
            f"tune.storage_path={root}",
            "tune.experiment_name=search",
            "tune.num_samples=2",
            "tune.max_epochs=2",  # ASHA's one rung at epoch 1: a trial stops there or completes
            "tune.grace_period=1",
            "tune.reduction_factor=2",
            "tune.seed=1",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",  # 2 DDP workers per trial + 1 CPU for decoding
            "tune.tracking=[mlflow]",
            f"tracking.mlflow_uri={mlflow_server.uri}",
            "tracking.experiment=search",
        ],
    )
    # Ray application metrics (cls_ray.telemetry) reach the node's Prometheus endpoint while the trials train, per
    # trial (run) and DDP rank.
    runs_seen: set[str] = set()
    with cf.ThreadPoolExecutor(1) as pool:
        running = pool.submit(tune, digits_dataset, cfg)
        seen: dict[tuple[str, str], float] = {}
        while not running.done():
            text = ray_metrics_text()
            for name in ("epoch", "images_per_second", "data_wait_fraction", "loss"):
                for labels, value in prometheus_samples(text, f"ray_cls_ray_train_{name}"):
                    key = (name, labels.get("rank", ""))
                    seen[key] = max(seen.get(key, value), value)
                    runs_seen.add(labels.get("run", ""))
            time.sleep(3)  # a scrape of every node's endpoint costs CPU the trials need
        result = running.result()
    for rank in ("0", "1"):
        assert seen.get(("epoch", rank), 0) >= 1 and seen.get(("loss", rank), 0) > 0, seen
        assert seen.get(("images_per_second", rank), 0) > 0 and 0 <= seen[("data_wait_fraction", rank)] <= 1, seen
    exp = f"{root}/search"
    assert result.experiment_uri == exp
    names = {info.path.rsplit("/", 1)[-1] for info in storage.list_files(exp, recursive=False)}
    assert {"tuner.pkl", "leaderboard.csv", "leaderboard.parquet", "summary.json"} <= names, names

    board = pq.read_table(io.BytesIO(storage.read_bytes(f"{exp}/leaderboard.parquet"))).to_pylist()
    assert len(board) == 2
    assert sorted(row["trial"].split("_")[1] for row in board) == ["0001", "0002"]
    assert all(row["trial"].endswith(row["model.name"]) for row in board)
    statuses = {row["status"] for row in board}
    assert ERRORED not in statuses, board
    assert COMPLETED in statuses and STOPPED_ASHA in statuses, board
    for row in board:
        assert (row["epochs"] == 2) == (row["status"] == COMPLETED)
        assert row["val_top1"] is not None and row["wall_time_s"] > 0
        trial_files = {info.path.rsplit("/", 1)[-1] for info in storage.list_files(f"{exp}/{row['trial']}")}
        assert "params.json" in trial_files
        assert any(n.startswith("events.out.tfevents.") for n in trial_files), "TensorBoard events per trial"
        epochs = [r["epoch"] for r in _s3_json_lines(f"{exp}/{row['trial']}/result.json")]
        assert epochs == list(range(1, row["epochs"] + 1))
        run_files = [info.path for info in storage.list_files(f"{exp}/runs/{row['trial']}")]
        assert any("/epoch-" in path and path.endswith("model.safetensors") for path in run_files), run_files
    assert runs_seen & {row["trial"] for row in board}, runs_seen  # labelled with the trial's run name
    ranked = [row["val_top1"] for row in board]
    assert ranked == sorted(ranked, reverse=True)
    # tune.each_architecture_first: trials 1 and 2 take the space's architectures in its order (seed 1's random
    # start-up alone draws resnet10t twice; TPE's proposals after the start-up: the killed search below). Trial 1
    # always completes (alone at ASHA's rung); the scratch mobilenet of trial 2 is near chance after one epoch (0.11
    # measured, resnet10t 0.74), below the rung's cut, so it stops.
    by_index = sorted(board, key=lambda row: row["trial"])
    assert [row["model.name"] for row in by_index] == ["resnet10t", "mobilenetv3_small_050"]

    best = board[0]
    assert result.best_trial == best["trial"] and result.best_metric == pytest.approx(best["val_top1"])
    assert result.best_package_uri == f"{exp}/best"
    meta = read_package_meta(result.best_package_uri)
    assert meta["architecture"] == best["model.name"]
    assert meta["train_config"]["optim"]["lr"] == pytest.approx(best["optim.lr"])
    assert meta["metrics"]["epoch"] == best["best_epoch"]
    assert meta["metrics"]["val_top1"] == pytest.approx(result.best_metric)
    # The promoted package, evaluated anew on the validation split, scores what the leaderboard reports.
    val = evaluate(result.best_package_uri, digits_dataset, "val", str(tmp_path / "eval-val"), 128)
    assert val["top1"] == pytest.approx(best["val_top1"], abs=1e-6)
    assert result.test_metrics is not None and 0 <= result.test_metrics["top1"] <= 1
    assert storage.exists(f"{exp}/best/eval-test/metrics.json")
    summary = storage.read_json(f"{exp}/summary.json")
    assert summary["best_trial"] == best["trial"] and summary["best_package"] == result.best_package_uri
    csv_head = storage.read_bytes(f"{exp}/leaderboard.csv").decode().splitlines()[0]
    assert csv_head.startswith('"rank","trial","status","val_top1"')
    # MLflow (Ray Tune's MLflowLoggerCallback, read back through the server's REST API): a finished run per trial
    # with its sampled config and a metric point per epoch it ran; the promoted package (copied down from S3) in the
    # best trial's run.
    runs = {
        tags["trial_name"]: run
        for run in mlflow_server.runs("search")
        for tags in [{t["key"]: t["value"] for t in run["data"]["tags"]}]
    }
    assert set(runs) == {row["trial"] for row in board}
    for row in board:
        info, data = runs[row["trial"]]["info"], runs[row["trial"]]["data"]
        assert info["status"] == "FINISHED"
        assert {p["key"]: p["value"] for p in data["params"]}["model.name"] == row["model.name"]
        points = mlflow_server.metric_history(info["run_id"], "val_top1")
        assert [int(m["step"]) for m in points] == list(range(1, row["epochs"] + 1))
    package_files = mlflow_server.artifacts(runs[best["trial"]]["info"]["run_id"], "package")
    assert {"package/model.json", "package/model.safetensors"} <= set(package_files)
    # Every trial's Train run is on the dashboard's Train page, named after its trial.
    # With token authentication on (Ray 2.60's default once a token exists), the dashboard wants this driver's token.
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    request = urllib.request.Request(
        f"{ray_cluster.dashboard_url}/api/train/v2/runs/v1", headers=get_auth_headers_if_auth_enabled({})
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        train_runs = json.loads(response.read())["train_runs"]
    assert {row["trial"] for row in board} <= {run["name"] for run in train_runs}
    # Credentials come only from the environment: the secret key is in no object of the experiment (Tune state,
    # trial results, checkpoints, package, evaluation), no file next to it, and no log of the cluster.
    logs = ray_log_texts(ray_cluster.address)
    assert len(logs) > 5
    assert assert_secret_absent(uris=(exp,), dirs=(tmp_path,), texts=logs) > 20


def _state_statuses(exp: Path) -> dict[str, str]:
    """Trial name -> status in Tune's newest experiment state file."""
    files = sorted(exp.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except ValueError:  # caught mid-write
        return {}
    states = [json.loads(t[0]) if isinstance(t[0], str) else t[0] for t in data["trial_data"]]
    return {s["custom_trial_name"]: s["status"] for s in states}


def _finished_and_one_midway(exp: Path, max_epochs: int) -> bool:
    statuses = _state_statuses(exp)
    if "TERMINATED" not in statuses.values():
        return False
    running = [name for name, status in statuses.items() if status == "RUNNING"]
    return any(0 < len(_results(exp / name)) < max_epochs for name in running)


def _resume_space(tmp_path: Path) -> Path:
    """One architecture; weights from a file or none, from scratch or frozen: frozen without weights is an impossible
    combination that only shows once both are sampled, so those trials error while the search goes on. (Not
    finetune: finetune without weights is refused too, so the space's `null` weights would fail when it loads.)"""
    weights = tmp_path / "resnet10t.safetensors"
    save_weights_file(timm.create_model("resnet10t", num_classes=10), str(weights))
    space = tmp_path / "resume.yaml"
    space.write_text(f"""
version: 1
params:
  model.pretrained: {{choice: ["{weights}", null]}}
  model.mode: {{choice: [scratch, frozen]}}
  optim.lr: {{loguniform: [1.0e-3, 3.0e-2]}}
families:
  resnet: {{architectures: [resnet10t]}}
""")
    return space


@pytest.mark.timeout(1800)
def test_killed_search_resumes_without_rerunning_finished_trials(ray_cluster, digits_dataset, mlflow_server, tmp_path):
    """The search's driver is killed once a trial finished and another is between epochs; the same search run again
    keeps the finished trials as they are, continues the interrupted one from its last checkpoint, and runs the rest.
    MLflow keeps one run per trial: the interrupted trial's run continues (all its epochs, then finished)."""
    space = _resume_space(tmp_path)
    overrides = FAST + [
        f"tune.storage_path={tmp_path}",
        "tune.experiment_name=resumable",
        "tune.num_samples=3",
        "tune.max_epochs=3",
        "tune.grace_period=3",
        "tune.seed=3",
        "tune.evaluate_test=false",
        "train.num_workers=1",
        "tune.tracking=[mlflow]",
        f"tracking.mlflow_uri={mlflow_server.uri}",
        "tracking.experiment=resumable",
    ]
    argv = [sys.executable, "-m", "cls_ray.cli", "tune", "--data", digits_dataset, "--space", str(space)]
    argv += [arg for item in overrides for arg in ("--set", item)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    exp = tmp_path / "resumable"
    log = (tmp_path / "first-driver.log").open("wb")
    driver = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:  # kill the driver once a trial finished and another is between epochs
        deadline = time.monotonic() + 600
        while not _finished_and_one_midway(exp, max_epochs=3):
            assert driver.poll() is None, (tmp_path / "first-driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    statuses = _state_statuses(exp)
    finished = {name for name, status in statuses.items() if status in ("TERMINATED", "ERROR")}
    midway = {name: _results(exp / name) for name in statuses if name not in finished and _results(exp / name)}
    before = {name: _results(exp / name) for name in finished}
    runs_before = {name: _history_files(exp / "runs" / name) for name in finished}
    assert len(finished) < 3, "the driver was killed mid-experiment"

    result = tune(digits_dataset, load_config(None, overrides + [f"tune.space={space}"]))

    board = {row["trial"]: row for row in pq.read_table(exp / "leaderboard.parquet").to_pylist()}
    assert sorted(n.split("_")[1] for n in board) == ["0001", "0002", "0003"]
    for name in finished:  # finished trials were not run again
        assert _results(exp / name) == before[name]
        assert _history_files(exp / "runs" / name) == runs_before[name]
    for name, row in board.items():
        impossible = row["model.mode"] == "frozen" and row["model.pretrained"] is None
        assert row["status"] == (ERRORED if impossible else COMPLETED), row
        if impossible:
            assert "model.mode" in row["error"] and "model.pretrained" in row["error"]
        else:  # an interrupted trial continued its Train run from the last checkpoint: no epoch reported twice
            assert [r["epoch"] for r in _results(exp / name)] == [1, 2, 3]
    for name, partial in midway.items():  # ... and kept what it had reported before the kill
        assert _results(exp / name)[: len(partial)] == partial
    assert any(row["status"] == ERRORED for row in board.values()), "the space yields an impossible combination"
    assert result.best_trial in board and board[result.best_trial]["status"] == COMPLETED
    runs: dict[str, list[dict]] = {}
    for run in mlflow_server.runs("resumable"):
        runs.setdefault({t["key"]: t["value"] for t in run["data"]["tags"]}["trial_name"], []).append(run)
    assert set(runs) == set(board), runs.keys()
    for name, row in board.items():
        (run,) = runs[name]  # one run per trial, the interrupted one's included
        assert run["info"]["status"] == ("FAILED" if row["status"] == ERRORED else "FINISHED"), (name, run["info"])
        if row["status"] == COMPLETED:
            points = mlflow_server.metric_history(run["info"]["run_id"], "val_top1")
            assert [int(m["step"]) for m in points] == [1, 2, 3], (name, points)
