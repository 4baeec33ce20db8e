"""The partner pipeline with a trained pruner, through train, predict and evaluate.

The smoke variant's 8-step U-Net finds no candidates, so its CLI test never
trains a pruner or loads one back. Here the U-Net's prediction is replaced by
the true signed-proximity target of each volume, which gives candidates on
both volumes: the pruner is trained, its threshold chosen, and predict loads
the pruner from its checkpoint (a path no other test takes end to end).
"""

import importlib.util
import pathlib

import numpy as np

from synjax import pipelines
from synjax.io import SynapseTable, create_volume
from synjax.pipelines import partner_data
from synjax.report import files
from synjax.stages.proximity import ProximityStage
from synjax.stages.pruner import PrunerStage

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _smoke_config():
    spec = importlib.util.spec_from_file_location("config_demo", CONFIGS / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    # The U-Net's training still runs (its parameters are recorded) but its
    # prediction is replaced; the pruner's is the one that matters here.
    config.pruner.train.steps = 4
    # The test process has several host devices; one keeps the small batches whole.
    config.train.num_devices = 1
    config.pruner.train.num_devices = 1
    return config


def test_predict_loads_the_trained_pruner(tmp_path, monkeypatch):
    config = _smoke_config()
    volumes = {}
    real_load = partner_data.load_volume

    def load_volume(config, split):
        volumes[split] = real_load(config, split)
        return volumes[split]

    def true_proximity(stage, trained, raw, dest_path, resolution, **kwargs):
        volume = next(v for v in volumes.values() if v.raw is raw)
        target = partner_data.proximity_targets(volume, config)["target"]
        out = create_volume(str(dest_path), raw.shape, np.float32, resolution, overwrite=True)
        out[...] = target
        return target

    loads = []
    real_load_pruner = PrunerStage.load

    def load_pruner(stage, workdir):
        loads.append(workdir)
        return real_load_pruner(stage, workdir)

    monkeypatch.setattr(partner_data, "load_volume", load_volume)
    monkeypatch.setattr(ProximityStage, "predict", true_proximity)
    monkeypatch.setattr(PrunerStage, "load", load_pruner)

    metrics = pipelines.run(config, tmp_path)

    choice = files.read_json(tmp_path / "pruner_threshold.json")
    assert choice["pruner"] is True and choice["train_positive_candidates"] > 0
    assert loads == [tmp_path]
    candidates = SynapseTable.from_csv(tmp_path / "candidates.csv")
    assert len(candidates) > 0 and np.all((candidates.score >= 0) & (candidates.score <= 1))
    assert metrics["candidates"] == len(candidates)
    assert (tmp_path / "metrics.json").exists()
