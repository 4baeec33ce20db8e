"""Issue 12's partner acceptance: a 2048 x 2048 x 128 synthetic volume to a synapse table.

1. The input: `<scratch>/input.zarr` (uint8 EM) and `<scratch>/neurons.zarr`
   (uint64 neuron ids, the segmentation the candidates pair sites on), written
   tile by tile from `synjax.data.synthetic.make_em_volume` (one seeded
   synthetic volume per tile, ids made unique across tiles), never the whole
   volume in memory. Only the tiles a measured region touches are made; a
   record of the finished tiles lets a later call go on.
2. The models: a workdir trained with `configs/demo.py` (or its variant), or
   a copy of one given with `--reuse` (checkpoints and tuned threshold only).
3. The measurement: the own-volume prediction

       python -m synjax.main --config=configs/demo.py --workdir=W --config.mode=predict \
           --config.predict.input=<scratch>/input.zarr --config.predict.output=<out> \
           --config.predict.segmentation=<scratch>/neurons.zarr [--config.predict.roi=...]

   run as a subprocess under `/usr/bin/time -v`, into a fresh output folder
   (nothing resumed): its wall time and peak resident memory, the voxels per
   second, the candidates and kept synapses; JSON into benchmarks/results/.

With `--roi` (repeatable) only those regions are predicted, and the whole
volume's wall time is extrapolated: linearly through the two smallest and
largest regions when two or more are given (fixed start-up cost apart), else
proportionally to the voxels (an upper bound: start-up counted in full).

    .venv/bin/python benchmarks/volume_acceptance_partners.py \
        --reuse /tmp/runs/demo_head --roi 0:32,0:512,0:512 --roi 0:64,0:512,1024
    .venv/bin/python benchmarks/volume_acceptance_partners.py --reuse /tmp/runs/demo_head
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "volume_acceptance_partners.json"
DEMO = REPO_ROOT / "configs" / "demo.py"
RESOLUTION = (40.0, 4.0, 4.0)
# Synapses per voxel of the demo's synthetic volumes: 24 in 32 x 384 x 384.
SYNAPSES_PER_VOXEL = 24 / (32 * 384 * 384)
TIME_FIELDS = {
    "wall": re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)"),
    "max_rss_kb": re.compile(r"Maximum resident set size \(kbytes\): (\d+)"),
    "user_s": re.compile(r"User time \(seconds\): (\S+)"),
    "system_s": re.compile(r"System time \(seconds\): (\S+)"),
}


def _seconds(clock: str) -> float:
    """`h:mm:ss` or `m:ss.ss` of `time -v` in seconds."""
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + float(part)
    return total


def parse_time_v(stderr: str) -> dict:
    """Wall seconds, peak RSS (MiB) and CPU seconds from `/usr/bin/time -v`'s report."""
    found = {key: pattern.search(stderr) for key, pattern in TIME_FIELDS.items()}
    missing = [key for key, match in found.items() if match is None]
    if missing:
        raise RuntimeError(f"/usr/bin/time -v report lacks {missing}:\n{stderr[-2000:]}")
    return {
        "wall_s": _seconds(found["wall"].group(1)),
        "peak_rss_mib": int(found["max_rss_kb"].group(1)) / 1024,
        "cpu_s": float(found["user_s"].group(1)) + float(found["system_s"].group(1)),
    }


def parse_roi(text: str | None, shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from synjax.pipelines.volume_input import parse_roi as parse

    box = parse(text or "", shape)
    return box.start, box.stop


def write_input(scratch: pathlib.Path, shape, tile, region, seed: int) -> dict:
    """Writes the tiles of the synthetic input that meet `region` (start, stop); returns timing."""
    from synjax.data import synthetic
    from synjax.io import create_volume, open_volume

    record_path = scratch / "input_tiles.json"
    # As JSON gives it back (lists), so that an unchanged spec compares equal.
    spec = {"shape": list(shape), "tile": list(tile), "seed": seed, "resolution": list(RESOLUTION)}
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is None or record["spec"] != spec:
        for name in ("input.zarr", "neurons.zarr"):
            shutil.rmtree(scratch / name, ignore_errors=True)
        create_volume(scratch / "input.zarr", shape, np.uint8, RESOLUTION, chunks=(16, 256, 256))
        create_volume(scratch / "neurons.zarr", shape, np.uint64, RESOLUTION, chunks=(16, 128, 128))
        record = {"spec": spec, "done": {}}
    raw = open_volume(str(scratch / "input.zarr"), mode="r+")
    neurons = open_volume(str(scratch / "neurons.zarr"), mode="r+")
    grid = [range(0, s, t) for s, t in zip(shape, tile, strict=True)]
    start, stop = region
    made, seconds = 0, 0.0
    n_synapses = max(1, round(SYNAPSES_PER_VOXEL * int(np.prod(tile))))
    for index, corner in enumerate(np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 3)):
        end = np.minimum(corner + tile, shape)
        if np.any(end <= start) or np.any(corner >= stop) or str(index) in record["done"]:
            continue
        began = time.perf_counter()
        volume = synthetic.make_em_volume(
            shape=tuple(int(n) for n in end - corner),
            resolution=RESOLUTION,
            seed=seed + index,
            n_synapses=n_synapses,
        )
        where = tuple(slice(int(a), int(b)) for a, b in zip(corner, end, strict=True))
        raw[where] = volume.raw
        # Ids unique across tiles: each tile's neurons 1..N shifted past the last tile's.
        ids = volume.neuron_ids.astype(np.uint64)
        ids[ids != 0] += np.uint64(index) << np.uint64(20)
        neurons[where] = ids
        record["done"][str(index)] = int(volume.neuron_ids.max())
        record_path.write_text(json.dumps(record))
        made += 1
        seconds += time.perf_counter() - began
        where_text = tuple(int(c) for c in corner)
        print(f"input tile {index} at {where_text}: {time.perf_counter() - began:.1f} s")
    return {"tiles_made": made, "seconds": seconds, "tiles_done": len(record["done"])}


def prepare_workdir(workdir: pathlib.Path, reuse: str | None, config: str) -> dict:
    """A trained workdir: a copy of `reuse`'s checkpoints and threshold, or trained here."""
    if (workdir / "pruner_threshold.json").exists():
        return {"workdir": str(workdir), "how": "existing"}
    if reuse:
        source = pathlib.Path(reuse)
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source / "checkpoints", workdir / "checkpoints", dirs_exist_ok=True)
        shutil.copy(source / "pruner_threshold.json", workdir / "pruner_threshold.json")
        return {"workdir": str(workdir), "how": f"copied from {source}"}
    command = [sys.executable, "-m", "synjax.main", f"--config={config}"]
    command += [f"--workdir={workdir}", "--config.mode=train"]
    measured = timed(command, workdir.parent / "train.log")
    return {"workdir": str(workdir), "how": f"trained with {config}", "train": measured}


def timed(command: list[str], log: pathlib.Path) -> dict:
    """Runs `command` under `/usr/bin/time -v`; its wall time, peak RSS and CPU time."""
    print("$", " ".join(command), flush=True)
    with open(log, "w") as stream:
        result = subprocess.run(
            ["/usr/bin/time", "-v", *command],
            cwd=REPO_ROOT,
            stdout=stream,
            stderr=subprocess.STDOUT,
            check=False,
        )
    text = log.read_text()
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}; see {log}:\n{text[-3000:]}")
    return parse_time_v(text) | {"command": command, "log": str(log)}


def _rows(path: pathlib.Path) -> int:
    with open(path) as stream:
        return sum(1 for _ in stream) - 1


def measure(args, roi: str | None, workdir: pathlib.Path, config: str) -> dict:
    shape = tuple(args.shape)
    start, stop = parse_roi(roi, shape)
    made = write_input(args.scratch, shape, tuple(args.tile), (start, stop), args.seed)
    span = "_".join(f"{a}-{b}" for a, b in zip(start, stop, strict=True))
    name = "full" if roi is None else f"roi_{span}"
    out = args.scratch / f"out_{name}"
    shutil.rmtree(out, ignore_errors=True)  # measured afresh, nothing resumed
    command = [sys.executable, "-m", "synjax.main", f"--config={config}", f"--workdir={workdir}"]
    command += ["--config.mode=predict", f"--config.predict.input={args.scratch / 'input.zarr'}"]
    command += [f"--config.predict.output={out}"]
    command += [f"--config.predict.segmentation={args.scratch / 'neurons.zarr'}"]
    if roi is not None:
        command.append(f"--config.predict.roi={roi}")
    measured = timed(command, args.scratch / f"predict_{name}.log")
    voxels = int(np.prod(np.subtract(stop, start)))
    row = {
        "region": [list(start), list(stop)],
        "voxels": voxels,
        **{k: v for k, v in measured.items() if k != "log"},
        "voxels_per_s": voxels / measured["wall_s"],
        "candidates": _rows(out / "candidates.csv"),
        "detections": _rows(out / "detections.csv"),
        "synapses": _rows(out / "synapses.csv"),
        "input": made,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "command"}, default=str))
    return row


def extrapolate(rows: list[dict], voxels: int) -> dict:
    """The whole volume's wall time from the measured regions (see module docstring)."""
    rows = sorted(rows, key=lambda r: r["voxels"])
    largest = rows[-1]
    proportional = largest["wall_s"] * voxels / largest["voxels"]
    result = {"proportional_upper_bound_s": proportional}
    if len(rows) >= 2 and rows[-1]["voxels"] > rows[0]["voxels"]:
        slope = (rows[-1]["wall_s"] - rows[0]["wall_s"]) / (rows[-1]["voxels"] - rows[0]["voxels"])
        fixed = rows[0]["wall_s"] - slope * rows[0]["voxels"]
        result |= {"fixed_s": fixed, "s_per_voxel": slope, "linear_s": fixed + slope * voxels}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 2048, 2048))
    parser.add_argument("--tile", type=int, nargs=3, default=(32, 512, 512))
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--roi", action="append", help="z0:z1,y0:y1,x0:x1; repeatable")
    parser.add_argument("--variant", default="", help="config variant, e.g. smoke")
    parser.add_argument("--reuse", help="a trained demo workdir to copy the models of")
    parser.add_argument("--scratch", type=pathlib.Path, default=pathlib.Path("/tmp/pvol_accept"))
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    args.scratch.mkdir(parents=True, exist_ok=True)
    config = f"{DEMO}:{args.variant}" if args.variant else str(DEMO)
    models = prepare_workdir(args.scratch / "workdir", args.reuse, config)
    rows = [
        measure(args, roi, pathlib.Path(models["workdir"]), config) for roi in args.roi or [None]
    ]
    voxels = int(np.prod(args.shape))
    payload = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "shape": list(args.shape),
        "resolution": RESOLUTION,
        "config": config,
        "models": models,
        "runs": rows,
    }
    if args.roi:
        payload["extrapolated_full"] = extrapolate(rows, voxels)
        print("extrapolated to", args.shape, json.dumps(payload["extrapolated_full"]))
    path = args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
