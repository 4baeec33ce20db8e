"""Benchmark of the detection ops: jit-compiled NMS against NumPy, and ROIAlign.

NMS (`synjax.detection.nms`, tiled greedy NMS in one XLA program) on 1k, 10k
and 30k boxes, against two NumPy greedy NMS written here and run in the same
process on the same boxes:

- "numpy_plain": a Python loop over the boxes by score, each checked against
  the boxes kept so far with one vectorised IoU;
- "numpy_vectorised": the classic loop over kept boxes, each suppressing all
  remaining boxes in one vectorised step.

All three must keep exactly the same boxes (checked). The boxes imitate
proposals around synapses: 200 objects (sides 2-12 voxels) in a 32x96x96
patch, each candidate a jittered copy of an object with a random score. Two
settings: the paper's final NMS (IoU 0.2, no cap on the outputs) and an RPN's
(IoU 0.7, at most 2000 outputs). JAX times are steady-state after an
ahead-of-time compile (compile time reported apart); NumPy has no warm-up.

ROIAlign (`synjax.detection.roi_align`) at a box-head and a mask-head size,
boxes gathered 64 at a time (`lax.map`) and all at once (`vmap`).

Run from the repository root (a few minutes on a 2-core CPU):

    .venv/bin/python benchmarks/bench_detection.py [--repeats 5] [--numpy-repeats 2]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import numpy as np

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common

from synjax.detection.nms import nms
from synjax.detection.roi_align import roi_align

SEED = 0
PATCH = np.array([32, 96, 96])  # z, y, x voxels: Chen et al.'s 96x96x32 (x-y-z) patch
NUM_OBJECTS = 200
SIZES = (1000, 10000, 30000)
# (name, IoU threshold, max_outputs or None for "as many as there are boxes")
NMS_SETTINGS = (("final", 0.2, None), ("rpn", 0.7, 2000))
# (name, features [z, y, x, c], boxes, output size, spatial scale (z, y, x))
ROI_CASES = (
    ("box head", (16, 24, 24, 64), 256, (7, 7, 7), (0.5, 0.25, 0.25)),
    ("mask head", (32, 48, 48, 32), 64, (14, 14, 14), (1.0, 0.5, 0.5)),
)
SAMPLING_RATIO = 2
NMS_COLUMNS = ("setting", "boxes", "kept", "impl", "compile_s", "step_s", "min_s", "speedup")
ROI_COLUMNS = ("case", "impl", "compile_s", "step_s", "min_s", "boxes_per_s")


def proposal_like_boxes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[n, 6] float32 boxes jittered around NUM_OBJECTS objects, and [n] scores."""
    centres = rng.uniform(0, 1, (NUM_OBJECTS, 3)) * PATCH
    sizes = rng.uniform(2, 12, (NUM_OBJECTS, 3))
    obj = rng.integers(0, NUM_OBJECTS, n)
    centre = centres[obj] + rng.normal(0, 0.2, (n, 3)) * sizes[obj]
    size = sizes[obj] * np.exp(rng.normal(0, 0.2, (n, 3)))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32)


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of `boxes`, float32, volumes without +1."""
    sides = np.clip(np.minimum(box[3:], boxes[:, 3:]) - np.maximum(box[:3], boxes[:, :3]), 0, None)
    inter = sides[:, 0] * sides[:, 1] * sides[:, 2]
    vol = np.prod(np.clip(box[3:] - box[:3], 0, None))
    vols = np.prod(np.clip(boxes[:, 3:] - boxes[:, :3], 0, None), axis=1)
    union = vol + vols - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def numpy_plain_nms(boxes, scores, threshold, max_outputs):
    """Greedy NMS, one box at a time against the kept boxes."""
    kept = np.empty((max_outputs, 6), np.float32)
    indices = []
    for i in np.argsort(-scores, kind="stable"):
        if len(indices) == max_outputs:
            break
        k = len(indices)
        if k == 0 or not np.any(_iou_one_to_many(boxes[i], kept[:k]) > threshold):
            kept[k] = boxes[i]
            indices.append(int(i))
    return indices


def numpy_vectorised_nms(boxes, scores, threshold, max_outputs):
    """Greedy NMS, each kept box suppressing all remaining boxes at once."""
    order = np.argsort(-scores, kind="stable")
    indices = []
    while order.size and len(indices) < max_outputs:
        best, rest = order[0], order[1:]
        indices.append(int(best))
        order = rest[_iou_one_to_many(boxes[best], boxes[rest]) <= threshold]
    return indices


def _time_numpy(call, repeats: int) -> tuple[list[int], common.Timing]:
    """(result of the last call, timing of `repeats` calls); NumPy needs no warm-up."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return result, common.Timing(times)


def bench_nms(repeats: int, numpy_repeats: int, sizes=SIZES) -> list[dict]:
    rng = np.random.default_rng(SEED)
    rows = []
    for n in sizes:
        boxes, scores = proposal_like_boxes(n, rng)
        for setting, threshold, cap in NMS_SETTINGS:
            max_outputs = cap or n
            jitted = jax.jit(lambda b, s, t=threshold, m=max_outputs: nms(b, s, t, m))
            compiled, compile_s = common.compile_jax(jitted, boxes, scores)
            jax_timing = common.time_calls(functools.partial(compiled, boxes, scores), repeats)
            indices, valid = compiled(boxes, scores)
            jax_kept = [int(i) for i in np.asarray(indices)[np.asarray(valid)]]
            results = {"jax_nms": (jax_kept, jax_timing, compile_s)}
            for name, fn in (
                ("numpy_plain", numpy_plain_nms),
                ("numpy_vectorised", numpy_vectorised_nms),
            ):
                kept, timing = _time_numpy(
                    functools.partial(fn, boxes, scores, threshold, max_outputs), numpy_repeats
                )
                results[name] = (kept, timing, None)
            reference = results["numpy_plain"][0]
            best_numpy = min(results[k][1].median for k in ("numpy_plain", "numpy_vectorised"))
            for impl, (kept, timing, compile_s) in results.items():
                if kept != reference:
                    raise AssertionError(
                        f"{impl} kept other boxes than numpy_plain ({setting}, {n})"
                    )
                rows.append(
                    {
                        "flops": common.flops(compiled) if impl == "jax_nms" else None,
                        "setting": f"{setting} iou>{threshold} max {max_outputs}",
                        "boxes": n,
                        "kept": len(kept),
                        "impl": impl,
                        "compile_s": compile_s,
                        "step_s": timing.median,
                        "min_s": timing.min,
                        "mean_s": timing.mean,
                        "repeats": len(timing.times),
                        "speedup": best_numpy / timing.median,
                    }
                )
            print(f"nms {setting} {n}: jax {jax_timing.median:.4f} s", file=sys.stderr, flush=True)
    return rows


def bench_roi_align(repeats: int, cases=ROI_CASES) -> list[dict]:
    rng = np.random.default_rng(SEED)
    rows = []
    for case, shape, count, output, scale in cases:
        features = rng.normal(size=shape).astype(np.float32)
        input_size = np.array(shape[:3]) / np.array(scale)
        lo = rng.uniform(0, 0.8, (count, 3)) * input_size
        hi = lo + rng.uniform(2, 16, (count, 3))
        boxes = np.concatenate([lo, hi], axis=1).astype(np.float32)
        for impl, step in (("lax.map 64", 64), ("vmap all", None)):
            jitted = jax.jit(
                lambda f, b, s=step, o=output, sc=scale: roi_align(
                    f, b, o, sc, SAMPLING_RATIO, boxes_per_step=s
                )
            )
            compiled, compile_s = common.compile_jax(jitted, features, boxes)
            timing = common.time_calls(functools.partial(compiled, features, boxes), repeats)
            rows.append(
                {
                    "flops": common.flops(compiled),
                    "case": f"{case} {count} boxes {'x'.join(map(str, output))} from "
                    f"{'x'.join(map(str, shape))}",
                    "impl": impl,
                    "compile_s": compile_s,
                    "step_s": timing.median,
                    "min_s": timing.min,
                    "mean_s": timing.mean,
                    "repeats": len(timing.times),
                    "boxes_per_s": count / timing.median,
                }
            )
            print(f"roi_align {case} {impl}: {timing.median:.4f} s", file=sys.stderr, flush=True)
    return rows


def acceptance(rows: list[dict]) -> dict:
    """Whether jit NMS beats the best NumPy version at 30k boxes, per setting."""
    verdict = {}
    for setting in {r["setting"] for r in rows if r["boxes"] == max(SIZES)}:
        case = {
            r["impl"]: r["step_s"]
            for r in rows
            if r["setting"] == setting and r["boxes"] == max(SIZES)
        }
        best = min(case["numpy_plain"], case["numpy_vectorised"])
        verdict[setting] = {
            "jax_s": case["jax_nms"],
            "best_numpy_s": best,
            "jax_faster": case["jax_nms"] < best,
        }
    return verdict


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed JAX calls per case")
    parser.add_argument("--numpy-repeats", type=int, default=2, help="timed NumPy calls per case")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "bench_detection.json"),
    )
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    nms_rows = bench_nms(args.repeats, args.numpy_repeats)
    roi_rows = bench_roi_align(args.repeats)
    verdict = acceptance(nms_rows)

    print("NMS (speedup: best NumPy median / this median):")
    print(common.format_table(nms_rows, NMS_COLUMNS))
    print("\nROIAlign, trilinear, sampling ratio 2:")
    print(common.format_table(roi_rows, ROI_COLUMNS))
    print("\nAcceptance (30k boxes, jit NMS faster than the best NumPy):")
    for setting, v in sorted(verdict.items()):
        print(
            f"  {setting}: jax {v['jax_s']:.4f} s, best numpy {v['best_numpy_s']:.4f} s, "
            f"faster: {v['jax_faster']}"
        )
    path = common.write_json(
        args.out,
        {
            "environment": common.environment(),
            "note": (
                "run on a shared machine (2 CPU cores, several other jobs running): absolute "
                "times are noisy; the JAX and NumPy figures of one case come from the same run "
                "and the same boxes"
            ),
            "load_average_before_after": [load_before, os.getloadavg()],
            "repeats": {"jax": args.repeats, "numpy": args.numpy_repeats},
            "boxes": {
                "patch_zyx": PATCH.tolist(),
                "objects": NUM_OBJECTS,
                "description": "jittered copies of objects with sides 2-12 voxels, random scores",
            },
            "nms": nms_rows,
            "nms_acceptance_30k": verdict,
            "roi_align": roi_rows,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
