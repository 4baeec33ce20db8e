"""Benchmark of the classical watershed and the Rand/VOI metrics on real FIB-SEM data.

Run from the repository root:

    .venv/bin/python benchmarks/bench_segmentation.py \
        [--data ../shared/data/fib-medulla-250.h5] \
        [--out benchmarks/results/bench_segmentation.json] [--repeats 3]

On `fib-medulla-250.h5` (250^3 voxels, 10 nm isotropic) it times

- `synjax.postprocess.watershed.segment` on the raw intensity, inverted and
  scaled to [0, 1], sigma 1.5 voxels, h 0.25, split into smoothing, H-minima
  and flooding, and against the alternative flooding of
  `scipy.ndimage.watershed_ift` (and `mahotas.cwatershed` when installed);
- mean-boundary agglomeration (`synjax.postprocess.agglomeration`) of a
  shallow watershed (h 0.05) of the same map: region graph and one merge pass;
- the adapted Rand error and VOI of the shipped over-segmentation against
  `neuron_ids`, ours against scikit-image's;

and scores, on the test part z >= 150, the shipped over-segmentation and the
watershed with 2D (per-slice) and 3D smoothing, run on the test part alone and
on the whole volume then cropped. It prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import cc3d
import h5py
import numpy as np
from scipy import ndimage
from skimage import metrics as skm
from skimage.morphology import h_minima
from skimage.segmentation import watershed

from synjax.evaluation.rand_voi import adapted_rand_error, variation_of_information
from synjax.postprocess.agglomeration import agglomerate, region_graph
from synjax.postprocess.watershed import (
    FACE_CONNECTIVITY,
    QUANT_MAX,
    segment,
    smooth_and_quantise,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "fib-medulla-250.h5"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "bench_segmentation.json"
SIGMA = 1.5  # voxels
H = 0.25  # fraction of the [0, 1] range
TEST_Z_START = 150  # the test part is z >= 150
SHALLOW_H = 0.05  # over-segmenting watershed that agglomeration starts from
AGGLOMERATION_THRESHOLD = 0.5  # mean boundary value below which regions merge


def _best_time(fn, repeats: int):
    """Returns (result of the last call, fastest wall time in seconds)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def _load(path: pathlib.Path):
    with h5py.File(path, "r") as f:
        raw = f["volumes/raw"][:]
        gt = f["volumes/labels/neuron_ids"][:]
        overseg = f["volumes/labels/oversegmentation"][:]
    # Membranes are dark in EM: invert so that boundaries are high, in [0, 1].
    low, high = float(raw.min()), float(raw.max())
    inverted = (high - raw.astype(np.float64)) / (high - low)
    return inverted, gt, overseg


def bench_watershed(image: np.ndarray, gt: np.ndarray, repeats: int) -> dict:
    """Times the watershed stages and the alternative flooding implementations."""
    levels, t_smooth = _best_time(lambda: smooth_and_quantise(image, SIGMA, "2d"), repeats)
    depth = np.uint16(round(H * QUANT_MAX))
    seeds, t_hmin = _best_time(
        lambda: h_minima(levels, depth, footprint=FACE_CONNECTIVITY), repeats
    )
    markers = cc3d.connected_components(seeds.astype(bool), connectivity=6)
    floods = {
        "skimage.watershed": lambda: watershed(levels, markers, connectivity=1),
        "scipy.ndimage.watershed_ift": lambda: ndimage.watershed_ift(
            levels, markers.astype(np.int32), structure=FACE_CONNECTIVITY
        ),
    }
    try:
        import mahotas

        floods["mahotas.cwatershed"] = lambda: mahotas.cwatershed(
            levels, markers.astype(np.int32), Bc=FACE_CONNECTIVITY
        )
    except ImportError:
        pass
    test = np.s_[TEST_Z_START:]
    rows = {}
    for name, fn in floods.items():
        labels, seconds = _best_time(fn, repeats)
        rows[name] = {
            "seconds": seconds,
            "are_test_part": adapted_rand_error(labels[test], gt[test]).error,
        }
    _, t_total = _best_time(lambda: segment(image, SIGMA, H), repeats)
    return {
        "shape": list(image.shape),
        "num_seeds": int(markers.max()),
        "smooth_seconds": t_smooth,
        "h_minima_seconds": t_hmin,
        "segment_total_seconds": t_total,
        "flooding": rows,
    }


def bench_agglomeration(image: np.ndarray, repeats: int) -> dict:
    """Times the region graph and one merge pass on a shallow watershed of `image`."""
    over = segment(image, SIGMA, SHALLOW_H)
    rag, t_graph = _best_time(lambda: region_graph(over, image), repeats)
    merged, t_merge = _best_time(
        lambda: agglomerate(over, image, AGGLOMERATION_THRESHOLD, rag), repeats
    )
    return {
        "h": SHALLOW_H,
        "threshold": AGGLOMERATION_THRESHOLD,
        "regions": int(rag.number_of_nodes()),
        "contacts": int(rag.number_of_edges()),
        "regions_after": int(len(np.unique(merged))),
        "graph_seconds": t_graph,
        "merge_seconds": t_merge,
    }


def bench_metrics(seg: np.ndarray, gt: np.ndarray, repeats: int) -> dict:
    """Times our metrics and scikit-image's on the same pair of volumes."""
    ours_are, t_ours_are = _best_time(lambda: adapted_rand_error(seg, gt), repeats)
    sk_are, t_sk_are = _best_time(lambda: skm.adapted_rand_error(gt, seg), repeats)
    ours_voi, t_ours_voi = _best_time(lambda: variation_of_information(seg, gt), repeats)
    sk_voi, t_sk_voi = _best_time(
        lambda: skm.variation_of_information(gt, seg, ignore_labels=[0]), repeats
    )
    return {
        "adapted_rand": {
            "ours_seconds": t_ours_are,
            "skimage_seconds": t_sk_are,
            "ours": list(ours_are),
            "skimage": [float(v) for v in sk_are],
        },
        "voi": {
            "ours_seconds": t_ours_voi,
            "skimage_seconds": t_sk_voi,
            "ours": list(ours_voi),
            "skimage": [float(v) for v in sk_voi],
        },
    }


def score_test_part(image: np.ndarray, gt: np.ndarray, overseg: np.ndarray) -> dict:
    """Adapted Rand error on z >= 150 of the shipped and watershed segmentations."""
    test = np.s_[TEST_Z_START:]
    scores = {"shipped_oversegmentation": adapted_rand_error(overseg[test], gt[test]).error}
    for smoothing in ("2d", "3d"):
        on_test = segment(image[test], SIGMA, H, smoothing=smoothing)
        scores[f"watershed_{smoothing}_on_test_part"] = adapted_rand_error(on_test, gt[test]).error
        on_full = segment(image, SIGMA, H, smoothing=smoothing)
        scores[f"watershed_{smoothing}_on_full_then_cropped"] = adapted_rand_error(
            on_full[test], gt[test]
        ).error
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    image, gt, overseg = _load(args.data)
    results = {
        "data": str(args.data),
        "machine": platform.platform(),
        "sigma_voxels": SIGMA,
        "h": H,
        "metrics": bench_metrics(overseg, gt, args.repeats),
        "watershed": bench_watershed(image, gt, args.repeats),
        "agglomeration": bench_agglomeration(image, args.repeats),
        "are_test_part": score_test_part(image, gt, overseg),
    }

    m, w = results["metrics"], results["watershed"]
    print(f"{'what (250^3)':<58}{'seconds':>10}")
    print(f"{'adapted Rand, ours':<58}{m['adapted_rand']['ours_seconds']:>10.3f}")
    print(f"{'adapted Rand, skimage':<58}{m['adapted_rand']['skimage_seconds']:>10.3f}")
    print(f"{'VOI, ours':<58}{m['voi']['ours_seconds']:>10.3f}")
    print(f"{'VOI, skimage':<58}{m['voi']['skimage_seconds']:>10.3f}")
    print(f"{'watershed: 2D smoothing + quantise':<58}{w['smooth_seconds']:>10.3f}")
    print(f"{'watershed: h_minima':<58}{w['h_minima_seconds']:>10.3f}")
    for name, row in w["flooding"].items():
        label = f"flood {name} (ARE z>=150 {row['are_test_part']:.3f})"
        print(f"{label:<58}{row['seconds']:>10.3f}")
    print(f"{'watershed: segment() total':<58}{w['segment_total_seconds']:>10.3f}")
    a = results["agglomeration"]
    graph_label = f"agglomeration: region graph ({a['regions']} regions, {a['contacts']} contacts)"
    print(f"{graph_label:<58}{a['graph_seconds']:>10.3f}")
    merge_label = f"agglomeration: merge at {a['threshold']} (-> {a['regions_after']} regions)"
    print(f"{merge_label:<58}{a['merge_seconds']:>10.3f}")
    print(f"\n{'adapted Rand error on z >= 150':<58}{'error':>10}")
    for name, error in results["are_test_part"].items():
        print(f"{name:<58}{error:>10.4f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
