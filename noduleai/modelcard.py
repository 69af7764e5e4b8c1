"""Model cards: what a model was trained on, what it is for, its limits and its measured metrics."""

from __future__ import annotations

import os
from typing import Any

from noduleai import DISCLAIMER
from noduleai.checkpoint import ModelInfo
from noduleai.files import atomic_path

INTENDED_USE = ("Research and teaching: exploring nodule detection and Grad-CAM explanations on chest CT. "
                "Not a medical device; not validated for clinical use.")


def _metrics_table(metrics: dict[str, Any]) -> str:
    keys = ("n", "accuracy", "precision", "recall", "f1", "auc")
    rows = ["| split | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for split in ("validation", "test"):
        m = metrics.get(split)
        if m:
            cells = ["n/a" if m.get(k) is None else (f"{m[k]:.3f}" if isinstance(m[k], float) else str(m[k]))
                     for k in keys]
            rows.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def model_card(info: ModelInfo, data_description: str, limits: list[str], extra: str = "") -> str:
    """Markdown text of the card; ``extra`` (markdown) is appended, e.g. a detection evaluation."""
    td = info.training_data
    return f"""# Model card: {info.name}

**{DISCLAIMER}**

## Model
- Architecture: {info.arch}, width x{info.width}, {'patch (nodule-level)' if info.task == 'patch' else 'scan-level'}
  classifier, input {info.input_size[0]}x{info.input_size[1]}x{info.input_size[2]} voxels,
  classes {', '.join(info.class_names)}; Grad-CAM layer `{info.cam_layer}`.
- Preprocessing (recorded in the checkpoint, replayed at detection): `{info.preprocess}`
- Engine version: {info.engine_version}

## Data
{data_description}
- Cases: {td.get('cases')} from {td.get('patients')} patients; split (train/validation/test cases):
  {td.get('split_cases')}, by patient; training samples {td.get('train_samples')}, of which positive
  {td.get('train_positives')}.

## Intended use
{INTENDED_USE}

## Limits
""" + "\n".join(f"- {item}" for item in limits) + f"""

## Measured metrics (best epoch {info.metrics.get('best_epoch')}, threshold 0.5)
{_metrics_table(info.metrics)}
""" + extra


def write_model_card(path: str | os.PathLike, info: ModelInfo, data_description: str, limits: list[str],
                     extra: str = "") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(model_card(info, data_description, limits, extra))
