"""The onnx and sklearn runtimes: models built by scripts/build_models.py, served by a real replica.

Answers are compared with what onnxruntime and scikit-learn compute in this process on the same rows;
the tensors a config leaves out are read from the model file, and declared ones that contradict it stop
start-up with an error naming the config file and the field.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import grpc
import joblib
import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from inferencehub.errors import ConfigError
from inferencehub.inference.repository import load_repository

from conftest import ROOT, Gateway, Replica, build_example_models, failed_start, sample_value, scrape

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64}


def iris() -> tuple[np.ndarray, np.ndarray]:
    with (ROOT / "data" / "iris.csv").open() as f:
        rows = list(csv.DictReader(f))
    x = np.array([[float(r[k]) for k in list(r)[:4]] for r in rows], dtype=np.float32)
    return x, np.array([r["species"] for r in rows])


def variant(repo: Path, name: str, model: Path, **config) -> Path:
    """A model folder in ``repo`` serving ``model`` (linked) with its own config."""
    folder = repo / name
    folder.mkdir(parents=True)
    (folder / model.name).symlink_to(model)
    (folder / "config.json").write_text(json.dumps({"name": name, **config}))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_example_models(tmp_path_factory.mktemp("built"))


@pytest.fixture(scope="module")
def repo(built, tmp_path_factory) -> Path:
    """The built models, variants of their configs, and two more scikit-learn models trained here."""
    repo = tmp_path_factory.mktemp("repo")
    for name in ("iris-onnx", "iris-sklearn"):
        (repo / name).symlink_to(built / name)
    onnx_file, joblib_file = built / "iris-onnx" / "model.onnx", built / "iris-sklearn" / "model.joblib"
    variant(repo, "iris-sklearn-bare", joblib_file, runtime="sklearn")  # nothing declared: FP64 input "input"
    variant(repo, "iris-onnx-process", onnx_file, runtime="onnx", execution="process")  # loaded in a worker
    variant(
        repo,
        "iris-onnx-batched",
        onnx_file,
        runtime="onnx",
        outputs=[{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],  # a subset of the model's
        batching={"max_batch_size": 16, "max_queue_delay_ms": 200, "preferred_batch_sizes": [16]},
        scheduling={"max_concurrency": 1},
        parameters={"intra_op_num_threads": 2},
    )
    x, species = iris()
    extra = tmp_path_factory.mktemp("extra")
    # A regressor (petal width from the other three) and a classifier whose classes are strings.
    joblib.dump(LinearRegression().fit(x[:, :3].astype(np.float64), x[:, 3]), extra / "regressor.joblib")
    joblib.dump(LogisticRegression(max_iter=1000).fit(x, species), extra / "named.joblib")
    variant(
        repo, "petal-width", extra / "regressor.joblib", runtime="sklearn", parameters={"model": "regressor.joblib"}
    )
    variant(repo, "species", extra / "named.joblib", runtime="sklearn", parameters={"model": "named.joblib"})
    # Text in: a scikit-learn pipeline over strings, and an ONNX graph that upper-cases strings.
    texts = ["long wide petals", "short narrow petals", "long narrow petals", "short wide petals"]
    text_pipeline = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, ["a", "b", "a", "b"])
    joblib.dump(text_pipeline, extra / "text.joblib")
    variant(
        repo,
        "text-sklearn",
        extra / "text.joblib",
        runtime="sklearn",
        inputs=[{"name": "text", "datatype": "BYTES", "shape": [-1]}],  # no n_features_in_: declared
        parameters={"model": "text.joblib"},
    )
    upper = helper.make_model(
        helper.make_graph(
            [helper.make_node("StringNormalizer", ["text"], ["upper"], case_change_action="UPPER", locale="C")],
            "upper",
            [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
            [helper.make_tensor_value_info("upper", TensorProto.STRING, ["n"])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    (extra / "upper.onnx").write_bytes(upper.SerializeToString())
    variant(repo, "text-onnx", extra / "upper.onnx", runtime="onnx", parameters={"model": "upper.onnx"})
    # A model slow enough (a few ms a call) for concurrent requests to queue behind a running call and batch.
    forest = RandomForestClassifier(n_estimators=300, random_state=0).fit(x.astype(np.float64), species)
    joblib.dump(forest, extra / "forest.joblib")
    variant(
        repo,
        "forest",
        extra / "forest.joblib",
        runtime="sklearn",
        outputs=[{"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]}],
        parameters={"model": "forest.joblib"},
        batching={"max_batch_size": 16, "max_queue_delay_ms": 100, "preferred_batch_sizes": [16]},
        scheduling={"max_concurrency": 1},
    )
    return repo


@pytest.fixture(scope="module")
def served(repo):
    replica = Replica("--models", str(repo), "--threads", "2", "--processes", "1").wait_serving()
    gateway = Gateway(f"ipv4:{replica.target}")
    try:
        yield replica, gateway
    finally:
        gateway.stop()
        replica.stop()


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served[0].target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def request(model: str, name: str, array: np.ndarray, outputs=()) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    if array.dtype == object:
        message.inputs.add(name=name, datatype="BYTES", shape=array.shape)
        message.raw_input_contents.append(b"".join(len(item).to_bytes(4, "little") + item for item in array))
    else:
        datatype = {v: k for k, v in DTYPES.items()}[array.dtype.type]
        message.inputs.add(name=name, datatype=datatype, shape=array.shape)
        message.raw_input_contents.append(array.tobytes())
    for output in outputs:
        message.outputs.add(name=output)
    return message


def decode(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    arrays = {}
    for i, out in enumerate(response.outputs):
        raw = response.raw_output_contents[i]
        if out.datatype == "BYTES":
            items, offset = [], 0
            while offset < len(raw):
                size = int.from_bytes(raw[offset : offset + 4], "little")
                items.append(raw[offset + 4 : offset + 4 + size])
                offset += 4 + size
            arrays[out.name] = np.array(items, dtype=object).reshape(out.shape)
        else:
            arrays[out.name] = np.frombuffer(raw, DTYPES[out.datatype]).reshape(out.shape)
    return arrays


def infer(stub, model: str, name: str, rows: np.ndarray, outputs=()) -> dict[str, np.ndarray]:
    """All rows, in requests of 50 (the models batch up to 64 rows a call)."""
    parts = [
        decode(stub.ModelInfer(request(model, name, rows[i : i + 50], outputs), timeout=30))
        for i in range(0, len(rows), 50)
    ]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def test_metadata_shows_the_tensors_read_from_the_model(served):
    _, gateway = served

    def metadata(model):
        response = gateway.request("GET", f"/v2/models/{model}")
        assert response.status == 200, response
        body = response.json()
        return body["platform"], body["inputs"], body["outputs"]

    assert metadata("iris-onnx") == (
        "onnxruntime_onnx",
        [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],  # as skl2onnx wrote them
        [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
        ],
    )
    predict, proba = (
        {"name": "predict", "datatype": "INT64", "shape": [-1]},
        {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]},
    )
    assert metadata("iris-sklearn") == (
        "sklearn",
        [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],  # declared
        [predict, proba],  # from classes_
    )
    assert metadata("iris-sklearn-bare") == (
        "sklearn",
        [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}],
        [
            predict,
            proba,
        ],
    )
    assert metadata("iris-onnx-batched")[2] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert metadata("petal-width")[1:] == (
        [{"name": "input", "datatype": "FP64", "shape": [-1, 3]}],
        [{"name": "predict", "datatype": "FP64", "shape": [-1]}],
    )
    assert metadata("species")[2] == [
        {"name": "predict", "datatype": "BYTES", "shape": [-1]},
        {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]},
    ]


def test_answers_equal_the_libraries_own(built, repo, stub):
    x, species = iris()
    session = onnxruntime.InferenceSession(str(built / "iris-onnx" / "model.onnx"))
    label, probabilities = session.run(["label", "probabilities"], {"features": x})
    for model in ("iris-onnx", "iris-onnx-process"):
        got = infer(stub, model, "features", x)
        np.testing.assert_array_equal(got["label"], label)
        np.testing.assert_allclose(got["probabilities"], probabilities, rtol=1e-6, atol=1e-7)

    pipeline = joblib.load(built / "iris-sklearn" / "model.joblib")
    got = infer(stub, "iris-sklearn", "features", x)
    np.testing.assert_array_equal(got["predict"], pipeline.predict(x))
    np.testing.assert_allclose(got["predict_proba"], pipeline.predict_proba(x), rtol=1e-6, atol=1e-9)
    assert (got["predict"] == label).mean() > 0.97  # the ONNX export agrees with the pipeline it came from
    truth = np.array([("setosa", "versicolor", "virginica").index(s) for s in species])
    held_out = np.arange(len(x)) % 5 == 4
    assert (got["predict"][held_out] == truth[held_out]).sum() == 28  # the docs' 93.3% (28 of 30)

    rows = x.astype(np.float64)
    got = infer(stub, "iris-sklearn-bare", "input", rows, ["predict_proba"])
    assert list(got) == ["predict_proba"]
    np.testing.assert_allclose(got["predict_proba"], pipeline.predict_proba(rows), rtol=1e-9, atol=1e-12)

    regressor = joblib.load(repo / "petal-width" / "regressor.joblib")
    got = infer(stub, "petal-width", "input", rows[:, :3].copy())
    np.testing.assert_allclose(got["predict"], regressor.predict(rows[:, :3]), rtol=1e-9)

    named = joblib.load(repo / "species" / "named.joblib")
    got = infer(stub, "species", "input", rows)
    assert [s.decode() for s in got["predict"]] == named.predict(rows).tolist()
    assert (got["predict"].astype(str) == species).mean() > 0.95
    np.testing.assert_allclose(got["predict_proba"], named.predict_proba(rows), rtol=1e-9, atol=1e-12)


def test_text_in_and_out(repo, stub):
    texts = np.array([b"long wide petals", "h\u00e9llo".encode()], dtype=object)
    got = infer(stub, "text-onnx", "text", texts)
    session = onnxruntime.InferenceSession(str(repo / "text-onnx" / "upper.onnx"))
    (expected,) = session.run(None, {"text": np.array(["long wide petals", "h\u00e9llo"], dtype=object)})
    assert got["upper"].tolist() == [b"LONG WIDE PETALS", "H\u00e9LLO".encode()] == [e.encode() for e in expected]
    pipeline = joblib.load(repo / "text-sklearn" / "text.joblib")
    got = infer(stub, "text-sklearn", "text", texts)
    assert [label.decode() for label in got["predict"]] == pipeline.predict(["long wide petals", "h\u00e9llo"]).tolist()
    np.testing.assert_allclose(got["predict_proba"], pipeline.predict_proba(["long wide petals", "h\u00e9llo"]))


def test_json_through_the_gateway(served, built):
    _, gateway = served
    rows = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]
    body = {"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": rows}]}
    response = gateway.request("POST", "/v2/models/iris-sklearn/infer", body)
    assert response.status == 200, response
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    pipeline = joblib.load(built / "iris-sklearn" / "model.joblib")
    assert outputs["predict"]["data"] == pipeline.predict(np.array(rows, np.float32)).tolist() == [0, 2]
    bad = gateway.request("POST", "/v2/models/iris-onnx/infer", {"inputs": [{**body["inputs"][0], "shape": [1, 8]}]})
    assert bad.status == 400 and "features" in bad.json()["error"], bad


def test_concurrent_rows_are_batched_and_each_gets_its_own_answer(served, built, repo, stub):
    """Single-row requests at once: each caller gets the library's answer for its own row.

    The forest's calls take milliseconds, so requests pile up behind a running one and go in batches; the
    ONNX pipeline's take microseconds, so whether they batch depends on timing: only their answers are checked.
    """
    replica, _ = served
    x, _ = iris()
    session = onnxruntime.InferenceSession(str(built / "iris-onnx" / "model.onnx"))
    (onnx_expected,) = session.run(["probabilities"], {"features": x})
    forest_expected = joblib.load(repo / "forest" / "forest.joblib").predict_proba(x.astype(np.float64))
    before = scrape(replica)
    futures = [
        (model, i, stub.ModelInfer.future(request(model, name, x[i : i + 1].astype(dtype)), timeout=60))
        for i in range(0, 150, 5)  # 30 single-row requests to each model
        for model, name, dtype in (("forest", "input", np.float64), ("iris-onnx-batched", "features", np.float32))
    ]
    for model, i, future in futures:
        if model == "forest":
            np.testing.assert_allclose(decode(future.result())["predict_proba"], forest_expected[i : i + 1], rtol=1e-9)
        else:
            got = decode(future.result())["probabilities"]
            np.testing.assert_allclose(got, onnx_expected[i : i + 1], rtol=1e-6, atol=1e-7)
    after = scrape(replica)

    def delta(name, model):
        return sample_value(after, name, model=model) - sample_value(before, name, model=model)

    assert delta("inferencehub_inference_batch_size_sum", "forest") == 30
    assert delta("inferencehub_inference_batch_size_sum", "iris-onnx-batched") == 30
    calls = delta("inferencehub_inference_model_calls_total", "forest")
    assert calls < 30 / 2, f"{calls} model calls for 30 requests: little batching happened"


# --- configs that contradict the model, missing libraries: in this process, on the repository loader ---


def bad_config(tmp_path: Path, model: Path, config: dict) -> tuple[Path, str]:
    folder = variant(tmp_path, "m", model, **config)
    with pytest.raises(ConfigError) as err:
        load_repository(tmp_path)
    return folder / "config.json", str(err.value)


ONNX_INPUT = {"name": "features", "datatype": "FP32", "shape": [-1, 4]}
CONTRADICTIONS = [
    ("onnx", {"inputs": [{**ONNX_INPUT, "name": "x"}]}, "inputs[0].name", "model.onnx has no input 'x'"),
    ("onnx", {"inputs": [{**ONNX_INPUT, "datatype": "FP64"}]}, "inputs[0].datatype", "which is FP32"),
    ("onnx", {"inputs": [{**ONNX_INPUT, "shape": [-1, 5]}]}, "inputs[0].shape", "which is [-1, 4]"),
    ("onnx", {"inputs": [{**ONNX_INPUT, "shape": [-1]}]}, "inputs[0].shape", "which is [-1, 4]"),
    (
        "onnx",
        {"outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}]},
        "outputs[0].name",
        "has no output 'scores' (it has label, probabilities)",
    ),
    ("onnx", {"parameters": {"intra_op_num_threads": 0}}, "parameters.intra_op_num_threads", "from 1 to 256"),
    ("onnx", {"parameters": {"threads": 2}}, "parameters.threads", "unknown parameter"),
    ("onnx", {"parameters": {"model": "other.onnx"}}, "parameters.model", "no model file 'other.onnx'"),
    ("sklearn", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 5]}]}, "inputs[0].shape", "[-1, 4]"),
    ("sklearn", {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [-1, 4]}]}, "inputs[0].shape", "BYTES"),
    (
        "sklearn",
        {"outputs": [{"name": "decision_function", "datatype": "FP64", "shape": [-1, 3]}]},
        "outputs[0].name",
        "has no output 'decision_function' (it has predict, predict_proba)",
    ),
    (
        "sklearn",
        {"outputs": [{"name": "predict", "datatype": "BYTES", "shape": [-1]}]},
        "outputs[0].datatype",
        "which is INT64",
    ),
    ("sklearn", {"parameters": {"model": "/etc/passwd"}}, "parameters.model", "a file name in the model's folder"),
    (
        "sklearn",
        {"batching": {"max_batch_size": 8}, "inputs": [{"name": "x", "datatype": "FP64", "shape": [2, 4]}]},
        "inputs[0].shape",
        "first dimension",
    ),
]


@pytest.mark.parametrize(("runtime", "config", "field", "says"), CONTRADICTIONS, ids=[c[2] for c in CONTRADICTIONS])
def test_declared_tensors_that_contradict_the_model_name_file_and_field(tmp_path, built, runtime, config, field, says):
    model = built / ("iris-onnx/model.onnx" if runtime == "onnx" else "iris-sklearn/model.joblib")
    source, message = bad_config(tmp_path, model, {"runtime": runtime, **config})
    assert message.startswith(f"{source}: {field}: "), message
    assert says in message, message


def test_unreadable_model_files_are_config_errors(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not an onnx file")
    (folder / "model.joblib").write_bytes(b"not a pickle")
    (folder / "list.joblib").write_bytes(b"")
    joblib.dump([1, 2, 3], folder / "list.joblib")
    for runtime, file, says in (
        ("onnx", "model.onnx", "onnxruntime cannot load model.onnx"),
        ("sklearn", "model.joblib", "cannot load model.joblib"),
        ("sklearn", "list.joblib", "holds a list, not an estimator with predict()"),
    ):
        repo = tmp_path / f"{runtime}-{file}"
        source, message = bad_config(repo, folder / file, {"runtime": runtime, "parameters": {"model": file}})
        assert message.startswith(f"{source}: parameters.model: ") and says in message, message


def test_onnx_outputs_the_protocol_cannot_carry(tmp_path, built):
    """skl2onnx's default classifier export has a list of maps for probabilities: an error unless left out."""
    from skl2onnx import to_onnx

    pipeline = joblib.load(built / "iris-sklearn" / "model.joblib")
    zipmap = tmp_path / "zipmap.onnx"
    zipmap.write_bytes(to_onnx(pipeline, np.zeros((1, 4), np.float32)).SerializeToString())
    config = {"runtime": "onnx", "parameters": {"model": "zipmap.onnx"}}
    source, message = bad_config(tmp_path / "a", zipmap, config)
    assert message.startswith(f"{source}: outputs: output 'output_probability' of zipmap.onnx is seq(map("), message
    assert "declare the outputs to serve without it" in message
    variant(
        tmp_path / "b", "m", zipmap, **config, outputs=[{"name": "output_label", "datatype": "INT64", "shape": [-1]}]
    )
    (loaded,) = load_repository(tmp_path / "b")
    assert [o.name for o in loaded.outputs] == ["output_label"]


@pytest.mark.parametrize(
    ("runtime", "module", "package"),
    [("onnx", "onnxruntime", "onnxruntime"), ("sklearn", "sklearn", "scikit-learn"), ("sklearn", "joblib", "joblib")],
)
def test_a_missing_library_is_a_config_error_naming_the_package(tmp_path, built, monkeypatch, runtime, module, package):
    model = built / ("iris-onnx/model.onnx" if runtime == "onnx" else "iris-sklearn/model.joblib")
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    source, message = bad_config(tmp_path, model, {"runtime": runtime})
    assert message == (
        f"{source}: runtime: the '{runtime}' runtime needs the {package} package, which is not installed: "
        "pip install 'inferencehub[runtimes]'"
    )


def test_a_replica_without_onnxruntime_says_what_to_install(tmp_path, built):
    """The replica itself, with onnxruntime unimportable: exit code 2 and one line naming the package."""
    source = variant(tmp_path, "iris-onnx", built / "iris-onnx" / "model.onnx", runtime="onnx") / "config.json"
    args = ["inference", "--models", str(tmp_path), "--port", "0", "--metrics-port", "0", "--host", "127.0.0.1"]
    code = f"import sys; sys.modules['onnxruntime'] = None; from inferencehub.cli import main; main({args!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert (
        f"{source}: runtime: the 'onnx' runtime needs the onnxruntime package, which is not installed: "
        "pip install 'inferencehub[runtimes]'" in done.stderr
    )
    assert "Traceback" not in done.stderr


def test_a_replica_with_a_contradicting_config_does_not_start(tmp_path, built):
    source = (
        variant(
            tmp_path,
            "iris-onnx",
            built / "iris-onnx" / "model.onnx",
            runtime="onnx",
            inputs=[{"name": "features", "datatype": "FP64", "shape": [-1, 4]}],
        )
        / "config.json"
    )
    done = failed_start("--models", str(tmp_path), timeout=120)
    assert done.returncode == 2, done.stderr
    assert (
        f"{source}: inputs[0].datatype: FP64 does not fit input 'features' of model.onnx, which is FP32" in done.stderr
    )
    assert "Traceback" not in done.stderr
