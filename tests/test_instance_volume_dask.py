"""The instance pipelines' own-volume prediction on the Dask executor (`pipelines.volume_blocks`).

A 2-worker `LocalCluster` of worker processes: each worker loads the trained
network (the EM instance network of `configs/vnc.py`, the Mask R-CNN of
`configs/fluorescence.py`, smoke-trained by the fixtures of their own test
modules) from the workdir's checkpoint, detects its blocks and stores them
itself; the main process records them and fuses or merges. Its output must
equal the local executor's exactly, and a block whose input cannot be read on
a worker must stop the run with one line naming that block; once the workers
read again, the rerun finishes with the local executor's output. The shared
loop's retry, store and record order is checked on hand-made blocks.
"""

import re

import numpy as np
import pytest

from synjax import pipelines
from synjax.errors import ConfigError, DataError
from synjax.io import create_volume, open_volume
from synjax.pipelines import config_checks
from synjax.pipelines.volume_blocks import BlockWork, predict_pending
from tests.test_fluorescence_volume import _config as _fluorescence_config
from tests.test_fluorescence_volume import trained as fluorescence_trained  # noqa: F401
from tests.test_fluorescence_volume import user_volume as fluorescence_volume  # noqa: F401
from tests.test_instance_volume import RESOLUTION, _config, _fast_compile, trained  # noqa: F401

distributed = pytest.importorskip("distributed")

# Native (z, y, x): read grid (9, 37, 20) with the smoke's (1, 2, 2) cells.
SHAPE = (9, 75, 41)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two worker processes compiling as the tests do (same numerics as this process)."""
    with pytest.MonkeyPatch.context() as patch:
        # Spawned workers import jax afresh and read the flag from the environment.
        patch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as local_cluster:
            yield local_cluster


def _input(path):
    """A synthetic EM volume in zarr."""
    from synjax.data.synthetic import make_em_volume

    raw = make_em_volume(shape=SHAPE, resolution=RESOLUTION, seed=7, n_synapses=3).raw
    volume = create_volume(str(path), raw.shape, raw.dtype, resolution=RESOLUTION)
    volume[...] = raw
    return str(path)


def _predict(workdir, path, out, executor="local", scheduler=""):
    config = _config()
    config.mode = "predict"
    config.predict.update(input=path, output=str(out), executor=executor, scheduler=scheduler)
    pipelines.run(config, workdir)
    return open_volume(str(out / "instances.zarr")).read(), (out / "instances.csv").read_text()


def test_dask_equals_local_and_names_a_failing_block(trained, cluster, tmp_path):  # noqa: F811
    path = _input(tmp_path / "user.zarr")
    local, local_table = _predict(trained, path, tmp_path / "local")
    assert local.max() > 0  # something to compare

    out = tmp_path / "dask"
    got, table = _predict(trained, path, out, "dask", cluster.scheduler_address)
    np.testing.assert_array_equal(got, local)
    assert table == local_table
    # The blocks were detected on the workers: each loaded the network at most once.
    loads = _models_built(cluster)
    assert len(loads) == 2 and sum(loads.values()) >= 1
    assert max(loads.values()) == 1

    # On the workers only, reading a block that reaches read-grid z 8 fails
    # every time: the first such block to fail every try stops the run,
    # named in one line, with the error.
    with distributed.Client(cluster) as client:
        client.run(_break_reads_reaching, 8)
    broken = tmp_path / "broken"
    try:
        with pytest.raises(DataError) as error:
            _predict(trained, path, broken, "dask", cluster.scheduler_address)
    finally:
        with distributed.Client(cluster) as client:
            client.run(_repair_reads)
    message = str(error.value)
    assert "\n" not in message
    named = re.fullmatch(
        r"predicting instance blocks \[(\d+)\] \(first: read-grid voxels \((\d+), \d+, \d+\)"
        r"\.\.\((\d+), \d+, \d+\)\) failed after 3 tries: OSError: disk on fire at z 8",
        message,
    )
    assert named, message
    assert int(named.group(2)) <= 8 < int(named.group(3))

    # Repaired, the same output folder resumes and gives the local output.
    got, table = _predict(trained, path, broken, "dask", cluster.scheduler_address)
    np.testing.assert_array_equal(got, local)
    assert table == local_table


def _break_reads_reaching(z):
    """In a worker: reading a block whose read-grid box reaches slice `z` raises."""
    from synjax.pipelines import instance_volume

    original = getattr(instance_volume, "_original_read", instance_volume.read_block_image)

    def read(source, box, factors, intensity):
        if box.start[0] <= z < box.stop[0]:
            raise OSError(f"disk on fire at z {z}")
        return original(source, box, factors, intensity)

    instance_volume._original_read = original
    instance_volume.read_block_image = read


def _repair_reads():
    from synjax.pipelines import instance_volume

    instance_volume.read_block_image = instance_volume.__dict__.pop(
        "_original_read", instance_volume.read_block_image
    )


def _models_built(cluster) -> dict[str, int]:
    """Worker address -> models its process has built so far (`_lazy_models`)."""
    with distributed.Client(cluster) as client:
        return client.run(_lazy_models)


def _lazy_models():
    """Models built in this worker process (`synjax.inference.lazy_model`)."""
    from synjax.inference import lazy_model

    return len(lazy_model._LAZY_CACHE)


def test_fluorescence_on_dask_equals_local(
    fluorescence_trained,  # noqa: F811
    fluorescence_volume,  # noqa: F811
    cluster,
    tmp_path,
):
    path, _ = fluorescence_volume
    before = _models_built(cluster)
    outputs = []
    for executor, scheduler in (("local", ""), ("dask", cluster.scheduler_address)):
        config = _fluorescence_config()
        config.mode = "predict"
        out = tmp_path / executor
        # A 1 x 2 x 2 grid of cells: four tasks for the two workers.
        config.predict.update(
            input=path, output=str(out), block=(16, 64, 48), executor=executor, scheduler=scheduler
        )
        pipelines.run(config, fluorescence_trained)
        outputs.append(
            (open_volume(str(out / "instances.zarr")).read(), (out / "instances.csv").read_text())
        )
    (local, local_table), (got, table) = outputs
    # The cells were detected on the workers, each loading the Mask R-CNN at most once.
    loaded = [n - before[worker] for worker, n in _models_built(cluster).items()]
    assert len(loaded) == 2 and sum(loaded) >= 1 and max(loaded) == 1
    assert local.max() > 0
    np.testing.assert_array_equal(got, local)
    assert table == local_table


def test_config_checks_name_an_unknown_executor():
    for config in (_config(), _fluorescence_config()):
        assert config.predict.executor == "local"
        config_checks.check_config(config)
        config.predict.executor = "spark"
        with pytest.raises(ConfigError, match=r"config.predict.executor.*spark"):
            config_checks.check_config(config)


class _Done:
    """A done-state in memory: the ids recorded, in order."""

    def __init__(self, total, done=()):
        self.total, self.recorded = total, list(done)

    def todo(self):
        return np.asarray([b for b in range(self.total) if b not in self.recorded])

    def record(self, ids):
        self.recorded += list(ids)

    def missing(self):
        return self.todo()


def test_local_batches_are_retried_stored_then_recorded():
    events = []
    tries = {}

    def predict(chunk):
        tries[tuple(chunk)] = tries.get(tuple(chunk), 0) + 1
        if chunk == [3, 4] and tries[(3, 4)] == 1:
            raise OSError("flaky read")
        return [10 * b for b in chunk]

    def store(chunk, result):
        events.append(("store", chunk, result))

    done = _Done(5, done=[1])
    work = BlockWork(predict, store, lambda chunk: f"blocks {list(chunk)}", 2, retries=1)
    assert predict_pending(done, 5, work, desc="test", output="out") == 4
    # Blocks 0, 2 | 3, 4 (block 1 was done); the second batch stored after its retry.
    assert events == [("store", [0, 2], [0, 20]), ("store", [3, 4], [30, 40])]
    assert tries == {(0, 2): 1, (3, 4): 2}
    assert done.recorded == [1, 0, 2, 3, 4]

    # Without retries the same failure names the batch; nothing of it is recorded.
    tries.clear()
    done = _Done(5, done=[0, 1, 2])
    work = BlockWork(predict, store, lambda chunk: f"blocks {list(chunk)}", 2, retries=0)
    with pytest.raises(
        DataError, match=r"^predicting blocks \[3, 4\] failed after 1 tries: OSError: flaky"
    ):
        predict_pending(done, 5, work, desc="test", output="out")
    assert done.recorded == [0, 1, 2]

    # A store that fails once is tried again; one that always fails is named, unrecorded.
    failures = []

    def store_failing(times):
        def store(chunk, result):
            if len(failures) < times:
                failures.append(chunk)
                raise OSError("disk full")

        return store

    done = _Done(5, done=[0, 1, 2])
    work = BlockWork(predict, store_failing(1), str, 2, retries=1)
    assert predict_pending(done, 5, work, desc="test", output="out") == 2
    assert failures == [[3, 4]] and done.recorded == [0, 1, 2, 3, 4]
    failures.clear()
    done = _Done(5, done=[0, 1, 2])
    work = BlockWork(predict, store_failing(9), str, 2, retries=1)
    with pytest.raises(DataError, match=r"^storing \[3, 4\] failed after 2 tries: OSError: disk"):
        predict_pending(done, 5, work, desc="test", output="out")
    assert failures == [[3, 4], [3, 4]] and done.recorded == [0, 1, 2]

    with pytest.raises(ConfigError, match=r"config.predict.executor='spark'"):
        predict_pending(done, 5, work, desc="test", output="out", executor="spark")
