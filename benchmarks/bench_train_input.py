"""Benchmark of the demo U-Net's training input and of its cold start.

Training (the demo config's proximity U-Net, its patches and batch size, on
the demo's synthetic training volume), in steps per second:

- `data`: sampling the host batches alone (`PatchSampler.batch`);
- `step`: the compiled train step alone, on one batch already on the device;
- `loop`: `synjax.train.loop.train` itself, with `config.train.prefetch` 0
  (each batch sampled after the previous step was dispatched) and > 0
  (sampled ahead in a background thread). Its rate is the mean over the
  logged intervals after the first (which holds the compilation); each log
  fetches the metrics, as a real run does. The runs alternate (0, N, 0, N).

Cold start (`--cold-start`): import -> first prediction of the demo U-Net on
one prediction block, each in a fresh Python process, with the parameters
initialised eagerly (`model.init`), jitted with threefry (the default), or
jitted with "unsafe_rbg"; persistent compilation cache off, cold (an empty
folder) and warm (the folder the cold run filled).

Run (2-core CPU, a few minutes):

  .venv/bin/python benchmarks/bench_train_input.py --steps 12 --repeats 2 --cold-start
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

START = time.perf_counter()  # before the heavy imports: the cold start's origin

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = "benchmarks/results/bench_train_input.json"
# Parameter initialisation of the cold start: eager, or jitted with a PRNG implementation.
INIT_MODES = {
    "eager": "threefry2x32",
    "jit_threefry": "threefry2x32",
    "jit_unsafe_rbg": "unsafe_rbg",
}
CACHE_MODES = ("off", "cold", "warm")
LOOP_COLUMNS = ("measure", "prefetch", "steps_per_s", "s_per_step", "runs")
COLD_COLUMNS = (
    "init",
    "cache",
    "import_s",
    "init_s",
    "first_prediction_s",
    "total_s",
    "total_cpu_s",
)


def _demo_config():
    spec = importlib.util.spec_from_file_location("demo_config", REPO_ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# --- training input ------------------------------------------------------------


def _training_setup(config):
    from synjax.pipelines import partner_data
    from synjax.stages.proximity import ProximityStage

    stage = ProximityStage.from_config(config)
    targets = partner_data.proximity_targets(partner_data.load_volume(config, "train"), config)
    intensity = stage.intensity.fit([targets["raw"]], name="benchmark raw")
    sampler = stage.patch_sampler([targets], intensity)
    batch_size = stage.training.batch_size
    return stage, lambda step: sampler.batch(step, batch_size)


def _rate_data(batch_fn, steps: int) -> float:
    batch_fn(0)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch_fn(step)
    return steps / (time.perf_counter() - start)


def _rate_step(stage, batch_fn, steps: int) -> float:
    import jax

    from synjax.stages import proximity
    from synjax.train.batches import to_global_batch
    from synjax.train.loop import init_train_state, make_train_step
    from synjax.train.parallel import make_mesh

    mesh = make_mesh(stage.training.num_devices)
    host = batch_fn(0)
    state = init_train_state(stage.model(), host["input"], stage.training, mesh)
    step = make_train_step(proximity._loss, mesh)
    batch = to_global_batch(host, mesh)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return steps / (time.perf_counter() - start)


def _rate_loop(stage, batch_fn, steps: int, log_every: int, prefetch: int, folder) -> float:
    import dataclasses

    from synjax.stages import proximity
    from synjax.train.loop import train

    settings = dataclasses.replace(
        stage.training,
        steps=log_every + steps,
        log_every=log_every,
        checkpoint_every=log_every + steps,
        prefetch=prefetch,
        # A short run: no warm-up (the step's cost does not depend on the rate).
        schedule="constant",
        warmup_steps=0,
    )
    train(stage.model(), proximity._loss, batch_fn, settings, folder, name="bench")
    lines = [json.loads(s) for s in (pathlib.Path(folder) / "metrics" / "bench.jsonl").open()]
    rates = [line["steps_per_sec"] for line in lines if line["step"] > log_every]
    # Mean rate over the timed intervals (equal steps each): steps / total seconds.
    return len(rates) / sum(1.0 / r for r in rates)


def bench_training(args) -> list[dict]:
    config = _demo_config()
    stage, batch_fn = _training_setup(config)
    rows = [
        {"measure": "data", "prefetch": None, "rates": [_rate_data(batch_fn, args.steps)]},
        {"measure": "step", "prefetch": None, "rates": [_rate_step(stage, batch_fn, args.steps)]},
    ]
    loops = {depth: {"measure": "loop", "prefetch": depth, "rates": []} for depth in args.prefetch}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for depth in args.prefetch:
                folder = pathlib.Path(tmp) / f"run_{repeat}_{depth}"
                rate = _rate_loop(stage, batch_fn, args.steps, args.log_every, depth, folder)
                loops[depth]["rates"].append(rate)
                print(f"loop prefetch={depth} run {repeat}: {rate:.3g} steps/s", flush=True)
    rows += loops.values()
    for row in rows:
        rates = row["rates"]
        row["steps_per_s"] = sum(rates) / len(rates)
        row["s_per_step"] = 1.0 / row["steps_per_s"]
        row["runs"] = len(rates)
    return rows


# --- cold start --------------------------------------------------------------------


def cold_start_child(init_mode: str, cache: str) -> dict:
    """Import -> first prediction in this (fresh) process; `cache` is a folder or ""."""
    import jax

    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import jax.numpy as jnp
    import numpy as np

    from synjax.stages.proximity import ProximityStage, block_fn_of

    imported = time.perf_counter()
    stage = ProximityStage.from_config(_demo_config())
    model, network = stage.model(), stage.network
    sample = jnp.zeros((1, *stage.unet_settings().valid_input_shape(network.train_output), 1))
    key = jax.random.key(0, impl=INIT_MODES[init_mode])
    init = model.init if init_mode == "eager" else jax.jit(model.init)
    params = init(key, sample)["params"]
    jax.block_until_ready(params)
    initialised = time.perf_counter()
    margin, block = network.predict_context, network.predict_output
    crop = (slice(None), *(slice(m, m + b) for m, b in zip(margin, block, strict=True)))
    block_fn = block_fn_of(stage.unet_settings(), params, crop)
    raw = np.random.default_rng(0).random(
        (1, *(b + 2 * m for b, m in zip(block, margin, strict=True))), dtype=np.float32
    )
    out = block_fn(raw)
    done = time.perf_counter()
    assert out.shape == (1, *block), out.shape
    return {
        "import_s": imported - START,
        "init_s": initialised - imported,
        "first_prediction_s": done - initialised,
        "total_s": done - START,
        # CPU seconds of this process (all threads): less sensitive to other load.
        "total_cpu_s": time.process_time(),
    }


def bench_cold_start() -> list[dict]:
    rows = []
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for init_mode in INIT_MODES:
        with tempfile.TemporaryDirectory() as cache_dir:
            for cache in CACHE_MODES:
                folder = "" if cache == "off" else cache_dir
                result = subprocess.run(
                    [sys.executable, __file__, "--cold-start-child", init_mode, folder],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                if result.returncode:
                    sys.exit(f"cold start {init_mode}, cache {cache} failed:\n{result.stderr}")
                row = {
                    "init": init_mode,
                    "cache": cache,
                    **json.loads(result.stdout.splitlines()[-1]),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measure")
    parser.add_argument("--log-every", type=int, default=4, help="loop: steps per logged interval")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0, 2], help="loop depths")
    parser.add_argument("--repeats", type=int, default=2, help="loop runs per depth")
    parser.add_argument("--cold-start", action="store_true", help="also time import -> predict")
    parser.add_argument("--no-training", action="store_true", help="skip the training measures")
    parser.add_argument(
        "--cold-start-child", nargs=2, metavar=("INIT", "CACHE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.cold_start_child:
        print(json.dumps(cold_start_child(*args.cold_start_child)))
        return

    try:
        from benchmarks import common
    except ImportError:  # run as a script: benchmarks/ itself is on sys.path
        import common

    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    payload = {
        "command": " ".join([pathlib.Path(sys.executable).name, *sys.argv]),
        "commit": commit,
        "environment": common.environment(),
        "load_average_before": os.getloadavg(),
    }
    if not args.no_training:
        payload["training"] = bench_training(args)
        print(common.format_table(payload["training"], LOOP_COLUMNS))
    if args.cold_start:
        payload["cold_start"] = bench_cold_start()
        print(common.format_table(payload["cold_start"], COLD_COLUMNS))
    payload["load_average_after"] = os.getloadavg()
    print(f"load average before {payload['load_average_before']}, after {os.getloadavg()}")
    print("wrote", common.write_json(args.out, payload))


if __name__ == "__main__":
    main()
