"""Fluorescent synapse instances end to end: 3D Mask R-CNN against a classical baseline.

Chen et al.'s experiment on synthetic two-photon puncta volumes
(`synjax.data.synthetic_fluorescence`; training and test volumes from
different seeds):

train:    the 3D Mask R-CNN on non-overlapping training patches
          (`synjax.stages.mask_rcnn`); the classical baseline (an Ilastik-like
          pixel forest, then a distance-transform watershed) on the same
          volume. Every free parameter is chosen on the training volume: the
          watershed's threshold, h and size filter by grid search, and the
          Mask R-CNN's score threshold among `config.predict.score_thresholds`
          (both by instance F1 at IoU 0.5). They are saved to `chosen.json`.
predict:  both methods on the test volume -> `predictions/mask_rcnn.zarr`
          and `predictions/baseline.zarr` (uint32 instance ids), and
          `instances.csv` (one row per Mask R-CNN instance: id, centroid in nm,
          volume in voxels and um^3, mean raw intensity, score).
evaluate: instance precision / recall / F1 at IoU 0.5 and averaged over IoU
          0.5:0.05:0.95, merges and splits, volume distributions against the
          truth (KL) -> `metrics.json`, `volume_histogram.png`,
          `example_slices.png`.

The test volume is never used to choose anything.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
from absl import logging

from synjax.data.synthetic_fluorescence import make_fluorescence_volume
from synjax.evaluation.distributions import compare_volume_distributions, instance_volumes
from synjax.evaluation.instances import instance_scores, merge_split_errors, overlap_table
from synjax.inference.instances import merge_detections, tied_score_share
from synjax.io import layout, open_volume
from synjax.io.atomic import atomic_open
from synjax.io.instance_table import instance_rows, write_instance_labels, write_instance_table
from synjax.models.pixel_forest import PixelForestSettings, train_or_load_pixel_forest
from synjax.postprocess.instance_watershed import (
    InstanceWatershedGrid,
    InstanceWatershedParams,
    instance_watershed,
    tune_instance_watershed,
)
from synjax.report import files, slices
from synjax.stages import mask_rcnn

OURS, BASELINE = "mask_rcnn", "baseline"
# More than this share of at least this many instances sharing one score is warned about.
TIED_SCORES_SHARE, TIED_SCORES_MIN_INSTANCES = 0.5, 10
# Columns of `instances.csv`.
TABLE_COLUMNS = ("id", "z_nm", "y_nm", "x_nm", "voxels", "volume_um3", "mean_intensity", "score")


def synthetic_volume(config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The `split` ("train" or "test") synthetic volume: (raw image, instance labels)."""
    d = config.data
    return make_fluorescence_volume(
        shape=tuple(d[f"{split}_shape"]),
        resolution=tuple(d.resolution),
        seed=int(d[f"{split}_seed"]),
        density=float(d.density),
        punctum_diameter_nm=tuple(d.punctum_diameter_nm),
        punctum_z_stretch=tuple(d.punctum_z_stretch),
        min_separation=float(d.min_separation),
        psf_fwhm_nm=tuple(d.psf_fwhm_nm),
    )


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    return instance_scores(pred, truth, thresholds=(0.5,)).f1_50


def _forest_settings(config) -> PixelForestSettings:
    b = config.baseline
    return PixelForestSettings(
        n_trees=int(b.n_trees),
        max_depth=int(b.max_depth),
        samples_per_class=int(b.samples_per_class),
        random_state=int(config.seed),
    )


def _train(config, workdir: pathlib.Path) -> dict:
    image, labels = synthetic_volume(config, "train")
    resolution = tuple(config.data.resolution)
    logging.info("training volume %s: %d puncta", image.shape, int(labels.max()))
    chosen: dict = {}

    start = time.perf_counter()
    forest = train_or_load_pixel_forest(
        image, labels, resolution, _forest_settings(config), workdir / "baseline"
    )
    probability = forest.predict(image, resolution)
    b = config.baseline
    grid = InstanceWatershedGrid(
        thresholds=tuple(b.thresholds), hs_nm=tuple(b.hs_nm), min_sizes=tuple(b.min_sizes)
    )
    params, table = tune_instance_watershed(probability, labels, grid, _f1, resolution=resolution)
    chosen[BASELINE] = {
        "threshold": params.threshold,
        "h_nm": params.h_nm,
        "min_size": params.min_size,
        "distance_sigma_nm": params.distance_sigma_nm,
        "train_f1_50": max(row.score for row in table),
        "seconds": time.perf_counter() - start,
    }
    logging.info("baseline chosen on the training volume: %s", chosen[BASELINE])

    start = time.perf_counter()
    trained = mask_rcnn.train_mask_rcnn(config, image, labels, workdir)
    train_seconds = time.perf_counter() - start
    detections = mask_rcnn.detect_volume(config, trained, image)
    scores = {}
    for threshold in config.predict.score_thresholds:
        merged = merge_detections(detections, float(threshold), int(config.predict.min_overlap))
        scores[float(threshold)] = _f1(merged.labels, labels)
    best = max(scores, key=lambda t: (scores[t], t))
    chosen[OURS] = {
        "score_threshold": best,
        "train_f1_50_by_threshold": {str(k): v for k, v in scores.items()},
        "train_seconds": train_seconds,
    }
    logging.info("Mask R-CNN chosen on the training volume: %s", chosen[OURS])
    files.write_json(workdir / layout.CHOSEN_FILE, chosen)
    return chosen


def warn_tied_scores(scores: np.ndarray) -> None:
    """Warns when most of many instances share one score (`tied_score_share`)."""
    share, tied = tied_score_share(scores)
    if scores.size >= TIED_SCORES_MIN_INSTANCES and share > TIED_SCORES_SHARE:
        logging.warning(
            "Mask R-CNN: %.0f%% of the %d instances share the score %.6f: ranking or "
            "thresholding them by score means little (the box head may be inactive for "
            "most ROIs)",
            100 * share,
            scores.size,
            tied,
        )


def _predict(config, workdir: pathlib.Path) -> None:
    chosen = files.read_json(workdir / layout.CHOSEN_FILE)
    image, _ = synthetic_volume(config, "test")
    resolution = tuple(config.data.resolution)
    trained = mask_rcnn.load_mask_rcnn(config, workdir)
    detections = mask_rcnn.detect_volume(config, trained, image)
    ours = merge_detections(
        detections, float(chosen[OURS]["score_threshold"]), int(config.predict.min_overlap)
    )
    logging.info(
        "Mask R-CNN: %d instances from %d detections on %d patches",
        int(ours.labels.max()),
        ours.num_detections,
        detections.num_patches,
    )
    warn_tied_scores(ours.scores)
    write_instance_labels(workdir / layout.MASK_RCNN_INSTANCES, ours.labels, resolution)
    write_instance_table(
        workdir / layout.INSTANCES_TABLE_FILE,
        instance_rows(ours.labels, ours.scores, resolution, image=image),
        TABLE_COLUMNS,
    )

    forest = train_or_load_pixel_forest(
        *synthetic_volume(config, "train"),
        resolution,
        _forest_settings(config),
        workdir / "baseline",
    )
    b = chosen[BASELINE]
    params = InstanceWatershedParams(
        threshold=b["threshold"],
        h_nm=b["h_nm"],
        min_size=b["min_size"],
        distance_sigma_nm=b["distance_sigma_nm"],
    )
    baseline = instance_watershed(forest.predict(image, resolution), resolution, params)
    write_instance_labels(workdir / layout.BASELINE_INSTANCES, baseline, resolution)


def _plot_histogram(path: pathlib.Path, volumes: dict[str, np.ndarray], edges: np.ndarray) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in volumes.items():
        ax.hist(values, bins=edges, histtype="step", label=f"{name} ({values.size})")
    ax.set_xlabel("instance volume (um^3)")
    ax.set_ylabel("instances")
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as stream:
        fig.savefig(stream, format="png", dpi=80)


def _volume_kl(truth: np.ndarray, pred: np.ndarray) -> tuple[float | None, float | None]:
    """(histogram KL, gamma KL) of truth against prediction; None where a gamma cannot be fit.

    A gamma fit needs two distinct volumes: an untrained model may find none.
    """
    if np.unique(truth).size < 2 or np.unique(pred).size < 2:
        return None, None
    comparison = compare_volume_distributions(truth, pred)
    return comparison.histogram_kl, comparison.gamma_kl


def _evaluate(config, workdir: pathlib.Path) -> dict:
    image, truth = synthetic_volume(config, "test")
    resolution = tuple(config.data.resolution)
    voxel_um3 = float(np.prod(resolution)) / 1e9
    predictions = {
        OURS: open_volume(str(workdir / layout.MASK_RCNN_INSTANCES)).read(),
        BASELINE: open_volume(str(workdir / layout.BASELINE_INSTANCES)).read(),
    }
    true_volumes = instance_volumes(truth, voxel_um3)
    metrics: dict = {
        "test_shape": list(truth.shape),
        "resolution_nm": list(resolution),
        "truth_instances": int(true_volumes.size),
        "truth_median_voxels": float(np.median(true_volumes / voxel_um3)),
        "chosen_on_training_volume": files.read_json(workdir / layout.CHOSEN_FILE),
    }
    volumes = {"truth": true_volumes}
    for name, pred in predictions.items():
        table = overlap_table(pred, truth)
        scores = instance_scores(table=table)
        errors = merge_split_errors(table=table)
        volumes[name] = instance_volumes(pred, voxel_um3)
        kl = _volume_kl(true_volumes, volumes[name])
        metrics[name] = {
            "instances": int(volumes[name].size),
            "precision_50": scores.precision_50,
            "recall_50": scores.recall_50,
            "f1_50": scores.f1_50,
            "mean_f1": scores.mean_f1,
            "merges": errors.merges,
            "splits": errors.splits,
            "volume_histogram_kl": kl[0],
            "volume_gamma_kl": kl[1],
        }
        logging.info("%s on the test volume: %s", name, metrics[name])
    every = np.concatenate(list(volumes.values()))
    edges = np.linspace(0.0, max(float(every.max()) if every.size else 1.0, 1e-9), 31)
    _plot_histogram(workdir / layout.VOLUME_HISTOGRAM_FILE, volumes, edges)
    slices.plot_slices(
        image,
        {"truth": truth, OURS: predictions[OURS], BASELINE: predictions[BASELINE]},
        workdir / layout.EXAMPLE_SLICES_FILE,
        slices=np.linspace(0, truth.shape[0] - 1, int(config.evaluation.plot_slices) + 2)[1:-1]
        .astype(int)
        .tolist(),
        title="Fluorescent puncta: truth, 3D Mask R-CNN, pixel forest + watershed",
    )
    files.write_json(workdir / layout.METRICS_FILE, metrics)
    return metrics


def train(config, workdir: pathlib.Path) -> None:
    """Trains the Mask R-CNN and the baseline on the training volume; chooses their parameters."""
    _train(config, pathlib.Path(workdir))


def load_test(config) -> None:
    """The test volume is synthesised where it is used (`synthetic_volume`): nothing to load."""
    return None


def predict(config, workdir: pathlib.Path, test: None) -> None:
    """Instances of the test volume by both methods (zarr volumes and the instance table)."""
    _predict(config, pathlib.Path(workdir))


def evaluate(config, workdir: pathlib.Path, test: None) -> dict:
    """Instance F1, merges and splits, volume distributions of both methods on the test volume."""
    return _evaluate(config, pathlib.Path(workdir))
