"""One process of `test_multihost.py`: a train step of a tiny network on one CPU device.

    python -m tests._multihost_worker OUT_DIR WORKDIR ROWS

ROWS ("0:4") picks the rows of a fixed global batch that the run trains on;
with `SYNJAX_NUM_PROCESSES` etc. set (and `--distributed`), the process joins
a multi-process run through `synjax.runtime.initialize_distributed` and loads
only its share of those rows. Each process saves its final parameters to
`OUT_DIR/params_<process>.npz`.
"""

import argparse
import os

os.environ.pop("XLA_FLAGS", None)  # one CPU device per process
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from synjax import runtime  # noqa: E402

GLOBAL_BATCH = 4


class TinyNet(nn.Module):
    """A 3x3x3 convolution to 2 channels: `[batch, z, y, x, 1]` -> `[batch, z, y, x, 2]`."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(2, (3, 3, 3))(x)


def global_batch() -> dict[str, np.ndarray]:
    """A fixed batch of 4 examples, `[4, 4, 4, 4, 1]` inputs and `[4, 4, 4, 4, 2]` targets."""
    rng = np.random.default_rng(7)
    return {
        "input": rng.normal(size=(GLOBAL_BATCH, 4, 4, 4, 1)).astype(np.float32),
        "target": rng.normal(size=(GLOBAL_BATCH, 4, 4, 4, 2)).astype(np.float32),
    }


def loss_fn(outputs, batch):
    loss = ((outputs - batch["target"]) ** 2).mean()
    return loss, {"mse": loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("workdir")
    parser.add_argument("rows")
    parser.add_argument("--distributed", action="store_true")
    args = parser.parse_args()
    runtime.initialize_distributed(ConfigDict({"distributed": args.distributed}))

    import jax

    from synjax.train.batches import process_batch_fn
    from synjax.train.loop import train
    from synjax.train.settings import TrainSettings

    start, stop = (int(v) for v in args.rows.split(":"))
    rows = {key: value[start:stop] for key, value in global_batch().items()}
    loaded = []

    def sampler_batch(step, batch_size, shard=0, num_shards=1):
        share = batch_size // num_shards
        loaded.append((shard, num_shards))
        return {key: value[shard * share : (shard + 1) * share] for key, value in rows.items()}

    settings = TrainSettings(
        steps=1, batch_size=stop - start, learning_rate=0.1, optimizer="sgd", log_every=1
    )
    state = train(
        TinyNet(),
        loss_fn,
        process_batch_fn(sampler_batch, settings.batch_size),
        settings,
        args.workdir,
        name="tiny",
    )
    assert loaded[0] == (jax.process_index(), jax.process_count()), loaded
    params = jax.device_get(state.params)
    flat = {
        "/".join(str(k.key) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    np.savez(os.path.join(args.out_dir, f"params_{jax.process_index()}.npz"), **flat)


if __name__ == "__main__":
    main()
