"""Train the shipped ``iris`` model: a 4-16-3 MLP in numpy, on data/iris.csv.

    python scripts/train_iris.py

Deterministic (seed 0). Every 5th row (rows 4, 9, 14, ...) is held out for testing;
the rest is for training. Writes the weights to the model's folder and prints the
accuracy on both splits (docs/models.md states the held-out one, and a test checks it
through the running server).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "iris.csv"
OUT = ROOT / "services" / "inferencehub" / "model_repository" / "iris" / "weights.npz"
CLASSES = ("setosa", "versicolor", "virginica")
HIDDEN = 16
SEED = 0


def load() -> tuple[np.ndarray, np.ndarray]:
    with DATA.open() as f:
        rows = list(csv.DictReader(f))
    x = np.array([[float(r[k]) for k in list(r)[:4]] for r in rows], dtype=np.float32)
    y = np.array([CLASSES.index(r["species"]) for r in rows], dtype=np.int64)
    return x, y


def held_out(n: int) -> np.ndarray:
    return np.arange(n) % 5 == 4


def forward(params: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w0, b0, w1, b1 = params
    h = np.maximum(x @ w0 + b0, 0.0)
    z = h @ w1 + b1
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return h, z / z.sum(axis=1, keepdims=True)


def train(x: np.ndarray, y: np.ndarray, epochs: int = 500, lr: float = 0.01) -> list[np.ndarray]:
    rng = np.random.default_rng(SEED)
    params = [
        rng.normal(0, np.sqrt(2 / 4), (4, HIDDEN)),
        np.zeros(HIDDEN),
        rng.normal(0, np.sqrt(2 / HIDDEN), (HIDDEN, 3)),
        np.zeros(3),
    ]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    onehot = np.eye(3)[y]
    for t in range(1, epochs + 1):  # full-batch Adam on cross-entropy with a little L2
        h, p = forward(params, x)
        dz = (p - onehot) / len(x)
        dh = (dz @ params[2].T) * (h > 0)
        grads = [x.T @ dh + 1e-4 * params[0], dh.sum(0), h.T @ dz + 1e-4 * params[2], dz.sum(0)]
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            params[i] -= lr * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
    return params


def main() -> None:
    x, y = load()
    test = held_out(len(x))
    mean, scale = x[~test].mean(0), x[~test].std(0)
    params = train((x[~test] - mean) / scale, y[~test])
    for name, rows in (("train", ~test), ("held-out", test)):
        _, p = forward(params, (x[rows] - mean) / scale)
        accuracy = float((p.argmax(1) == y[rows]).mean())
        print(f"{name} accuracy: {accuracy:.4f} ({round(accuracy * rows.sum())}/{rows.sum()})")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(mean=mean, scale=scale, w0=params[0], b0=params[1], w1=params[2], b1=params[3])
    np.savez(OUT, **{k: a.astype(np.float32) for k, a in arrays.items()})
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
