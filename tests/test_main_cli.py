"""The command line: the demo's smoke variant end to end, and bad-input errors.

Each run is a subprocess, as a user would start it, on one CPU device.
"""

import json
import pathlib
import subprocess

import pytest

from tests.conftest import REPO_ROOT, run_main

DEMO = str(REPO_ROOT / "configs" / "demo.py")


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_main(*args, timeout=timeout)


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a bad input writes to stderr (a traceback fails the test).

    Config and flag problems are found before anything is logged, so the
    error is all that stderr holds.
    """
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("synjax: error: "), lines[0]
    return lines[0]


def test_smoke_variant_runs_the_whole_partner_pipeline(tmp_path: pathlib.Path):
    workdir = tmp_path / "smoke"
    result = _run(f"--config={DEMO}:smoke", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for name in ("metrics.json", "detections.csv", "synapses.csv", "pruner_threshold.json"):
        assert (workdir / name).is_file(), name
    assert (workdir / "predictions" / "proximity.zarr").is_dir()
    assert any((workdir / "checkpoints" / "proximity").iterdir())
    assert (workdir / "precision_recall.png").stat().st_size > 0
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["truth_pairs"] > 0
    assert 0.0 <= metrics["cremi_partners"]["fscore"] <= 1.0
    # Metrics count every ground-truth pair once: matched or missed.
    cremi = metrics["cremi_partners"]
    assert cremi["tp"] + cremi["fn"] == metrics["truth_pairs"]
    # The neuroglancer state shows the test raw, the proximity and every kept synapse.
    state = json.loads((workdir / "neuroglancer_state.json").read_text())
    layers = {layer["name"]: layer for layer in state["layers"]}
    assert layers["raw"]["source"]["url"].endswith("/predictions/raw.zarr")
    assert layers["proximity"]["source"]["url"].endswith("/predictions/proximity.zarr")
    kept = (workdir / "synapses.csv").read_text().splitlines()[1:]
    assert len(layers["synapses"]["annotations"]) == len(kept)


def test_smoke_variant_on_a_predicted_segmentation(tmp_path: pathlib.Path):
    # Candidates on a DeepEM3D segmentation (watershed + agglomeration) trained
    # in the same run, in place of the ground truth.
    workdir = tmp_path / "predicted"
    result = _run(
        f"--config={DEMO}:smoke", "--config.segmentation.source=predicted", f"--workdir={workdir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    chosen = json.loads((workdir / "watershed.json").read_text())["deepem3d"]
    assert chosen["threshold"] == 0.5
    for volume in ("train", "test"):
        assert (workdir / "predictions" / f"{volume}_segmentation.zarr").is_dir(), volume
    assert any((workdir / "checkpoints").iterdir())
    assert json.loads((workdir / "metrics.json").read_text())["truth_pairs"] > 0


def test_missing_config_file_is_one_line(tmp_path):
    result = _run("--config=configs/no_such_config.py", f"--workdir={tmp_path}")
    assert result.returncode != 0
    line = _error_line(result)
    assert "no_such_config.py" in line and "does not exist" in line


def test_unknown_config_key_names_it(tmp_path):
    result = _run(f"--config={DEMO}:smoke", "--config.train.no_such_key=3", f"--workdir={tmp_path}")
    assert result.returncode != 0
    assert "no_such_key" in _error_line(result)


def test_unknown_variant_lists_the_known_ones(tmp_path):
    result = _run(f"--config={DEMO}:nonsense", f"--workdir={tmp_path}")
    assert result.returncode != 0
    assert "nonsense" in result.stderr and "smoke" in result.stderr
    line = _error_line(result)
    assert "unknown variant 'nonsense'" in line and "smoke" in line


def test_workdir_that_is_a_file(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    result = _run(f"--config={DEMO}:smoke", f"--workdir={target}")
    assert result.returncode != 0
    line = _error_line(result)
    assert "a_file" in line and "is a file" in line


def test_dataset_path_that_does_not_exist(tmp_path):
    result = _run(
        f"--config={DEMO}:smoke",
        "--config.data.source=cremi",
        "--config.data.train_path=/no/such/sample_A.h5",
        f"--workdir={tmp_path / 'w'}",
    )
    assert result.returncode != 0
    line = _error_line(result)
    assert "config.data.train_path" in line and "/no/such/sample_A.h5" in line


def test_bad_mode_lists_the_modes(tmp_path):
    result = _run(f"--config={DEMO}:smoke", "--config.mode=dance", f"--workdir={tmp_path / 'w'}")
    assert result.returncode != 0
    line = _error_line(result)
    assert "config.mode" in line and "train" in line


@pytest.mark.parametrize("override", ["--config.train.steps=abc"])
def test_override_of_the_wrong_type(tmp_path, override):
    result = _run(f"--config={DEMO}:smoke", override, f"--workdir={tmp_path / 'w'}")
    assert result.returncode != 0
    assert "config.train.steps" in _error_line(result)
