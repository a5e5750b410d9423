"""Build the example scikit-learn and ONNX models from data/iris.csv: nothing downloaded, no binaries committed.

    python scripts/build_models.py [--out build/models] [--shipped]

Trains a scikit-learn pipeline (standardisation, then logistic regression) on the training split of
data/iris.csv (every 5th row, rows 4, 9, 14, ..., is held out, as for the shipped ``iris`` model), and writes
two model folders:

    iris-sklearn/  config.json + model.joblib   runtime "sklearn": the pipeline as scikit-learn saved it
    iris-onnx/     config.json + model.onnx     runtime "onnx": the same pipeline exported by skl2onnx

Deterministic (lbfgs, no randomness). ``--shipped`` also links the shipped models into the folder, so that
one repository serves them all (``make run`` serves build/models this way). Needs the ``dev`` extra
(scikit-learn and skl2onnx).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import joblib
import numpy as np
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from train_iris import held_out, load  # the shipped iris data, read and split as for the mlp

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "services" / "inferencehub" / "model_repository"

# The sklearn model declares its input (FP32, named like the shipped iris model's) and leaves the outputs to the
# model; the ONNX one leaves both to the model.
CONFIGS = {
    "iris-sklearn": {
        "name": "iris-sklearn",
        "runtime": "sklearn",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
        "parameters": {"model": "model.joblib"},
        "batching": {"max_batch_size": 64},
    },
    "iris-onnx": {
        "name": "iris-onnx",
        "runtime": "onnx",
        "parameters": {"model": "model.onnx", "intra_op_num_threads": 1},
        "batching": {"max_batch_size": 64},
    },
}


def train(x: np.ndarray, y: np.ndarray):
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)


def export(pipeline, path: Path) -> None:
    """The pipeline as ONNX: input ``features`` FP32 [N, 4]; label and probabilities as plain tensors."""
    onnx_model = convert_sklearn(
        pipeline,
        initial_types=[("features", FloatTensorType([None, 4]))],
        options={id(pipeline.steps[-1][1]): {"zipmap": False}},  # probabilities as a tensor, not a list of maps
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    path.write_bytes(onnx_model.SerializeToString())


def model_folder(out: Path, name: str) -> Path:
    """A fresh folder for model ``name`` holding its config."""
    folder = out / name
    if folder.is_symlink():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIGS[name], indent=2) + "\n")
    return folder


def link_shipped(out: Path) -> None:
    for model in sorted(SHIPPED.iterdir()):
        if not (model / "config.json").is_file():
            continue
        link = out / model.name
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            shutil.rmtree(link)
        link.symlink_to(os.path.relpath(model, out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "models", help="folder to write the models to")
    parser.add_argument("--shipped", action="store_true", help="also link the shipped models into the folder")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    x, y = load()
    test = held_out(len(x))
    pipeline = train(x[~test], y[~test])
    accuracy = float((pipeline.predict(x[test]) == y[test]).mean())
    print(f"iris logistic regression, held-out accuracy: {accuracy:.4f} ({round(accuracy * test.sum())}/{test.sum()})")

    joblib.dump(pipeline, model_folder(out, "iris-sklearn") / "model.joblib")
    export(pipeline, model_folder(out, "iris-onnx") / "model.onnx")
    if args.shipped:
        link_shipped(out)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")


if __name__ == "__main__":
    main()
