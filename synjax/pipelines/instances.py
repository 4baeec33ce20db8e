"""EM synapse instances end to end: the 3D instance network against the two-step baseline.

The experiment of the end-to-end 3D synapse instance network (Expert Syst.
Appl., 2024) on one labelled EM volume cut along y into train, validation
and test slabs (`synjax.pipelines.instance_data`):

train:    the instance network (`synjax.stages.instance_unet`) and the
          baseline segmenter with the same U-Net (`synjax.stages.cleft_segmenter`)
          on crops of the training slab. On the validation slab (never trained
          on; image context from the training slab before it) the network's
          painting (score and mask thresholds, and the use of its semantic
          head: `synjax.inference.instance_blocks.Painting`) and smallest
          fused instance, and the baseline's probability threshold and smallest component are chosen
          by detection F1 (ties: instance F1 at IoU 0.5, then the stricter
          setting) -> `chosen.json`.
predict:  both on the test slab (image context from before it): the network
          block by block with axis-wise fusion (z, then x, then y), the
          baseline as threshold + connected components -> native-grid
          `predictions/instances.zarr` and `predictions/baseline.zarr`
          (uint32), `instances.csv` (one row per synapse: id, centroid in nm, voxels, score) and
          Grad-CAM attention PNGs of the best-scoring detections
          (`attention/`).
evaluate: detection precision / recall / F1 (one-to-one, IoU >= 0.1),
          instance F1 at IoU 0.5 and the CREMI cleft distance score (nm) of
          both methods on the test slab -> `metrics.json`, `example_slices.png`.

The test slab is scored once, with the settings chosen on the validation slab.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
from absl import logging

from synjax.data.intensity import normalize_intensity
from synjax.errors import DataError
from synjax.evaluation.clefts import cremi_cleft_scores, detection_scores
from synjax.evaluation.instances import match_instances, overlap_table
from synjax.inference.instance_blocks import (
    BlockDetections,
    Painting,
    detect_blocks,
    fuse_detections,
)
from synjax.inference.saliency import grad_cam
from synjax.io import layout, open_volume
from synjax.io.instance_table import instance_rows, write_instance_labels, write_instance_table
from synjax.models.instance_unet import build_instance_unet
from synjax.pipelines.instance_data import EMVolume, load_volume, split_rows, upsample
from synjax.postprocess.components import cleft_components, keep_large_instances, tune_components
from synjax.report import files, slices
from synjax.report.attention import plot_attention
from synjax.settings import from_config
from synjax.stages import cleft_segmenter, instance_unet
from synjax.stages.instance_settings import InstancePredictSettings

OURS, BASELINE = "instance_unet", "baseline"
# Columns of `instances.csv`.
TABLE_COLUMNS = ("id", "z_nm", "y_nm", "x_nm", "voxels", "score")
# Instance F1: a prediction and a true synapse match at this IoU (one-to-one).
INSTANCE_IOU = 0.5


def _predict_settings(config) -> InstancePredictSettings:
    return from_config(InstancePredictSettings, config.predict, "config.predict")


def _region(config, volume: EMVolume, split: str) -> tuple[int, int, int]:
    """Read-grid rows (start of the context, start of the slab, end of the slab)."""
    y0, y1 = split_rows(config, volume, split)
    factor = volume.factors[1]
    context = int(_predict_settings(config).context) // factor
    return max(0, y0 // factor - context), y0 // factor, y1 // factor


def _slab(labels_read: np.ndarray, region: tuple[int, int, int], factors) -> np.ndarray:
    """Native-grid labels of the slab from read-grid labels of its region."""
    start, y0, y1 = region
    return upsample(labels_read[:, y0 - start : y1 - start], factors)


def detection_and_instance_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Detection (IoU >= 0.1) and instance (IoU >= 0.5) precision, recall, F1; one-to-one."""
    table = overlap_table(pred, truth)
    detection = detection_scores(pred, truth)
    instance = match_instances(table=table, iou_threshold=INSTANCE_IOU)
    return {
        "instances": int(table.pred_ids.size),
        "true_instances": int(table.true_ids.size),
        "detection_precision": detection.precision,
        "detection_recall": detection.recall,
        "detection_f1": detection.f1,
        "instance_precision_50": instance.precision,
        "instance_recall_50": instance.recall,
        "instance_f1_50": instance.f1,
    }


def _rank(scores: dict) -> tuple[float, float]:
    return scores["detection_f1"], scores["instance_f1_50"]


def _detect(config, trained, volume: EMVolume, region) -> BlockDetections:
    predict = _predict_settings(config)
    start, _, end = region
    image = normalize_intensity(
        volume.image[:, start:end], trained.intensity, "instance network input"
    )
    return detect_blocks(
        instance_unet.block_detector(config, trained.params),
        image,
        predict.block,
        predict.overlap,
        int(predict.batch_size),
    )


def _paintings(predict: InstancePredictSettings) -> list[Painting]:
    """Every painting of the validation grid."""
    return [
        Painting(
            float(score), float(mask), float(mix), bool(rescore), float(predict.min_free_fraction)
        )
        for score in predict.score_thresholds
        for mask in predict.mask_thresholds
        for mix in predict.semantic_mixes
        for rescore in predict.semantic_rescoring
    ]


def chosen_painting(chosen: dict) -> Painting:
    """The painting recorded in `chosen.json` (a file without the semantic keys: none)."""
    return Painting(
        float(chosen["score_threshold"]),
        float(chosen["mask_threshold"]),
        float(chosen.get("semantic_mix", 0.0)),
        bool(chosen.get("semantic_rescore", False)),
        float(chosen.get("min_free_fraction", 0.0)),
    )


def drop_small(labels: np.ndarray, scores: np.ndarray, min_size: int):
    """Fused instances of fewer than `min_size` voxels dropped, the rest renumbered 1..m.

    Args:
      labels: [z, y, x] ids 1..k; scores: [k] score of id i + 1.

    Returns:
      (labels [z, y, x] uint32, scores [m]).
    """
    voxels = np.bincount(labels.ravel(), minlength=scores.size + 1)[1:]
    lookup = keep_large_instances(voxels, min_size)
    return lookup[labels], scores[lookup[1:] > 0]


def _baseline_probability(config, trained, volume: EMVolume, region) -> np.ndarray:
    start, _, end = region
    return cleft_segmenter.predict_probability(config, trained, volume.image[:, start:end])


def _train(config, workdir: pathlib.Path) -> dict:
    volume = load_volume(config)
    factor = volume.factors[1]
    t0, t1 = split_rows(config, volume, "train")
    image = volume.image[:, t0 // factor : t1 // factor]
    labels = volume.read_labels[:, t0 // factor : t1 // factor]
    logging.info(
        "training slab %s (read grid): %d clefts", image.shape, np.unique(labels[labels > 0]).size
    )
    chosen: dict = {}
    start = time.perf_counter()
    network = instance_unet.train_instance_unet(config, image, labels, workdir)
    network_seconds = time.perf_counter() - start
    start = time.perf_counter()
    baseline = cleft_segmenter.train_cleft_segmenter(config, image, labels, workdir)
    baseline_seconds = time.perf_counter() - start

    region = _region(config, volume, "validation")
    v0, v1 = split_rows(config, volume, "validation")
    truth = volume.labels[:, v0:v1]
    predict = _predict_settings(config)
    found = _detect(config, network, volume, region)
    table = []
    for painting in _paintings(predict):
        fused, scores = fuse_detections(found, painting, float(predict.fusion_iou))
        for min_size in predict.min_sizes:
            kept, _ = drop_small(fused, scores, int(min_size))
            result = detection_and_instance_scores(_slab(kept, region, volume.factors), truth)
            table.append((painting, int(min_size), result))
    # Ties: the stricter thresholds and size, then the plainer use of the semantic head.
    best, min_size, result = max(
        table,
        key=lambda row: (
            *_rank(row[2]),
            row[0].score_threshold,
            row[0].mask_threshold,
            row[1],
            -row[0].semantic_mix,
            not row[0].semantic_rescore,
        ),
    )
    chosen[OURS] = {
        **best._asdict(),
        "min_size": min_size,
        "validation": result,
        "grid": [{**p._asdict(), "min_size": m, **r} for p, m, r in table],
        "train_seconds": network_seconds,
    }
    logging.info("instance network chosen on the validation slab: %s", chosen[OURS]["validation"])

    probability = _baseline_probability(config, baseline, volume, region)
    b = cleft_segmenter.baseline_block(config)

    def score_fn(components: np.ndarray) -> float:
        result = detection_and_instance_scores(_slab(components, region, volume.factors), truth)
        # One number for the grid search: detection F1 first, instance F1 breaks ties.
        return result["detection_f1"] + 1e-3 * result["instance_f1_50"]

    choice = tune_components(probability, score_fn, b.thresholds, b.min_sizes)
    components = cleft_components(probability, choice.threshold, choice.min_size)
    chosen[BASELINE] = {
        "threshold": choice.threshold,
        "min_size": choice.min_size,
        "validation": detection_and_instance_scores(
            _slab(components, region, volume.factors), truth
        ),
        "train_seconds": baseline_seconds,
    }
    logging.info("baseline chosen on the validation slab: %s", chosen[BASELINE])
    files.write_json(workdir / layout.CHOSEN_FILE, chosen)
    return chosen


def _renumber(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids present in `labels` renumbered 1..k, with their scores (id i scored scores[i - 1])."""
    present = np.unique(labels)
    present = present[present > 0]
    lookup = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.uint32)
    lookup[present] = np.arange(1, present.size + 1, dtype=np.uint32)
    return lookup[labels], scores[present - 1].astype(np.float32)


def _attention(config, trained, found: BlockDetections, volume: EMVolume, region, workdir, chosen):
    """Grad-CAM PNGs of the best-scoring detections above the chosen score threshold."""
    count = int(config.evaluation.attention_instances)
    start = region[0]
    candidates = [
        (float(score), b, d)
        for b, det in enumerate(found.detections)
        for d, score in enumerate(det["scores"])
        if score > chosen["score_threshold"]
    ]
    candidates.sort(key=lambda c: -c[0])
    model = build_instance_unet(
        instance_unet.network_settings(instance_unet.network_block(config), config.seed)
    )
    predict = _predict_settings(config)
    image = normalize_intensity(
        volume.image[:, start : region[2]], trained.intensity, "instance network input"
    )
    truth = volume.read_labels[:, start : region[2]]
    written = []
    for rank, (score, b, d) in enumerate(candidates[:count], start=1):
        box = found.boxes[b]
        block = np.zeros(tuple(predict.block), np.float32)
        data = image[box.slices()]
        block[tuple(slice(0, n) for n in data.shape)] = data
        det_box = found.detections[b]["boxes"][d]
        heat = grad_cam(model, trained.params, block, det_box[None])[0]
        block_truth = np.zeros(block.shape, truth.dtype)
        block_truth[tuple(slice(0, n) for n in data.shape)] = truth[box.slices()]
        path = workdir / layout.ATTENTION_DIR / f"detection_{rank:02d}.png"
        plot_attention(
            block,
            heat,
            det_box,
            path,
            title=f"detection {rank} (score {score:.3f}), block at read voxel {tuple(box.start)}",
            truth=block_truth,
        )
        written.append(str(path.relative_to(workdir)))
    return written


def _predict(config, workdir: pathlib.Path) -> None:
    chosen = files.read_json(workdir / layout.CHOSEN_FILE)
    volume = load_volume(config)
    region = _region(config, volume, "test")
    y0, _ = split_rows(config, volume, "test")
    predict = _predict_settings(config)
    network = instance_unet.load_instance_unet(config, workdir)
    found = _detect(config, network, volume, region)
    ours = chosen[OURS]
    fused, scores = fuse_detections(found, chosen_painting(ours), float(predict.fusion_iou))
    fused, scores = drop_small(fused, scores, int(ours.get("min_size", 0)))
    labels, scores = _renumber(_slab(fused, region, volume.factors), scores)
    logging.info("instance network: %d synapses on the test slab", int(labels.max()))
    write_instance_labels(workdir / layout.NETWORK_INSTANCES, labels, volume.resolution)
    offset = (0.0, y0 * volume.resolution[1], 0.0)
    write_instance_table(
        workdir / layout.INSTANCES_TABLE_FILE,
        instance_rows(labels, scores, volume.resolution, offset),
        TABLE_COLUMNS,
    )
    _attention(config, network, found, volume, region, workdir, ours)

    baseline = cleft_segmenter.load_cleft_segmenter(config, workdir)
    probability = _baseline_probability(config, baseline, volume, region)
    b = chosen[BASELINE]
    components = cleft_components(probability, b["threshold"], b["min_size"])
    write_instance_labels(
        workdir / layout.BASELINE_INSTANCES,
        _slab(components, region, volume.factors),
        volume.resolution,
    )


def _evaluate(config, workdir: pathlib.Path) -> dict:
    volume = load_volume(config)
    y0, y1 = split_rows(config, volume, "test")
    truth = volume.labels[:, y0:y1]
    raw = volume.raw[:, y0:y1]
    paths = {OURS: layout.NETWORK_INSTANCES, BASELINE: layout.BASELINE_INSTANCES}
    predictions = {name: open_volume(str(workdir / path)).read() for name, path in paths.items()}
    metrics: dict = {
        "test_rows": [y0, y1],
        "test_shape": list(truth.shape),
        "resolution_nm": list(volume.resolution),
        "read_downsample": list(volume.factors),
        "chosen_on_validation_slab": files.read_json(workdir / layout.CHOSEN_FILE),
    }
    for name, pred in predictions.items():
        if pred.shape != truth.shape:
            raise DataError(
                f"{workdir / paths[name]}: shape {pred.shape}; expected the test slab {truth.shape}"
            )
        result = detection_and_instance_scores(pred, truth)
        result.update(cremi_cleft_scores(pred, truth, volume.resolution)._asdict())
        metrics[name] = result
        logging.info("%s on the test slab: %s", name, result)
    weights = np.bincount(np.nonzero(truth)[0], minlength=truth.shape[0])
    slices.plot_slices(
        raw,
        {"truth": truth, OURS: predictions[OURS], BASELINE: predictions[BASELINE]},
        workdir / layout.EXAMPLE_SLICES_FILE,
        slices=slices.pick_slices(truth.shape, int(config.evaluation.plot_slices), weights),
        title="EM clefts (test slab): truth, instance network, U-Net + components",
    )
    files.write_json(workdir / layout.METRICS_FILE, metrics)
    return metrics


def train(config, workdir: pathlib.Path) -> None:
    """Trains both networks on the training slab; chooses their settings on the validation slab."""
    _train(config, pathlib.Path(workdir))


def load_test(config) -> None:
    """The test slab is read where it is used (`load_volume`): nothing to load."""
    return None


def predict(config, workdir: pathlib.Path, test: None) -> None:
    """Synapse instances of the test slab by both methods, the table and attention maps."""
    _predict(config, pathlib.Path(workdir))


def evaluate(config, workdir: pathlib.Path, test: None) -> dict:
    """Detection F1, instance F1 and the CREMI cleft score of both methods on the test slab."""
    return _evaluate(config, pathlib.Path(workdir))
