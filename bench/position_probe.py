"""Do a model's merged vision tokens say what lies in their cell, and which cell they are? (CPU, seconds)

    .venv/bin/python bench/position_probe.py [--model results/train/demo_dense/model]
        [--records results/fuse/demo_dense/val.jsonl] [--images 400]

For each single-image record with objects, the vision tower's merged tokens (one per cell of the
merged patch grid, row-major), then two linear read-outs (ridge regression, one-vs-rest), fitted on
the first half of the images and scored on the second:
- occupancy: does a token tell whether an object's centre lies in its own cell? (against always
  guessing the commoner answer);
- position: does a token tell which cell it is? (against chance, one over the cells).
A dense answer needs both: M-RoPE puts position into the attention scores only, so a model that must
write a coordinate reads it from what the token carries. docs/status.md has the demo's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def cell_tokens(model_dir: Path, records: Path, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(images × cells × hidden token features, images × cells occupancy) of the first `limit` images."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from visionqc import contract
    from visionqc.io import read_jsonl

    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    merge = processor.image_processor.merge_size
    features, occupied = [], []
    for _, record in read_jsonl(records):
        if len(record.get("images") or []) != 1 or not record.get("objects"):
            continue
        image = Image.open(records.parent / record["images"][0]).convert("RGB")
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        _, rows, cols = (int(v) // f for v, f in zip(inputs["image_grid_thw"][0], (1, merge, merge), strict=True))
        with torch.no_grad():
            tokens = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        tokens = tokens.pooler_output if hasattr(tokens, "pooler_output") else tokens[0]
        cells = np.zeros(rows * cols, dtype=int)
        for obj in record["objects"]:
            flat = np.asarray(obj[contract.geometry_key(obj)], dtype=float).reshape(-1, 2)
            x, y = (flat.min(0) + flat.max(0)) / 2
            cells[min(rows - 1, int(y / record["height"] * rows)) * cols + min(cols - 1, int(x / record["width"] * cols))] = 1
        if features and tokens.shape[0] != features[0].shape[0]:
            continue  # the probe compares like with like: one grid size
        features.append(tokens.numpy())
        occupied.append(cells)
        if len(features) == limit:
            break
    return np.stack(features), np.stack(occupied)


def read_out(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Held-out accuracy of a ridge one-vs-rest read-out of the labels from the features."""
    classes = np.unique(train_y)
    mean, scale = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.hstack([(train_x - mean) / scale, np.ones((len(train_x), 1))])
    b = np.hstack([(test_x - mean) / scale, np.ones((len(test_x), 1))])
    targets = (train_y[:, None] == classes[None, :]).astype(float)
    weights = np.linalg.solve(a.T @ a + 1e-2 * np.eye(a.shape[1]), a.T @ targets)
    return float((classes[(b @ weights).argmax(1)] == test_y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "results/train/demo_dense/model")
    parser.add_argument("--records", type=Path, default=REPO / "results/fuse/demo_dense/val.jsonl")
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    features, occupied = cell_tokens(args.model, args.records, args.images)
    images, cells, width = features.shape
    half = images // 2
    unit = features / np.linalg.norm(features, axis=2, keepdims=True)
    cosine = np.einsum("icd,ied->ice", unit, unit)[:, ~np.eye(cells, dtype=bool)].mean()
    occupancy = read_out(features[:half].reshape(-1, width), occupied[:half].reshape(-1),
                         features[half:].reshape(-1, width), occupied[half:].reshape(-1))
    index = np.tile(np.arange(cells), images)
    position = read_out(features[:half].reshape(-1, width), index[: half * cells],
                        features[half:].reshape(-1, width), index[half * cells:])
    commoner = max(occupied[half:].mean(), 1 - occupied[half:].mean())
    print(json.dumps({"model": str(args.model), "images": images, "cells": cells, "mean_token_cosine": round(float(cosine), 4),
                      "occupancy_read_out": round(occupancy, 3), "occupancy_commoner_answer": round(float(commoner), 3),
                      "position_read_out": round(position, 3), "position_chance": round(1 / cells, 4)}, indent=1))


if __name__ == "__main__":
    main()
