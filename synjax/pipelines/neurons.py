"""Dense neuron segmentation end to end (DeepEM3D, Zeng, Wu, Ji, Bioinformatics 2017).

train:    boundary labels of the training part -> an ensemble of DeepEM3D-Nets
          (`synjax.stages.BoundaryEnsembleStage`); then the ensemble's
          boundary map of the tuning part (a z range of the training data)
          picks the watershed's sigma
          and h, and the threshold of the mean-boundary agglomeration that
          follows it, by grid search; the classical baseline (inverted raw
          intensity, watershed only) picks its sigma and h the same way; both
          are saved to `watershed.json`.
predict:  ensemble boundary map of the test part (TTA, max over models) ->
          `predictions/boundaries.zarr`; 3D watershed and agglomeration with
          the saved parameters -> `predictions/segmentation.zarr` (uint64;
          the watershed before agglomeration: `predictions/watershed.zarr`).
With `config.predict.input`, predict writes the ensemble's boundary map
          of that volume, of any size, slab by slab into `config.predict.output`
          (`neuron_volume.py`).
evaluate: adapted Rand error (precision, recall) and VOI (split, merge) of
          ours and of two baselines (the stored over-segmentation, the tuned
          classical watershed) on the test part -> `metrics.json`,
          `example_slices.png`.

The test part is never used to choose anything. `watershed.json` records the
checkpoints (step, parameter hash) whose boundary maps it was tuned on;
prediction refuses it for other checkpoints.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
from absl import logging

from synjax.errors import DataError
from synjax.evaluation.rand_voi import adapted_rand_error
from synjax.evaluation.segmentation_scores import segmentation_scores
from synjax.io import create_volume, layout, open_volume
from synjax.io.layout import BOUNDARIES, SEGMENTATION, WATERSHED_FILE, WATERSHED_ONLY
from synjax.io.provenance import describe_model, differences, input_fingerprint
from synjax.pipelines import neuron_data
from synjax.postprocess.agglomeration import agglomerate
from synjax.postprocess.watershed import grid_search, segment
from synjax.report import files, slices
from synjax.stages.boundary_models import BoundaryEnsembleStage
from synjax.train.checkpoint import checkpoint_provenance

OURS, OVERSEG, CLASSICAL = "deepem3d", "oversegmentation", "classical_watershed"
# Our watershed before agglomeration, scored too so the report shows what merging adds.
OURS_WATERSHED_ONLY = "deepem3d_watershed_only"


def _tune(boundary: np.ndarray, gt: np.ndarray, block) -> dict:
    """Grid search of (sigma, h[, agglomeration threshold]) on one tuning-part map."""
    start = time.perf_counter()
    thresholds = tuple(block.get("thresholds") or ())
    _, _, table = grid_search(
        boundary,
        gt,
        block.sigmas,
        block.hs,
        metric=adapted_rand_error,
        thresholds=thresholds,
        smoothing=block.smoothing,
    )
    best = min(table, key=lambda row: row.score)
    logging.info(
        "Watershed tuned: sigma %.2f, h %.3f, agglomeration threshold %s (tuning ARE %.4f)",
        best.sigma,
        best.h,
        best.threshold,
        best.score,
    )
    return {
        "sigma": best.sigma,
        "h": best.h,
        "threshold": best.threshold,
        "tuning_are": best.score,
        "table": [row._asdict() for row in table],
        "seconds": time.perf_counter() - start,
    }


def _models(config, workdir: pathlib.Path) -> list[dict]:
    """Provenance (name, step, parameter hash) of every model's newest checkpoint."""
    return [checkpoint_provenance(workdir, m["name"]) for m in config.models]


def _read_tuned(config, workdir: pathlib.Path) -> dict:
    """`watershed.json`, checked to be tuned on the boundary maps of the models in `workdir`.

    Raises:
      DataError: it is absent, records no models, or was tuned for other
        checkpoints (e.g. a model trained further since).
    """
    path = workdir / WATERSHED_FILE
    if not path.exists():
        raise DataError(f"{path} is absent: run the neuron pipeline's train mode first")
    tuned = files.read_json(path)
    recorded = (tuned.get("provenance") or {}).get("models")
    if recorded is None:
        raise DataError(f"{path} records no model provenance; retrain (mode=train)")
    current = _models(config, workdir)
    if differences(recorded, current):
        raise DataError(
            f"{path} was tuned for "
            + ", ".join(describe_model(m) for m in recorded)
            + "; the checkpoints are now "
            + ", ".join(describe_model(m) for m in current)
            + "; retrain (mode=train)"
        )
    return tuned


def train(config, workdir: pathlib.Path) -> None:
    """Trains the ensemble on the training part; tunes both watersheds on the tuning part."""
    training = neuron_data.load_part(config, "train")
    if training.neuron_ids is None:
        raise DataError(
            f"config.data.train_path={config.data.train_path!r}: no {config.data.labels_key}"
        )
    ensemble = BoundaryEnsembleStage.from_config(config)
    ensemble.train(training.raw, training.neuron_ids, workdir)
    tune = neuron_data.load_part(config, "tune")
    boundary = ensemble.predict(workdir, tune.raw, slice_lists=False)
    files.write_json(
        workdir / WATERSHED_FILE,
        {
            OURS: _tune(boundary, tune.neuron_ids, config.watershed),
            CLASSICAL: _tune(
                neuron_data.inverted_intensity(tune.raw),
                tune.neuron_ids,
                config.baseline,
            ),
            # What the parameters were tuned on; prediction refuses other models.
            "provenance": {
                "models": _models(config, workdir),
                "input": input_fingerprint(
                    tune.raw, path=config.data.train_path, dataset=config.data.raw_key
                ),
            },
        },
    )


def _write(path: pathlib.Path, array: np.ndarray, resolution) -> None:
    dest = create_volume(str(path), array.shape, array.dtype, resolution=resolution, overwrite=True)
    dest[...] = array


def _segment(config, workdir: pathlib.Path, raw: np.ndarray, apply_fns=None):
    """Segmentation of `raw` with the trained ensemble and tuned watershed.

    Returns:
      `(segmentation, watershed_only, boundary)`: uint64 `[z, y, x]` after
      agglomeration, uint64 before it (the same array when the tuned
      threshold is None), float32 boundary map.
    """
    chosen = _read_tuned(config, workdir)[OURS]
    ensemble = BoundaryEnsembleStage.from_config(config)
    boundary = ensemble.predict(workdir, np.asarray(raw), apply_fns)
    return (*_segment_boundary(config, boundary, chosen), boundary)


def _segment_boundary(config, boundary: np.ndarray, chosen: dict) -> tuple:
    """(agglomerated, watershed-only) uint64 segmentations of a boundary map.

    `chosen` is a tuning result (`_tune`): sigma, h and threshold (None: no
    agglomeration, both are the same array).
    """
    over = segment(boundary, chosen["sigma"], chosen["h"], smoothing=config.watershed.smoothing)
    threshold = chosen.get("threshold")
    seg = over if threshold is None else agglomerate(over, boundary, threshold)
    return seg.astype(np.uint64), over.astype(np.uint64)


def segment_with_trained_models(config, workdir, raw: np.ndarray, apply_fns=None) -> np.ndarray:
    """Neuron segmentation of `raw` with the ensemble and watershed trained in `workdir`.

    For other pipelines (e.g. the partner pipeline's candidate segments).

    Args:
      config: the neuron pipeline's config (its `models`, `train.patch_yx`,
        `predict`, `watershed`).
      workdir: run folder with `checkpoints/<model>` and `watershed.json`.
      raw: `[z, y, x]` uint8 EM of any size (y, x are padded internally).
      apply_fns: optional already-loaded model functions
        (`BoundaryEnsembleStage.load`), to load the checkpoints once.

    Returns:
      uint64 `[z, y, x]` segment ids, 1..n.
    """
    return _segment(config, pathlib.Path(workdir), raw, apply_fns)[0]


def load_test(config) -> neuron_data.NeuronVolume:
    """The test part that predict and evaluate read."""
    return neuron_data.load_part(config, "test")


def predict(config, workdir: pathlib.Path, test: neuron_data.NeuronVolume) -> np.ndarray:
    """Segments the test part; writes its boundary map and segmentations."""
    start = time.perf_counter()
    seg, over, boundary = _segment(config, workdir, test.raw)
    _write(workdir / BOUNDARIES, boundary, test.resolution)
    _write(workdir / WATERSHED_ONLY, over, test.resolution)
    _write(workdir / SEGMENTATION, seg, test.resolution)
    logging.info(
        "Test part %s: %d segments in %.0f s",
        test.raw.shape,
        len(np.unique(seg)),
        time.perf_counter() - start,
    )
    return seg


def _scores(seg, gt) -> dict:
    """The scores of `seg` against `gt` (arrays or volumes), counted block by block.

    The one path of every neuron score: the test part here and a volume of
    one's own (`neuron_volume.score_volume`) alike.
    """
    return segmentation_scores(seg, gt)


def evaluate(config, workdir: pathlib.Path, test: neuron_data.NeuronVolume) -> dict:
    """Scores ours and both baselines on the test part; writes the metrics and slices."""
    if test.neuron_ids is None:
        logging.warning(
            "Test part has no labels (%s): scoring skipped",
            neuron_data.missing_labels(config, "test"),
        )
        return {}
    seg = open_volume(str(workdir / SEGMENTATION))
    over = open_volume(str(workdir / WATERSHED_ONLY))
    chosen = files.read_json(workdir / WATERSHED_FILE)
    classical = chosen[CLASSICAL]
    baseline = segment(
        neuron_data.inverted_intensity(test.raw),
        classical["sigma"],
        classical["h"],
        smoothing=config.baseline.smoothing,
    )
    results = {
        OURS: _scores(seg, test.neuron_ids),
        OURS_WATERSHED_ONLY: _scores(over, test.neuron_ids),
        CLASSICAL: _scores(baseline, test.neuron_ids),
    }
    if test.oversegmentation is not None:
        results[OVERSEG] = _scores(test.oversegmentation, test.neuron_ids)
    metrics = {
        **results,
        "watershed": {k: chosen[k]["sigma"] for k in (OURS, CLASSICAL)}
        | {f"{k}_h": chosen[k]["h"] for k in (OURS, CLASSICAL)}
        | {f"{OURS}_threshold": chosen[OURS].get("threshold")},
        "test_shape": list(test.raw.shape),
        "models": [m["name"] for m in config.models],
        "tta_transforms": config.predict.tta_transforms if config.predict.tta else 1,
    }
    files.write_json(workdir / layout.METRICS_FILE, metrics)
    slices.plot_slices(
        test.raw,
        {
            "DeepEM3D segmentation": seg.read(),
            "classical watershed": baseline,
            "ground truth": test.neuron_ids,
        },
        workdir / layout.EXAMPLE_SLICES_FILE,
        slices.pick_slices(test.raw.shape, count=config.evaluation.plot_slices),
        title="test part: segmentations",
    )
    for name, values in results.items():
        logging.info(
            "Test %s: adapted Rand error %.4f (P %.4f R %.4f), VOI split %.4f merge %.4f",
            name,
            values["adapted_rand_error"],
            values["rand_precision"],
            values["rand_recall"],
            values["voi_split"],
            values["voi_merge"],
        )
    return metrics


def train_segmenter(config, workdir, raw: np.ndarray, neuron_ids: np.ndarray) -> np.ndarray:
    """Trains the ensemble on one volume and tunes its watershed on that volume.

    For pipelines that need a segmentation of volumes of their own (the
    partner demo), with no separate tuning part: the watershed's sigma and h
    (and agglomeration threshold, if `config.watershed.thresholds`) are
    picked on the training volume's boundary map, which is cleaner than an
    unseen volume's, so the choice leans towards fewer seeds than ideal.

    Args:
      config: the neuron config (its `models`, `train`, `predict`, `watershed`).
      workdir: run folder; writes `checkpoints/<model>` and `watershed.json`.
      raw: `[z, y, x]` uint8 EM.
      neuron_ids: `[z, y, x]` dense ground-truth labels of `raw`.

    Returns:
      uint64 `[z, y, x]` segmentation of `raw` with the tuned parameters (the
      boundary map is predicted once, for tuning and for this).
    """
    workdir = pathlib.Path(workdir)
    ensemble = BoundaryEnsembleStage.from_config(config)
    ensemble.train(raw, neuron_ids, workdir)
    boundary = ensemble.predict(workdir, raw, slice_lists=False)
    chosen = _tune(boundary, neuron_ids, config.watershed)
    files.write_json(
        workdir / WATERSHED_FILE,
        {
            OURS: chosen,
            "provenance": {"models": _models(config, workdir), "input": input_fingerprint(raw)},
        },
    )
    return _segment_boundary(config, boundary, chosen)[0]
