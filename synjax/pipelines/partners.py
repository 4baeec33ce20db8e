"""Synaptic partner detection end to end (Parag et al., MICCAI 2018).

train:    signed-proximity targets -> U-Net -> proximity of the training
          volume -> candidates -> labels -> pruning CNN; the pruner's score
          threshold is chosen on the training volume (never on the test one).
predict:  proximity of the test volume (block-wise, resumable zarr) ->
          candidates on the segmentation -> pruner scores -> synapse table.
evaluate: CREMI partner metric and the paper's criterion at the chosen
          threshold, precision-recall over all thresholds, plots.

Workdir outputs: `checkpoints/`, `predictions/*.zarr`, `detections.csv`
(candidates left after duplicate suppression, with pruner scores),
`synapses.csv` and `synapses.h5` (CREMI annotations) of the kept ones,
`pruner_threshold.json`, `metrics.json`, `precision_recall.png`,
`example_slices.png`.

Nothing stale is reused: the proximity outputs' manifests record the U-Net
(checkpoint step, parameter hash) and the input (path, shape, dtype, content
fingerprint) and are predicted afresh when either changed
(`config.predict.resume`); `pruner_threshold.json` records the models it was
chosen with, and predict refuses it for others.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import logging

from synjax.errors import ConfigError, DataError
from synjax.evaluation import partners as partner_metrics
from synjax.evaluation.rand_voi import adapted_rand_error
from synjax.io import CremiVolume, SynapseTable, create_volume, open_volume, write_cremi
from synjax.io.cremi import RAW
from synjax.io.provenance import describe_model, differences, input_fingerprint, model_provenance
from synjax.pipelines import neurons, partner_data, proximity, pruner
from synjax.pipelines.partner_data import PartnerVolume
from synjax.postprocess.candidates import Candidates, generate_candidates
from synjax.postprocess.partner_nms import suppress_duplicates
from synjax.postprocess.pruning_windows import label_candidates
from synjax.report import files, slices
from synjax.train import checkpoint

THRESHOLD_FILE = "pruner_threshold.json"
DETECTIONS_FILE = "detections.csv"


def _segmentation(
    config, workdir: pathlib.Path, volume: PartnerVolume, predicted: np.ndarray | None = None
) -> np.ndarray:
    """The neuron segmentation candidates are built on.

    "groundtruth" is the volume's own neuron_ids; "predicted" is the DeepEM3D
    ensemble and watershed of `config.neurons`, trained in this workdir on
    the training volume (see `_train_segmenter`), or `predicted` when given
    (the training volume's, made while tuning). A predicted segmentation is
    written to `predictions/<volume>_segmentation.zarr`.
    """
    source = config.segmentation.source
    if source == "groundtruth":
        return volume.neuron_ids
    if source == "predicted":
        seg = predicted
        if seg is None:
            seg = neurons.segment_with_trained_models(config.neurons, workdir, volume.raw)
        path = workdir / "predictions" / f"{volume.name}_segmentation.zarr"
        out = create_volume(str(path), seg.shape, np.uint64, volume.resolution, overwrite=True)
        out[...] = seg
        logging.info(
            "%s volume: predicted segmentation with %d segments", volume.name, len(np.unique(seg))
        )
        return seg
    raise ConfigError(
        f"config.segmentation.source={source!r}; expected 'groundtruth' or 'predicted'"
    )


def _train_segmenter(config, workdir: pathlib.Path, volume: PartnerVolume) -> np.ndarray | None:
    """Trains the neuron segmentation that "predicted" candidates are built on.

    Returns:
      The training volume's predicted segmentation, or None for "groundtruth".
    """
    if config.segmentation.source != "predicted":
        return None
    return neurons.train_segmenter(config.neurons, workdir, volume.raw, volume.neuron_ids)


def _candidates(config, prox: np.ndarray, segmentation: np.ndarray, volume) -> Candidates:
    c = config.candidates
    found = generate_candidates(
        prox, segmentation, volume.resolution, tau=c.tau, omega=c.omega, max_gap_nm=c.max_gap_nm
    )
    logging.info("%s volume: %d candidates", volume.name, len(found))
    return found


def _in_truth_ids(pairs: partner_metrics.PartnerPairs, volume) -> partner_metrics.PartnerPairs:
    """Pairs whose ids are the ground-truth neurons under their pre and post sites.

    As in the CREMI challenge, a detection is judged by where it points: its
    own ids belong to the segmentation it was built on (a predicted one need
    not share the ground truth's ids).
    """
    ids = [
        partner_metrics.segment_ids_at(loc, volume.neuron_ids, volume.resolution)
        for loc in (pairs.pre_locations, pairs.post_locations)
    ]
    return partner_metrics.PartnerPairs(
        *ids, pairs.pre_locations, pairs.post_locations, pairs.scores
    )


def _pairs(candidates: Candidates, scores: np.ndarray, volume) -> partner_metrics.PartnerPairs:
    pairs = partner_metrics.PartnerPairs.from_candidates(
        candidates, volume.resolution, scores=scores
    )
    return _in_truth_ids(pairs, volume)


def _best_of_duplicates(config, candidates: Candidates, scores: np.ndarray):
    """Candidates and scores left after NMS of same-pair duplicates."""
    keep = suppress_duplicates(
        candidates.pre_segment,
        candidates.post_segment,
        candidates.location,
        scores,
        config.candidates.nms_radius_nm,
    )
    return candidates.select(keep), scores[keep]


def _curve(pairs: partner_metrics.PartnerPairs, truth, config):
    distance = config.evaluation.cremi_distance_nm

    def at(threshold: float):
        return partner_metrics.cremi_partner_scores(
            pairs.select(pairs.scores >= threshold), truth, distance
        )

    # Threshold 0 keeps every candidate: the curve's "no pruning" end.
    thresholds = np.unique(np.concatenate([[0.0], pairs.scores]))
    return partner_metrics.precision_recall_curve(pairs.scores, at, thresholds)


def _input_source(config, name: str) -> dict:
    """Where the `name` volume's raw was read from (None for generated volumes).

    Keyword arguments of `proximity.predict_proximity`, recorded with outputs.
    """
    if config.data.source == "cremi":
        return {"input_path": config.data[f"{name}_path"], "input_dataset": RAW}
    return {"input_path": None, "input_dataset": None}


def _model(workdir: pathlib.Path, name: str, params) -> dict:
    """Provenance of a model's parameters: their newest checkpoint's step and their hash."""
    return model_provenance(name, checkpoint.latest_step(workdir, name), params)


def _read_threshold(workdir: pathlib.Path) -> dict:
    """The saved pruner threshold choice (`THRESHOLD_FILE`)."""
    path = workdir / THRESHOLD_FILE
    if not path.exists():
        raise DataError(f"{path} is absent: run the partner pipeline's train mode first")
    return files.read_json(path)


def _check_threshold(workdir: pathlib.Path, choice: dict, unet: dict, pruner_params) -> None:
    """Checks that the saved threshold was chosen with the models in use.

    Args:
      choice: the content of `THRESHOLD_FILE`.
      unet: provenance of the U-Net parameters in use (`_model`).
      pruner_params: the pruner's parameters in use (None when the threshold
        applies to proximity scores).

    Raises:
      DataError: it was chosen with other parameters (e.g. a training run
        killed after the U-Net was trained further), or records none.
    """
    path = workdir / THRESHOLD_FILE
    recorded = choice.get("provenance")
    if recorded is None:
        raise DataError(f"{path} records no model provenance; retrain (mode=train)")
    current = {
        "proximity": unet,
        "pruner": None
        if pruner_params is None
        else _model(workdir, pruner.MODEL_NAME, pruner_params),
    }
    models = {key: recorded.get(key) for key in current}
    if differences(models, current):
        raise DataError(
            f"{path} was chosen for "
            + ", ".join(describe_model(m) for m in models.values() if m)
            + "; the checkpoints are now "
            + ", ".join(describe_model(m) for m in current.values() if m)
            + "; retrain (mode=train)"
        )


def _train(config, workdir: pathlib.Path, volume: PartnerVolume) -> None:
    targets = partner_data.proximity_targets(volume, config)
    params = proximity.train_unet(config, [targets], workdir)
    unet = _model(workdir, proximity.MODEL_NAME, params)
    source = _input_source(config, "train")
    prox = proximity.predict_proximity(
        config,
        params,
        volume.raw,
        workdir / "predictions" / "train_proximity.zarr",
        volume.resolution,
        step=unet["step"],
        **source,
    )
    predicted = _train_segmenter(config, workdir, volume)
    segmentation = _segmentation(config, workdir, volume, predicted)
    candidates = _candidates(config, prox, segmentation, volume)
    labels = label_candidates(
        candidates,
        segmentation,
        volume.neuron_ids,
        volume.truth,
        volume.resolution,
        config.pruner.label_distance_nm,
    )
    if len(candidates) == 0 or labels.all() or not labels.any():
        # Nothing to tell apart (e.g. a very short run): rank candidates by
        # their proximity score instead of a pruner, and say so.
        logging.warning(
            "Pruner not trained: %d training candidates, %d positive; using proximity scores",
            len(candidates),
            int(labels.sum()),
        )
        scores, use_pruner, pruner_model = candidates.score, False, None
    else:
        pruner_params = pruner.train_pruner(
            config, volume.raw, prox, segmentation, candidates, labels, workdir
        )
        scores = pruner.score_candidates(
            config, pruner_params, volume.raw, prox, segmentation, candidates
        )
        use_pruner, pruner_model = True, _model(workdir, pruner.MODEL_NAME, pruner_params)
    candidates, scores = _best_of_duplicates(config, candidates, scores)
    threshold, train_fscore = 0.0, 0.0
    if len(candidates):
        curve = _curve(_pairs(candidates, scores, volume), volume.truth, config)
        threshold, train_fscore = curve.best_threshold, curve.best_fscore
    files.write_json(
        workdir / THRESHOLD_FILE,
        {
            "pruner": use_pruner,
            "threshold": threshold,
            "train_fscore": train_fscore,
            "train_candidates": len(candidates),
            "train_positive_candidates": int(labels.sum()),
            # What the threshold was chosen with; `_predict` refuses other models.
            "provenance": {
                "proximity": unet,
                "pruner": pruner_model,
                "input": input_fingerprint(
                    volume.raw, path=source["input_path"], dataset=source["input_dataset"]
                ),
            },
        },
    )
    logging.info("Score threshold %.3f (training F %.3f)", threshold, train_fscore)


def _predict(config, workdir: pathlib.Path, volume: PartnerVolume) -> SynapseTable:
    params = proximity.load_unet_params(config, workdir)
    unet = _model(workdir, proximity.MODEL_NAME, params)
    # Checked before the long prediction: a threshold chosen for other models is an error.
    choice = _read_threshold(workdir)
    pruner_params = pruner.load_pruner_params(config, workdir) if choice["pruner"] else None
    _check_threshold(workdir, choice, unet, pruner_params)
    prox = proximity.predict_proximity(
        config,
        params,
        volume.raw,
        workdir / "predictions" / "proximity.zarr",
        volume.resolution,
        step=unet["step"],
        **_input_source(config, "test"),
    )
    segmentation = _segmentation(config, workdir, volume)
    candidates = _candidates(config, prox, segmentation, volume)
    scores = candidates.score
    if choice["pruner"] and len(candidates):
        scores = pruner.score_candidates(
            config, pruner_params, volume.raw, prox, segmentation, candidates
        )
    candidates, scores = _best_of_duplicates(config, candidates, scores)
    res = np.asarray(volume.resolution)
    table = SynapseTable.build(
        candidates.pre_segment,
        candidates.post_segment,
        candidates.location,
        pre_location=candidates.pre_point * res,
        post_location=candidates.post_point * res,
        score=scores,
        size=candidates.pre_overlap + candidates.post_overlap,
        kind="partner",
    )
    table.to_csv(workdir / DETECTIONS_FILE)
    threshold = choice["threshold"]
    kept = table.filter_by_score(threshold)
    kept.to_csv(workdir / "synapses.csv")
    if len(kept):
        write_cremi(
            workdir / "synapses.h5",
            CremiVolume(raw=None, resolution=volume.resolution, annotations=kept.to_annotations()),
            overwrite=True,
        )
    slices.plot_slices(
        volume.raw,
        {"proximity": prox, "clefts (truth)": volume.clefts},
        workdir / "example_slices.png",
        slices.pick_slices(volume.raw.shape, weights=(volume.clefts > 0).sum(axis=(1, 2))),
        title="test volume: predicted signed proximity (red pre, blue post)",
    )
    logging.info("Kept %d of %d candidates (score >= %.3f)", len(kept), len(table), threshold)
    return table


def _evaluate(config, workdir: pathlib.Path, volume: PartnerVolume) -> dict:
    table = SynapseTable.from_csv(workdir / DETECTIONS_FILE)
    threshold = files.read_json(workdir / THRESHOLD_FILE)["threshold"]
    pairs = _in_truth_ids(
        partner_metrics.PartnerPairs(
            table.pre_segment,
            table.post_segment,
            table.pre_location,
            table.post_location,
            table.score,
        ),
        volume,
    )
    kept = pairs.select(pairs.scores >= threshold)
    cremi = partner_metrics.cremi_partner_scores(
        kept, volume.truth, config.evaluation.cremi_distance_nm
    )
    paper = partner_metrics.paper_partner_scores(
        kept, volume.truth, config.evaluation.paper_distance_nm
    )
    unpruned = partner_metrics.cremi_partner_scores(
        pairs, volume.truth, config.evaluation.cremi_distance_nm
    )
    curve = _curve(pairs, volume.truth, config)
    partner_metrics.plot_precision_recall(
        curve, workdir / "precision_recall.png", "test volume, CREMI partner metric"
    )

    def scores(s):
        return {k: getattr(s, k) for k in ("tp", "fp", "fn", "precision", "recall", "fscore")} | {
            "reversed": s.reversed
        }

    metrics = {
        "pruner_threshold": threshold,
        "cremi_partners": scores(cremi),
        "paper_criterion": scores(paper),
        "without_pruning": scores(unpruned),
        "best_fscore_over_thresholds": curve.best_fscore,
        "truth_pairs": len(volume.truth),
        "truth_polyadic_synapses": volume.n_polyadic,
        "candidates": len(pairs),
    }
    seg_path = workdir / "predictions" / "test_segmentation.zarr"
    if config.segmentation.source == "predicted" and seg_path.exists():
        rand = adapted_rand_error(open_volume(str(seg_path)).read(), volume.neuron_ids)
        metrics["segmentation_adapted_rand"] = {
            "error": rand.error,
            "precision": rand.precision,
            "recall": rand.recall,
        }
    files.write_json(workdir / "metrics.json", metrics)
    logging.info(
        "Test partners: CREMI F %.3f (P %.3f R %.3f), paper F %.3f, unpruned F %.3f",
        cremi.fscore,
        cremi.precision,
        cremi.recall,
        paper.fscore,
        unpruned.fscore,
    )
    return metrics


def run(config, workdir: pathlib.Path) -> dict:
    """Runs the partner pipeline's `config.mode` phases in `workdir`."""
    mode = config.mode
    metrics: dict = {}
    if mode in ("train", "all"):
        _train(config, workdir, partner_data.load_volume(config, "train"))
    if mode in ("predict", "evaluate", "all"):
        test = partner_data.load_volume(config, "test")
        if mode in ("predict", "all"):
            _predict(config, workdir, test)
        if mode in ("evaluate", "all"):
            metrics = _evaluate(config, workdir, test)
    return metrics
