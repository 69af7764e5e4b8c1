"""Training: the seed's recipe as the default, resumable, repeatable, and DDP-ready under torchrun."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from noduleai.augment import CTAugmentation3D
from noduleai.cache import CacheEntry
from noduleai.checkpoint import STATE_FORMAT, ModelInfo, load_model, safe_load, save_model
from noduleai.config import TrainConfig
from noduleai.data import PatchDataset, ScanDataset, sample_patch_items, split_by_patient
from noduleai.evaluate import classification_metrics, write_classification_report
from noduleai.files import atomic_path, write_json_atomic
from noduleai.losses import calculate_class_weights, make_loss
from noduleai.models import pick_device
from noduleai.preprocess import PreprocessConfig

BEST_MODEL = "best_model.pt"
LAST_STATE = "last_state.pt"
PROGRESS = "progress.jsonl"


@dataclass
class TrainResult:
    out_dir: Path
    best_model: Path
    history: list[dict[str, float]]
    test_metrics: dict[str, Any] = field(default_factory=dict)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so that a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _datasets(entries: Sequence[CacheEntry], parts, config: TrainConfig,
              hard_negatives: Mapping[str, Sequence[Sequence[float]]] | None = None) -> list[Dataset]:
    augment = None
    if config.augment:
        # The seed's shift of +-10 voxels is meant for 128^3 scans; a patch gets the same fraction.
        scale = config.patch_size / 128 if config.task == "patch" else 1.0
        augment = CTAugmentation3D(shift_range=(-10 * scale, 10 * scale), seed=config.seed)
    if config.task == "scan":
        return [ScanDataset([entries[i] for i in part], augment if k == 0 else None)
                for k, part in enumerate(parts)]
    sets = []
    for k, part in enumerate(parts):
        subset = [entries[i] for i in part]
        # Only training copies positives; validation and test count every nodule once.
        repeats = config.positive_repeats if k == 0 else 1
        items = sample_patch_items(subset, config.negatives_per_case, seed=config.seed + k, positive_repeats=repeats,
                                   hard_negatives=hard_negatives)
        sets.append(PatchDataset(subset, items, config.patch_size, augment if k == 0 else None,
                                 jitter_mm=config.jitter_mm if k == 0 else 0.0, seed=config.seed))
    return sets


def predict(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> np.ndarray:
    """P(class 1) for every sample of ``dataset``."""
    model.eval()
    out = []
    with torch.no_grad():
        for x, _y in DataLoader(dataset, batch_size=batch_size):
            out.append(torch.softmax(model(x.to(device)), dim=1)[:, 1].float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _score(metrics: dict[str, Any], val_loss: float) -> float:
    """Model selection: validation AUC, or minus the loss while AUC is undefined."""
    return metrics["auc"] if metrics["auc"] is not None else -val_loss


def train(entries: Sequence[CacheEntry], config: TrainConfig, preprocess: PreprocessConfig,
          out_dir: str | os.PathLike, resume: bool = True, progress: bool = True,
          on_epoch: Callable[[dict[str, float]], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          hard_negatives: Mapping[str, Sequence[Sequence[float]]] | None = None,
          init_model: str | os.PathLike | None = None,
          parts: tuple[Sequence[int], Sequence[int], Sequence[int]] | None = None) -> TrainResult:
    """Train on cached ``entries``; checkpoints go to ``out_dir``.

    Every epoch writes ``last_state.pt`` atomically; a run killed at any moment resumes from its last
    completed epoch (per-epoch reseeding makes the resumed run identical to an uninterrupted one on
    the CPU). The best validation model is ``best_model.pt``; at the end it is evaluated on the test
    part and the seed's report (``test_results.csv``, ROC, confusion matrix) is written.
    ``hard_negatives`` (case id -> cached voxel centres) join the negatives of every part;
    ``init_model`` (a model checkpoint of the same architecture) starts a fine-tuning run. ``parts``
    (indices of ``entries`` for training, validation and test) replaces the split by patient, for
    recipes whose protocol fixes the parts (e.g. by host and by the crops' LIDC patients).
    """
    out = Path(out_dir)
    rank, world = _distributed()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    device = pick_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    parts = parts if parts is not None else split_by_patient(entries, config.split, config.seed)
    train_set, val_set, test_set = _datasets(entries, parts, config, hard_negatives)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f"too little data: {len(entries)} cases give {len(train_set)} training and "
                         f"{len(val_set)} validation samples")
    input_size = (config.patch_size,) * 3 if config.task == "patch" else tuple(entries[0].shape)
    info = ModelInfo(arch=config.arch, task=config.task, input_size=input_size, preprocess=preprocess.to_dict(),
                     width=config.width, small_input=config.task == "patch",
                     cam_layer=config.cam_layer or ("layer3" if config.task == "patch" else "layer4"),
                     training_data=_data_summary(entries, parts, train_set, config))
    model = info.build()
    if init_model is not None:
        model.load_state_dict(load_model(init_model)[0].state_dict())
    model = model.to(device)
    weights = calculate_class_weights(train_set.labels(), 2, config.class_weights)
    loss_fn = make_loss(config.loss, weights.to(device), config.focal_gamma)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be constant or cosine, not {config.lr_schedule!r}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: _lr_factor(config, e))
    history: list[dict[str, float]] = []
    best_score, start_epoch = -float("inf"), 0
    state_path = out / LAST_STATE
    if resume and state_path.exists():
        state = safe_load(state_path, STATE_FORMAT)
        if not _same_run(state["config"], config):
            raise ValueError(f"{state_path}: written by a run with another configuration; use a new output "
                             "folder or --no-resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best_score, start_epoch = state["history"], state["best_score"], state["epoch"] + 1
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=config.seed) if world > 1 else None
    for epoch in range(start_epoch, config.epochs):
        if should_stop is not None and should_stop():
            break
        set_seed(config.seed + epoch)  # a resumed epoch draws exactly what it would have drawn
        if isinstance(train_set, (PatchDataset, ScanDataset)) and train_set.augment is not None:
            train_set.augment.reseed(config.seed + epoch)
        if isinstance(train_set, PatchDataset):
            train_set.rng = np.random.default_rng(config.seed + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, shuffle=sampler is None,
                            num_workers=config.num_workers, drop_last=len(train_set) > config.batch_size,
                            generator=torch.Generator().manual_seed(config.seed + epoch))
        net.train()
        losses = []
        steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress or rank != 0)
        for step, (x, y) in enumerate(loader):
            if step >= steps:
                break
            x, y = x.to(device), y.to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        bar.close()
        scheduler.step()
        val_prob = predict(model, val_set, config.batch_size, device)
        val_y = np.asarray(val_set.labels())
        with torch.no_grad():
            logits = torch.log(torch.from_numpy(np.stack([1 - val_prob, val_prob], 1)).clamp_min(1e-7))
            val_loss = float(loss_fn(logits.to(device), torch.from_numpy(val_y).to(device)))
        m = classification_metrics(val_y, val_prob)
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                  "val_loss": val_loss, "val_auc": m["auc"] if m["auc"] is not None else float("nan"),
                  "val_accuracy": m["accuracy"], "val_f1": m["f1"]}
        history.append(record)
        score = _score(m, val_loss)
        if rank == 0:
            if score > best_score:
                best_score = score
                info.metrics = {"validation": {k: v for k, v in m.items() if k != "confusion_matrix"},
                                "best_epoch": epoch + 1}
                save_model(out / BEST_MODEL, model, info)
            payload = {"format": STATE_FORMAT, "format_version": 1, "epoch": epoch, "history": history,
                       "best_score": best_score, "config": config.to_dict(), "model": model.state_dict(),
                       "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            with atomic_path(state_path) as tmp:
                torch.save(payload, tmp)
            _append_progress(out / PROGRESS, record)
        if world > 1:
            dist.barrier()
        if on_epoch is not None:
            on_epoch(record)
    result = TrainResult(out, out / BEST_MODEL, history)
    if rank == 0:
        with atomic_path(out / "history.csv") as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
        result.test_metrics = _final_test(out, test_set, config, device)
        write_json_atomic(config.to_dict(), out / "train_config.json")
    if world > 1:
        dist.barrier()
    return result


def _final_test(out: Path, test_set: Dataset, config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Evaluate the best model on the held-out test part and record the metrics in its checkpoint."""
    if not (out / BEST_MODEL).exists() or len(test_set) == 0:
        return {}
    model, info = load_model(out / BEST_MODEL, device)
    prob = predict(model, test_set, config.batch_size, device)
    metrics = write_classification_report(out, test_set.labels(), prob, extra={"task": config.task})
    info.metrics["test"] = metrics
    save_model(out / BEST_MODEL, model, info)
    return metrics


def _lr_factor(config: TrainConfig, epoch: int) -> float:
    if config.lr_schedule == "cosine":  # a Python float: a numpy scalar in the state would fail weights_only
        return float(0.5 * (1 + np.cos(np.pi * min(epoch, config.epochs) / max(config.epochs, 1))))
    return 1.0


def _same_run(saved: dict[str, Any], config: TrainConfig) -> bool:
    """Resuming may extend ``epochs``; every other setting must match."""
    now = config.to_dict() | {"epochs": saved.get("epochs")}
    return json.dumps(saved, sort_keys=True) == json.dumps(now, sort_keys=True)


def _append_progress(path: Path, record: dict[str, float]) -> None:
    with open(path, "a") as handle:  # one line per epoch: readers (the Slicer module) tail it
        handle.write(json.dumps(record) + "\n")


def _data_summary(entries, parts, train_set, config: TrainConfig) -> dict[str, Any]:
    labels = train_set.labels()
    return {"cases": len(entries), "patients": len({e.patient_id for e in entries}),
            "split_cases": [len(p) for p in parts], "train_samples": len(labels),
            "train_positives": int(sum(labels)), "task": config.task,
            "validation_cases": [entries[i].case_id for i in parts[1]],
            "test_cases": [entries[i].case_id for i in parts[2]]}
