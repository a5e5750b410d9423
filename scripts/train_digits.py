"""Train the shipped ``digits`` model: fixed random ReLU features and a trained linear readout, in numpy.

    python scripts/train_digits.py

64 pixels -> 4096 -> 4096 random ReLU features (generated from a seed by the mlp runtime itself, so the
repository stores only the readout) -> 10 classes, the readout fitted by ridge regression on one-hot
targets. The hidden layers are wide so that one call reads ~64 MB of weights: a single row is bound by
weight reads, and batching rows amortises them. Every 5th row of data/digits.csv is held out; the script
prints the accuracy on both splits (docs/models.md states the held-out one; a test checks it through the server).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from inferencehub.inference.runtimes.mlp import random_layers

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "digits.csv"
OUT = ROOT / "services" / "inferencehub" / "model_repository" / "digits" / "weights.npz"
SEED = 0
WIDTHS = [4096, 4096]
RIDGE = 10.0


def load() -> tuple[np.ndarray, np.ndarray]:
    with DATA.open() as f:
        rows = list(csv.reader(f))[1:]
    x = np.array([[float(v) for v in r[:64]] for r in rows], dtype=np.float32)
    y = np.array([int(r[64]) for r in rows], dtype=np.int64)
    return x, y


def features(x: np.ndarray) -> np.ndarray:
    for w, b in random_layers(64, SEED, WIDTHS):
        x = np.maximum(x @ w + b, 0.0)
    return x.astype(np.float64)


def main() -> None:
    x, y = load()
    test = np.arange(len(x)) % 5 == 4
    mean, scale = np.zeros(64, np.float32), np.full(64, 16.0, np.float32)  # pixels 0..16 -> 0..1
    h = features((x[~test] - mean) / scale)
    targets = np.eye(10)[y[~test]] * 2.0 - 1.0
    w = np.linalg.solve(h.T @ h + RIDGE * np.eye(h.shape[1]), h.T @ targets)
    b = np.zeros(10)
    for name, rows in (("train", ~test), ("held-out", test)):
        logits = features((x[rows] - mean) / scale) @ w + b
        accuracy = float((logits.argmax(1) == y[rows]).mean())
        print(f"{name} accuracy: {accuracy:.4f} ({round(accuracy * rows.sum())}/{rows.sum()})")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez(OUT, mean=mean, scale=scale, w0=w.astype(np.float32), b0=b.astype(np.float32))
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
