"""Training: repeatable on the CPU, resumable after a kill, the same under torchrun (2 processes, gloo)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from noduleai.cache import build_cache
from noduleai.checkpoint import load_model
from noduleai.data import sample_patch_items, split_by_patient
from noduleai.preprocess import PATCH_PREPROCESS, PreprocessConfig
from noduleai.synthetic import write_phantom_cohort
from noduleai.train import PROGRESS, TrainConfig, train


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cases = write_phantom_cohort(root / "data", 8, seed=11, size_xyz=(80, 64, 48))
    entries, _ = build_cache(cases, PATCH_PREPROCESS, root / "cache", progress=False)
    return root, entries


def _tiny(**kw) -> TrainConfig:
    base = dict(task="patch", arch="resnet10_3d", width=0.125, epochs=2, batch_size=8, lr=1e-3, seed=5,
                negatives_per_case=6, positive_repeats=2, max_steps_per_epoch=3, device="cpu")
    return TrainConfig(**(base | kw))


def _weights(path):
    model, _ = load_model(path)
    return model.state_dict()


def test_split_is_by_patient_and_stratified(cohort):
    _, entries = cohort
    parts = split_by_patient(entries, seed=1)
    patients = [{entries[i].patient_id for i in p} for p in parts]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
    assert sorted(i for p in parts for i in p) == list(range(len(entries)))
    assert all(parts)
    assert split_by_patient(entries, seed=1) == parts


def test_patch_sampling_keeps_negatives_clear_of_nodules(cohort):
    _, entries = cohort
    items = sample_patch_items(entries, negatives_per_case=12, seed=0, positive_repeats=3)
    positives = [it for it in items if it.label == 1]
    assert len(positives) == 3 * sum(len(e.nodules) for e in entries)
    assert {it.kind for it in items if it.label == 0} == {"blob", "dense", "pleura", "lung"}
    for it in items:
        if it.label == 0:
            for n in entries[it.entry].nodules:
                d = sum((a - b) ** 2 for a, b in zip(it.center_zyx, n["zyx"])) ** 0.5
                assert d > n["diameter_mm"] / 2 + 5 - 1e-6


def test_cpu_training_is_repeatable_and_writes_the_seed_report(cohort, tmp_path):
    _, entries = cohort
    a = train(entries, _tiny(), PATCH_PREPROCESS, tmp_path / "a", progress=False)
    b = train(entries, _tiny(), PATCH_PREPROCESS, tmp_path / "b", progress=False)
    assert a.history == b.history
    for x, y in zip(_weights(a.best_model).values(), _weights(b.best_model).values()):
        assert torch.equal(x, y)
    for name in ("history.csv", "test_results.csv", "confusion_matrix.png", "last_state.pt", "train_config.json"):
        assert (tmp_path / "a" / name).exists(), name
    _, info = load_model(a.best_model)
    assert info.task == "patch" and info.input_size == (32, 32, 32)
    assert info.preprocess_config == PATCH_PREPROCESS
    assert "validation" in info.metrics and "test" in info.metrics
    assert set(info.training_data["test_cases"]) <= {e.case_id for e in entries}
    # Fine-tuning: mined false positives join the negatives, and a run starts from a given model
    # (at rate 0 it must end exactly there).
    mined = {entries[0].case_id: [[10.0, 20.0, 30.0], [12.0, 22.0, 32.0]]}
    items = sample_patch_items(entries, negatives_per_case=6, seed=0, hard_negatives=mined)
    assert [it.center_zyx for it in items if it.kind == "mined"] == [(10.0, 20.0, 30.0), (12.0, 22.0, 32.0)]
    assert all(it.label == 0 and it.entry == 0 for it in items if it.kind == "mined")
    tuned = train(entries, _tiny(epochs=1, lr=0.0), PATCH_PREPROCESS, tmp_path / "tuned", progress=False,
                  hard_negatives=mined, init_model=a.best_model)
    start, end = load_model(a.best_model)[0], load_model(tuned.best_model)[0]
    for x, y in zip(start.parameters(), end.parameters()):  # BatchNorm statistics do move; weights not
        assert torch.equal(x, y)


def test_scan_task_trains_on_whole_volumes(tmp_path, cohort):
    root, _ = cohort
    from noduleai.records import load_manifest

    config = PreprocessConfig(spacing_mm=None, output_size=(48, 48, 48))
    entries, _ = build_cache(load_manifest(root / "data" / "manifest.json"), config, tmp_path / "cache", progress=False)
    result = train(entries, _tiny(task="scan", batch_size=2, epochs=1), config, tmp_path / "run", progress=False)
    model, info = load_model(result.best_model)
    assert info.task == "scan" and info.input_size == (48, 48, 48) and not info.small_input
    assert model(torch.zeros(1, 1, 48, 48, 48)).shape == (1, 2)
    # Detection with a scan model: one probability, Grad-CAM on the CT's grid, peaks as candidates.
    from noduleai.detect import Detector
    from noduleai.geometry import same_geometry
    from noduleai.io import read_ct

    ct = read_ct(load_manifest(root / "data" / "manifest.json")[0].image_path)
    result = Detector(model, info, "cpu").detect(ct)
    assert 0 <= result.scan_probability <= 1 and result.probability_map is None
    assert same_geometry(result.heatmap, ct)
    assert all(c.probability <= result.scan_probability + 1e-6 for c in result.candidates)


SCRIPT = """
import sys, torch
torch.set_num_threads(2)
from noduleai.cache import load_cache
from noduleai.preprocess import PATCH_PREPROCESS
from noduleai.train import TrainConfig, train
config = TrainConfig(**{config!r})
train(load_cache({cache!r}), config, PATCH_PREPROCESS, {out!r}, progress=False)
"""


def test_a_run_killed_mid_epoch_resumes_to_the_same_result(cohort, tmp_path):
    root, entries = cohort
    # ~30 steps of ~0.3 s an epoch: a kill 1 s after epoch 1 is reported lands inside epoch 2.
    # The cosine schedule, as the bundled recipe trains: its state once held a numpy scalar that
    # weights_only loading refuses.
    config = _tiny(epochs=3, max_steps_per_epoch=30, negatives_per_case=40, lr_schedule="cosine")
    out = tmp_path / "killed"
    code = SCRIPT.format(config=config.to_dict(), cache=str(root / "cache"), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / PROGRESS).exists() and len((out / PROGRESS).read_text().splitlines()) == 1:
            time.sleep(1.0)
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len((out / PROGRESS).read_text().splitlines()) == 1
    config_dict = config.to_dict()
    config_dict["split"] = tuple(config_dict["split"])
    resumed = train(entries, TrainConfig(**config_dict), PATCH_PREPROCESS, out, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    straight = train(entries, config, PATCH_PREPROCESS, tmp_path / "straight", progress=False)
    for x, y in zip(_weights(resumed.best_model).values(), _weights(straight.best_model).values()):
        assert torch.allclose(x, y, atol=1e-6)
    assert not list(out.glob(".tmp-*")), "no half-written checkpoint left behind"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_give_the_same_kind_of_checkpoint(cohort, tmp_path):
    root, _ = cohort
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "noduleai.cli", "-q", "train",
           "--manifest", str(root / "data" / "manifest.json"), "--cache", str(root / "cache"), "--out", str(out),
           "--task", "patch", "--arch", "resnet10_3d", "--width", "0.125", "--epochs", "2", "--batch-size", "4",
           "--max-steps", "2", "--negatives", "6", "--device", "cpu", "--lr", "1e-3"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    model, info = load_model(out / "best_model.pt")
    assert info.task == "patch" and info.arch == "resnet10_3d" and info.width == 0.125
    history = [json.loads(line) for line in (out / PROGRESS).read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2], "only rank 0 writes progress"
    assert (out / "test_results.csv").exists()
