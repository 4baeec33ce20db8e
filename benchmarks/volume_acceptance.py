r"""Acceptance measurement of issue 12: a 500^3 volume through the neuron pipeline's prediction.

    .venv/bin/python benchmarks/volume_acceptance.py neurons [--size 500] \
        [--config configs/fib25.py:smoke] [--workdir /tmp/synjax_acceptance/fib25_smoke] \
        [--rois 64 128] [--budget-minutes 40] [--full auto|yes|no]

1. The input: a `size`^3 uint8 zarr (10 nm voxels, chunks of 64^3) tiled
   from the FIB-25 medulla volume (`../shared/data/fib-medulla-250.h5`,
   250^3), mirrored at every tile edge so that no seam is a cliff. It is
   written chunk by chunk: only the 250^3 source (16 MB) and one chunk are
   held in memory, never the tiled volume.
2. The model: the run in `--workdir` is reused when it holds trained models
   and tuned parameters (`watershed.json`); otherwise `--config` is trained
   there (`--config.mode=train`; the default, FIB-25's smoke variant, trains
   a tiny DeepEM3D net on a 48 x 48 crop in a minute or two).
3. The measurement: the predict command of a volume of your own,

       python -m synjax.main --config=CONFIG --workdir=RUN --config.mode=predict \
           --config.predict.input=IN --config.predict.output=OUT [--config.predict.roi=...]

   runs as a subprocess under `/usr/bin/time -v` (wall time, peak resident
   memory): first on cubic regions of `--rois` edges at the volume's corner.
   Their times extrapolate to the whole volume in two parts: everything but
   the segmentation on a line `seconds = fixed + per_voxel * voxels`
   (start-up and compilation apart from the per-voxel cost), and the
   segmentation (its time from the run's log) per *flooded* voxel, a block's
   voxels with its halo, of which the whole volume's grid floods more than a
   region of one block does. The extrapolation decides whether the whole
   volume is run (`--full auto`: when it fits in `--budget-minutes`).

Prints a table and writes `benchmarks/results/volume_acceptance_<pipeline>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

FIB25 = REPO_ROOT.parent / "shared" / "data" / "fib-medulla-250.h5"
FIB25_RAW, FIB25_RESOLUTION = "volumes/raw", (10.0, 10.0, 10.0)
CHUNK = 64
DEFAULT_SCRATCH = pathlib.Path("/tmp/synjax_acceptance")
RESULTS = REPO_ROOT / "benchmarks" / "results"
# /usr/bin/time -v lines of the two figures.
_WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")
_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
# The neuron pipeline's log line of its block-wise segmentation (neuron_volume.segment_volume).
_SEGMENTATION = re.compile(r"Segmentation \S+: \d+ labels \(\d+ watershed segments\) in (\S+) s")


def mirrored_indices(start: int, stop: int, period: int) -> np.ndarray:
    """Source indices of tiled positions [start, stop): 0..p-1, p-1..0, 0..p-1, ..."""
    positions = np.arange(start, stop) % (2 * period)
    return np.where(positions < period, positions, 2 * period - 1 - positions)


def build_tiled_input(path: pathlib.Path, size: int) -> pathlib.Path:
    """Writes the `size`^3 mirrored tiling of FIB-25's raw to the zarr `path` (kept if there)."""
    import h5py

    from synjax.io import create_volume, open_volume

    # Written last: a build cut short is not taken for a finished one.
    finished = path.with_name(path.name + ".complete")
    if finished.exists() and tuple(open_volume(str(path)).shape) == (size,) * 3:
        return path
    finished.unlink(missing_ok=True)
    with h5py.File(FIB25, "r") as f:
        source = np.asarray(f[FIB25_RAW])  # 250^3 uint8: 16 MB
    dest = create_volume(
        str(path), (size,) * 3, np.uint8, FIB25_RESOLUTION, chunks=(CHUNK,) * 3, overwrite=True
    )
    for z in range(0, size, CHUNK):
        zi = mirrored_indices(z, min(z + CHUNK, size), source.shape[0])
        slab = source[zi]
        for y in range(0, size, CHUNK):
            yi = mirrored_indices(y, min(y + CHUNK, size), source.shape[1])
            for x in range(0, size, CHUNK):
                xi = mirrored_indices(x, min(x + CHUNK, size), source.shape[2])
                block = slab[:, yi][:, :, xi]
                dest[z : z + len(zi), y : y + len(yi), x : x + len(xi)] = block
    finished.write_text(f"{size}\n")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    env.pop("XLA_FLAGS", None)
    return env


def ensure_trained(config: str, workdir: pathlib.Path) -> dict:
    """Trains `config` into `workdir` unless it holds trained models and tuned parameters."""
    if (workdir / "watershed.json").exists():
        return {"trained_here": False}
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "synjax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.mode=train",
    ]
    subprocess.run(command, cwd=REPO_ROOT, env=_env(), check=True)
    return {"trained_here": True, "train_seconds": time.perf_counter() - start}


def _seconds(text: str) -> float:
    """`h:mm:ss` or `m:ss.ss` -> seconds."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def timed_predict(
    config: str,
    workdir: pathlib.Path,
    source: pathlib.Path,
    output: pathlib.Path,
    roi: str,
    extra: list[str],
) -> dict:
    """Runs the predict command under `/usr/bin/time -v` into a fresh `output`; time and memory."""
    # An earlier run's outputs would be reused (resumed) rather than measured.
    shutil.rmtree(output, ignore_errors=True)
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "synjax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.mode=predict",
        f"--config.predict.input={source}",
        f"--config.predict.output={output}",
        f"--config.predict.roi={roi}",
        "--config.predict.progress=False",
        *extra,
    ]
    load_before = os.getloadavg()[0]
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True)
    log = output.parent / f"{output.name}.log"
    log.write_text(result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"predict failed ({result.returncode}); its log: {log}")
    wall, rss = _WALL.search(result.stderr), _RSS.search(result.stderr)
    return {
        "roi": roi,
        "command": " ".join(command[2:]),
        "wall_seconds": _seconds(wall.group(1)),
        "segmentation_seconds": float(_SEGMENTATION.search(result.stderr).group(1)),
        "peak_rss_gb": int(rss.group(1)) * 1024 / 1e9,
        "log": str(log),
        # Other jobs on the machine inflate the times: the 1-minute load before and after.
        "load_average": [load_before, os.getloadavg()[0]],
    }


def flooded_voxels(shape, block: int, halo: int) -> int:
    """Voxels that the block-wise watershed floods: each block's box grown by `halo`, cut."""
    total = 1
    for size in shape:
        starts = np.arange(0, size, block)
        total *= int(np.sum(np.minimum(starts + block + halo, size) - np.maximum(starts - halo, 0)))
    return total


def fit_line(voxels: list[int], seconds: list[float]) -> tuple[float, float]:
    """(fixed seconds, seconds per voxel) of a least-squares line; one point: no fixed part."""
    if len(voxels) == 1:
        return 0.0, seconds[0] / voxels[0]
    per_voxel, fixed = np.polyfit(np.asarray(voxels, float), np.asarray(seconds, float), 1)
    return float(max(fixed, 0.0)), float(per_voxel)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipeline", choices=["neurons"])
    parser.add_argument("--size", type=int, default=500, help="edge of the cubic input (voxels)")
    parser.add_argument("--config", default="configs/fib25.py:smoke")
    parser.add_argument("--workdir", type=pathlib.Path, default=DEFAULT_SCRATCH / "fib25_smoke")
    parser.add_argument("--scratch", type=pathlib.Path, default=DEFAULT_SCRATCH)
    parser.add_argument("--rois", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--segment-block", type=int, default=128, help="cubic segment_block")
    parser.add_argument("--segment-halo", type=int, default=16)
    parser.add_argument("--budget-minutes", type=float, default=40.0)
    parser.add_argument("--full", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more config overrides of the predict runs, e.g. compilation_cache=/tmp/cache",
    )
    args = parser.parse_args(argv)

    args.scratch.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    source = build_tiled_input(args.scratch / f"fib25_tiled_{args.size}.zarr", args.size)
    build_seconds = time.perf_counter() - start
    training = ensure_trained(args.config, args.workdir)

    block, halo = args.segment_block, args.segment_halo
    extra = [
        f"--config.predict.segment_block=({block},{block},{block})",
        f"--config.predict.segment_halo={halo}",
        *(f"--config.{setting}" for setting in args.set),
    ]
    rows = []
    for edge in args.rois:
        roi = f"0:{edge},0:{edge},0:{edge}"
        output = args.scratch / f"roi_{edge}"
        rows.append(
            timed_predict(args.config, args.workdir, source, output, roi, extra)
            | {"voxels": edge**3, "flooded_voxels": flooded_voxels((edge,) * 3, block, halo)}
        )
    fixed, per_voxel = fit_line(
        [r["voxels"] for r in rows], [r["wall_seconds"] - r["segmentation_seconds"] for r in rows]
    )
    per_flooded = sum(r["segmentation_seconds"] for r in rows) / sum(
        r["flooded_voxels"] for r in rows
    )
    whole_voxels = args.size**3
    whole_flooded = flooded_voxels((args.size,) * 3, block, halo)
    predicted = fixed + per_voxel * whole_voxels + per_flooded * whole_flooded
    run_full = args.full == "yes" or (args.full == "auto" and predicted <= args.budget_minutes * 60)
    if run_full:
        full_output = args.scratch / f"full_{args.size}"
        rows.append(
            timed_predict(args.config, args.workdir, source, full_output, "", extra)
            | {"voxels": whole_voxels, "flooded_voxels": whole_flooded}
        )
    for row in rows:
        print(
            f"{row['roi'] or 'whole volume':>24}  {row['voxels']:>11,d} voxels  "
            f"{row['wall_seconds']:8.1f} s (segmentation {row['segmentation_seconds']:.1f} s)  "
            f"peak RSS {row['peak_rss_gb']:.2f} GB"
        )
    print(
        f"fit: {fixed:.1f} s + {per_voxel * 1e6:.3f} s per million voxels + segmentation "
        f"{per_flooded * 1e6:.3f} s per million flooded voxels; {args.size}^3 predicted "
        f"{predicted / 60:.1f} min ({'run' if run_full else 'not run: over budget or --full=no'})"
    )
    payload = {
        "pipeline": args.pipeline,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "config": args.config,
        "workdir": str(args.workdir),
        "input": {"path": str(source), "shape": [args.size] * 3, "tiled_from": str(FIB25)},
        "input_build_seconds": build_seconds,
        **training,
        "segment_block": block,
        "segment_halo": halo,
        "overrides": args.set,
        "runs": rows,
        "fit": {
            "fixed_seconds": fixed,
            "seconds_per_voxel": per_voxel,
            "segmentation_seconds_per_flooded_voxel": per_flooded,
            "whole_flooded_voxels": whole_flooded,
        },
        "predicted_whole_seconds": predicted,
        "whole_run": run_full,
    }
    out = args.out or RESULTS / f"volume_acceptance_{args.pipeline}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
