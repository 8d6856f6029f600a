"""The observability metrics against computations written out here: expert similarity on
hand-built experts and on a model's layers, FLOPs per token and MFU by hand, and what a short
training run on an expert-parallel mesh logs to metrics.jsonl, TensorBoard, `skymoe report`, and
W&B and MLflow (offline, read back from their local stores, across a failed run and its resume).
(Max1/Max2, Max2/Max3, entropy, expert load and drop rate on hand-built routings are checked in
test_router.py and test_moe_block.py.)"""

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

import skymoe_jax
from skymoe_jax.cli import main
from skymoe_jax.config import base_config, flatten, validate
from skymoe_jax.errors import RunFailure
from skymoe_jax.metrics.flops import flops_per_token, mfu, peak_flops
from skymoe_jax.metrics.similarity import expert_similarity, layer_similarity
from skymoe_jax.metrics.writers import JsonlWriter, read_jsonl, scalars
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import build_model

# 3 layers (the first dense), 4 experts top-2: two MoE layers in a scanned stack of 2.
V, D, L, H, KV, HD, FFN, E, K, F, S = 256, 32, 3, 2, 1, 16, 64, 4, 2, 32, 32
PEAK = 1e9


def _config(**train):
    c = base_config()
    c.model.update(vocab_size=V, d_model=D, num_layers=L, num_heads=H, num_kv_heads=KV, ffn_dim=FFN)
    c.moe.update(num_experts=E, top_k=K, expert_ffn_dim=F, first_k_dense=1, group_size=0)
    c.data.update(seq_len=S, batch_size=8, shuffle_window=64)
    c.optim.warmup_steps = 2
    c.train.update(steps=6, log_every=1, eval_every=3, eval_batches=1, checkpoint_every=6, progress=False, **train)
    c.metrics.update(similarity_every=3, peak_flops_per_device=PEAK)
    c.parallel.mesh = (1, 2, 4)  # experts split over 4 devices: similarity comes from sharded parameters
    validate(c)
    return c


def _np_similarity(vectors: np.ndarray) -> float:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    gram = unit @ unit.T
    n = len(vectors)
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


def test_similarity_of_identical_experts_is_one():
    w = np.random.default_rng(0).normal(size=(1, 5, 3))
    assert float(
        layer_similarity([jnp.asarray(np.repeat(w, 4, axis=0)), jnp.asarray(np.ones((4, 2)))])
    ) == pytest.approx(1.0, abs=1e-6)


def test_similarity_of_hand_built_experts():
    # Flattened (first tensor, second tensor): e0 = (1, 0 | 0), e1 = (0, 0 | 1), e2 = 5 * (1, 0 | 1).
    # cos(e0, e1) = 0, cos(e0, e2) = cos(e1, e2) = 1/sqrt(2): mean over pairs sqrt(2)/3.
    first = jnp.asarray([[1.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    second = jnp.asarray([[0.0], [1.0], [5.0]])
    assert float(layer_similarity([first, second])) == pytest.approx(np.sqrt(2) / 3, rel=1e-6)
    # Opposite experts: cosine -1. An all-zero expert counts as cosine 0 with the others.
    assert float(layer_similarity([jnp.asarray([[1.0, 2.0], [-1.0, -2.0]])])) == pytest.approx(-1.0, rel=1e-6)
    assert float(layer_similarity([jnp.asarray([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]])])) == pytest.approx(
        1 / 3, rel=1e-6
    )


def test_similarity_of_random_experts_matches_numpy():
    rng = np.random.default_rng(1)
    tensors = [rng.normal(size=(6, 4, 3)) + 0.5, rng.normal(size=(6, 3, 4))]
    vectors = np.concatenate([t.reshape(6, -1) for t in tensors], axis=1)
    assert float(layer_similarity([jnp.asarray(t, jnp.float32) for t in tensors])) == pytest.approx(
        _np_similarity(vectors), abs=1e-6
    )


def test_similarity_follows_the_models_layer_order():
    spec = ModelSpec.from_config(_config())
    # Parameters drawn with numpy: jax.random would compile an RNG program per shape.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(spec)))
    rng = np.random.default_rng(0)
    model = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), abstract))
    experts = model.stacks[1].blocks.layers[0].ffn.experts  # the scanned stack holding both MoE layers
    for w in (experts.w_gate, experts.w_up, experts.w_down):
        w[...] = w[...].at[1].set(jnp.broadcast_to(w[...][1, :1], w[...][1].shape))  # MoE layer 1: all alike
    sims = np.asarray(jax.jit(lambda p: expert_similarity(p, spec))(nnx.state(model, nnx.Param)))
    assert sims.shape == (2,)
    assert sims[1] == pytest.approx(1.0, abs=1e-6)
    assert abs(sims[0]) < 0.05  # independent random experts


def _hand_flops_per_token() -> int:
    attention = D * H * HD + 2 * D * KV * HD + H * HD * D  # wq, wk, wv, wo
    dense_ffn = 3 * D * FFN
    moe = D * E + K * 3 * D * F  # router, and the k chosen SwiGLU experts
    active_matmul = L * attention + dense_ffn + 2 * moe + D * V  # + output head; embedding and norms: no FLOPs
    causal_attention = 2 * L * H * HD * S  # QK^T and AV over an average context of S/2
    return 3 * (2 * active_matmul + causal_attention)  # forward + backward (twice the forward)


def test_metrics_file_survives_a_run_killed_mid_record(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    writer = JsonlWriter(path)
    writer.write({"step": 1, "loss": 2.5})
    writer.close()
    with open(path, "a") as f:
        f.write('{"step": 2, "loss": 2.')  # what a SIGKILL mid-write leaves, and a poller sees mid-write
    assert read_jsonl(path) == [{"step": 1, "loss": 2.5}]
    resumed = JsonlWriter(path)  # the resumed run drops the cut record rather than appending to it
    resumed.write({"step": 2, "loss": 2.25})
    resumed.close()
    assert read_jsonl(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]


def test_flops_per_token_and_mfu_by_hand():
    spec = ModelSpec.from_config(_config())
    assert flops_per_token(spec, S) == _hand_flops_per_token() == 235008
    assert mfu(1000.0, 235008, 989e12) == pytest.approx(1000.0 * 235008 / 989e12)


class _Device:
    def __init__(self, kind):
        self.device_kind = kind


def test_peak_flops_override_and_table():
    assert peak_flops(123e12, _Device("NVIDIA H100 80GB HBM3")) == 123e12
    assert peak_flops(0.0, _Device("NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops(0.0, _Device("NVIDIA A800-SXM4-80GB")) == 312e12
    assert peak_flops(0.0, _Device("cpu")) is None  # no MFU rather than a made-up one


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("metrics") / "run")
    skymoe_jax.train(_config(), workdir)
    return workdir, read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def test_logged_mfu_is_the_formula(run):
    _, records = run
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * _hand_flops_per_token() / (8 * PEAK), rel=1e-9)


def test_logged_alpha_follows_the_logged_drop_rates(run):
    _, records = run
    a = base_config().aux_coef
    alpha = np.full(2, a.initial_alpha)
    for r in records:
        alpha = a.beta * alpha + (1 - a.beta) * np.minimum(a.xi * np.asarray(r["drop_rate"]), a.alpha_max)
        np.testing.assert_allclose(r["alpha"], alpha, rtol=1e-5)
        np.testing.assert_allclose(np.sum(r["expert_load"], axis=1), 1.0, rtol=1e-6)


def test_logged_similarity_matches_the_checkpointed_experts(run):
    workdir, records = run
    assert [r["step"] for r in records if "expert_similarity" in r] == [3, 6]
    model, _ = skymoe_jax.load_model(workdir)  # the step-6 parameters
    experts = model.stacks[1].blocks.layers[0].ffn.experts
    tensors = [np.asarray(w[...]) for w in (experts.w_gate, experts.w_up, experts.w_down)]
    expected = [
        _np_similarity(np.concatenate([t[layer].reshape(E, -1) for t in tensors], axis=1)) for layer in range(2)
    ]
    np.testing.assert_allclose(records[-1]["expert_similarity"], expected, atol=1e-5)


def _tensorboard_scalars(logdir: str) -> dict[tuple[str, int], float]:
    """Every scalar in the event files, as TensorBoard's own loader reads them (it drops a record whose checksum
    does not match, which the tests' expected values then miss)."""
    out = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for event in LegacyEventFileLoader(path).Load():
            for value in event.summary.value:
                out[value.tag, event.step] = value.simple_value
    return out


def test_tensorboard_writer_reads_back_without_tensorflow_or_pytorch(tmp_path):
    # tensorboardX imports PyTorch where it is installed (217 MiB resident), and tensorboard's EventFileWriter
    # TensorFlow; the writer needs neither. An empty stand-in for TensorFlow shows an import where it is not installed.
    (tmp_path / "stand_in" / "tensorflow").mkdir(parents=True)
    (tmp_path / "stand_in" / "tensorflow" / "__init__.py").write_text("")
    logdir = str(tmp_path / "tensorboard")
    script = (
        "import sys\n"
        "from skymoe_jax.metrics.tensorboard import TensorBoardWriter\n"
        f"w = TensorBoardWriter({logdir!r})\n"
        "w.write({'step': 7, 'loss': 2.5, 'drop_rate': [0.25, float('nan')], 'expert_load': [[1.0, 3.0]]})\n"
        "w.write({'step': 300, 'loss': float('inf'), 'eval_loss': 1.875})\n"
        "w.close()\n"
        "print(sorted(m for m in ('torch', 'tensorboardX', 'tensorflow') if m in sys.modules))\n"
    )
    path = os.pathsep.join(p for p in (str(tmp_path / "stand_in"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "[]"
    assert _tensorboard_scalars(logdir) == {
        ("loss", 7): 2.5,
        ("drop_rate/layer_0", 7): 0.25,
        ("drop_rate/mean", 7): 0.25,
        ("expert_load/layer_0/expert_0", 7): 1.0,
        ("expert_load/layer_0/expert_1", 7): 3.0,
        ("eval_loss", 300): 1.875,
    }


def test_tensorboard_events_read_back(run):
    workdir, records = run
    scalars = _tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    for r in records:
        step = r["step"]
        assert scalars["loss", step] == pytest.approx(r["loss"], rel=1e-6)
        assert scalars["mfu", step] == pytest.approx(r["mfu"], rel=1e-6)
        for layer in range(2):
            assert scalars[f"drop_rate/layer_{layer}", step] == pytest.approx(r["drop_rate"][layer], abs=1e-7)
            assert scalars[f"expert_load/layer_{layer}/expert_3", step] == pytest.approx(
                r["expert_load"][layer][3], rel=1e-6
            )
        assert scalars["alpha/mean", step] == pytest.approx(np.mean(r["alpha"]), rel=1e-6)
    assert scalars["eval_loss", 6] == pytest.approx(records[-1]["eval_loss"], rel=1e-6)
    assert scalars["expert_similarity/layer_1", 3] == pytest.approx(records[2]["expert_similarity"][1], abs=1e-7)
    assert ("expert_similarity/layer_1", 2) not in scalars


def test_report_on_the_finished_run(run, capsys):
    workdir, _ = run
    assert main(["report", f"--workdir={workdir}"]) == 0
    out = os.path.join(workdir, "report")
    stems = ["loss", "drop_rate", "alpha", "router_ratios", "max_vio", "expert_load", "expert_similarity"]
    for stem in stems:
        with Image.open(os.path.join(out, f"{stem}.png")) as image:
            assert image.width >= 500 and image.height >= 350, stem
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50, stem  # not blank
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert page.count("data:image/png;base64,") == len(stems)
    assert "| run |" in capsys.readouterr().out


TRACKERS = [name for name in ("wandb", "mlflow") if importlib.util.find_spec(name)]


def _needs(tracker: str):
    return pytest.mark.skipif(
        tracker not in TRACKERS, reason=f"the {tracker} extra is not installed: pip install -e '.[{tracker}]'"
    )


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, run):
    """The `run` fixture's training (the same programs, so the compilation cache has them) logging to the installed
    trackers, offline: a metrics write fails at step 5, after the checkpoint at step 3, and the rerun resumes there.
    Returns the workdir, the config, the JSONL records (steps 1-4, then 4-6 again) and the MLflow run's status after
    the failure."""
    root = tmp_path_factory.mktemp("tracked")
    workdir = str(root / "tracked-run")
    config = _config()
    config.train.checkpoint_every = 3  # run on the host: the programs stay the same
    for tracker in TRACKERS:
        _log_to(config, tracker, root)
    write = JsonlWriter.write

    def disk_full_at_step_5(self, record):
        if record["step"] == 5:
            raise OSError(28, "No space left on device")
        write(self, record)

    status = None
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        with mp.context() as failing:
            failing.setattr(JsonlWriter, "write", disk_full_at_step_5)
            with pytest.raises(RunFailure, match="writing the metrics of step 5 to .*metrics.jsonl failed"):
                skymoe_jax.train(config, workdir)
        if "mlflow" in TRACKERS:
            status = _mlflow(config).get_run(_run_ids(workdir)["mlflow"]).info.status
        skymoe_jax.train(config, workdir)
    return workdir, config, read_jsonl(os.path.join(workdir, "metrics.jsonl")), status


def _log_to(config, tracker: str, root) -> None:
    if tracker == "wandb":
        config.metrics.wandb.update(project="skymoe-tests", tags="ci, resume")
    else:
        config.metrics.mlflow.update(experiment="skymoe-tests", tracking_uri=(root / "mlruns").as_uri())


def _offline(mp: pytest.MonkeyPatch) -> None:
    mp.setenv("WANDB_MODE", "offline")
    # MLflow 3 refuses its file store unless asked: the tests' stand-in for a tracking server.
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _writer(tracker: str):
    if tracker == "wandb":
        from skymoe_jax.metrics.wandb_writer import WandbWriter

        return WandbWriter
    from skymoe_jax.metrics.mlflow_writer import MlflowWriter

    return MlflowWriter


def _run_ids(workdir: str) -> dict[str, str]:
    with open(os.path.join(workdir, "trackers.json"), encoding="utf-8") as f:
        return {tracker: entry["id"] for tracker, entry in json.load(f).items()}


def _mlflow(config):
    from mlflow.tracking import MlflowClient

    return MlflowClient(config.metrics.mlflow.tracking_uri)


def _wandb_records(path: str) -> list:
    """The records of a W&B run file (.wandb): LevelDB's log format (32 KiB blocks of chunks, each with its CRC-32,
    length and kind) after a 7-byte header, each record one `Record` protobuf of wandb's."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = open(path, "rb").read()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a chunk header is padding
            offset += block - offset % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        assert crc == zlib.crc32(bytes([kind]) + chunk), f"bad checksum at {offset} in {path}"
        offset += 7 + length
        pending += chunk
        if kind in (1, 4):  # a whole record, or the last chunk of one
            records.append(Record.FromString(pending))
            pending = b""
    return records


def _wandb_items(items) -> dict:
    """W&B's (key, JSON value) items as a dict, without W&B's own keys (`_step`, `_wandb`); wandb-core writes a key
    as a nested key of one part."""
    pairs = ((item.key or ".".join(item.nested_key), json.loads(item.value_json)) for item in items)
    return {key: value for key, value in pairs if not key.startswith("_")}


def _wandb_parts(workdir: str) -> list[list]:
    """The records of each start of the run (the first start and each resume), in order."""
    parts = [_wandb_records(path) for path in glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "*.wandb"))]
    return sorted(parts, key=lambda part: next(r.run.start_time.ToNanoseconds() for r in part if r.HasField("run")))


@_needs("wandb")
def test_wandb_run_holds_every_record_and_the_config_across_a_resume(tracked):
    workdir, config, records, _ = tracked
    parts = _wandb_parts(workdir)
    assert len(parts) == 2
    runs = [r.run for part in parts for r in part if r.HasField("run")]
    assert {run.run_id for run in runs} == {_run_ids(workdir)["wandb"]}
    assert {(run.project, run.display_name) for run in runs} == {("skymoe-tests", "tracked-run")}
    assert list(runs[0].tags) == ["ci", "resume"]
    history = [
        (r.history.step.num, _wandb_items(r.history.item)) for part in parts for r in part if r.HasField("history")
    ]
    assert [step for step, _ in history] == [r["step"] for r in records] == [1, 2, 3, 4, 4, 5, 6]
    assert [values for _, values in history] == [dict(scalars(r)) for r in records]
    assert "drop_rate/layer_1" in history[0][1] and "expert_similarity/layer_1" in history[2][1]
    assert _wandb_items(runs[0].config.update) == json.loads(json.dumps(dict(flatten(config))))  # tuples as JSON lists
    exits = [r.exit.exit_code for part in parts for r in part if r.HasField("exit")]
    assert exits == [1, 0]  # the failed start, then the resumed one that finished


@_needs("mlflow")
def test_mlflow_run_holds_every_record_and_the_config_across_a_resume(tracked):
    workdir, config, records, failed_status = tracked
    client = _mlflow(config)
    experiment = client.get_experiment_by_name("skymoe-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [_run_ids(workdir)["mlflow"]]
    run = runs[0]
    assert (run.info.run_name, failed_status, run.info.status) == ("tracked-run", "FAILED", "FINISHED")
    expected = [dict(scalars(r)) for r in records]
    for name in set().union(*expected):
        history = client.get_metric_history(run.info.run_id, name)
        want = [(r["step"], values[name]) for r, values in zip(records, expected) if name in values]
        assert [(m.step, m.value) for m in history] == want, name
    assert run.data.params == {key: str(value) for key, value in flatten(config)}


@pytest.mark.parametrize("tracker", [pytest.param(t, marks=_needs(t)) for t in ("wandb", "mlflow")])
def test_tracker_writers_leave_out_non_finite_values(tracker, tmp_path, monkeypatch):
    _offline(monkeypatch)
    config = _config()
    _log_to(config, tracker, tmp_path)
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    writer = _writer(tracker)(config, workdir)
    writer.write({"step": 1, "loss": float("nan"), "eval_loss": 2.0, "drop_rate": [0.5, float("inf")]})
    writer.close()
    if tracker == "wandb":
        [part] = _wandb_parts(workdir)
        logged = [_wandb_items(r.history.item) for r in part if r.HasField("history")]
    else:
        logged = [_mlflow(config).get_run(_run_ids(workdir)["mlflow"]).data.metrics]  # the one step's values
    assert logged == [{"eval_loss": 2.0, "drop_rate/layer_0": 0.5}]


def test_trackers_log_nothing_from_other_processes(tmp_path, monkeypatch):
    if not TRACKERS:
        pytest.skip("neither the wandb nor the mlflow extra is installed: pip install -e '.[wandb,mlflow]'")
    _offline(monkeypatch)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    config = _config()
    workdir = tmp_path / "run"
    workdir.mkdir()
    for tracker in TRACKERS:
        _log_to(config, tracker, tmp_path)
        writer = _writer(tracker)(config, str(workdir))
        writer.write({"step": 1, "loss": 2.5})
        writer.close()
    assert sorted(os.listdir(tmp_path)) == ["run"] and not os.listdir(workdir)  # no W&B files, no MLflow store


@_needs("mlflow")
def test_a_tracker_that_refuses_its_run_stops_the_training_in_one_line(tmp_path, run, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # MLflow 3 then refuses a folder store
    config = _config()
    _log_to(config, "mlflow", tmp_path)
    with pytest.raises(RunFailure) as err:
        skymoe_jax.train(config, str(tmp_path / "run"))
    message = str(err.value)
    assert message.startswith("opening the MLflow run of experiment skymoe-tests failed: The filesystem tracking")
    assert message.endswith("no checkpoint was kept; fix the cause, then run the same command to resume")
    assert "\n" not in message


def test_a_damaged_tracker_runs_file_is_one_sentence(tmp_path):
    from skymoe_jax.errors import CheckpointError
    from skymoe_jax.metrics.trackers import RUNS_FILE, stored_run

    (tmp_path / RUNS_FILE).write_text('{"wandb": {"id": ')
    with pytest.raises(CheckpointError, match=r"trackers.json cannot be read .*; remove it, and the run logs to new"):
        stored_run(str(tmp_path), "wandb", {"project": "p"})
