"""Pruning windows, candidate labels and the pruning CNN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synjax.errors import ConfigError
from synjax.models.conv import Conv3D
from synjax.models.pruning import KERNEL, PruningCNN, sigmoid_bce
from synjax.postprocess import pruning_windows as pw
from synjax.postprocess.candidates import Candidates

SHAPE = (6, 10, 12)
RESOLUTION = (40.0, 8.0, 8.0)


def _candidates(pre_points, post_points, pre_seg, post_seg):
    """Candidates with the given closest points and segments (other fields filler)."""
    pre_points = np.asarray(pre_points, np.int64).reshape(-1, 3)
    post_points = np.asarray(post_points, np.int64).reshape(-1, 3)
    n = len(pre_points)
    return Candidates(
        pre_component=np.arange(1, n + 1),
        pre_segment=np.asarray(pre_seg, np.uint64),
        post_component=np.arange(1, n + 1),
        post_segment=np.asarray(post_seg, np.uint64),
        pre_overlap=np.ones(n, np.int64),
        post_overlap=np.ones(n, np.int64),
        location=(pre_points + post_points) * 0.5 * np.asarray(RESOLUTION),
        pre_point=pre_points,
        post_point=post_points,
        gap_nm=np.zeros(n),
        score=np.ones(n),
    )


def _volumes():
    raw = np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE)
    prox = np.linspace(-1, 1, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    seg = np.zeros(SHAPE, np.uint64)
    seg[..., :6] = 1
    seg[..., 6:] = 2
    return raw, prox, seg


def test_window_centring_and_padding():
    raw, prox, seg = _volumes()
    # Centre (2, 5, 6) well inside; centre (0, 0, 0) pads half of each axis.
    cands = _candidates([[2, 5, 5], [0, 0, 0]], [[2, 5, 7], [0, 0, 0]], [1, 1], [2, 2])
    win = pw.extract_windows(raw, prox, seg, cands, window_shape=(3, 4, 4))
    assert win.shape == (2, 3, 4, 4, pw.NUM_CHANNELS) and win.dtype == np.float32
    # Window index (1, 2, 2) is the centre voxel.
    np.testing.assert_allclose(win[0, 1, 2, 2, pw.CHANNEL_EM], raw[2, 5, 6] / 255.0)
    np.testing.assert_allclose(win[0, ..., pw.CHANNEL_EM], raw[1:4, 3:7, 4:8] / 255.0)
    np.testing.assert_allclose(win[0, ..., pw.CHANNEL_PROXIMITY], prox[1:4, 3:7, 4:8])
    np.testing.assert_array_equal(win[0, ..., pw.CHANNEL_PRE], seg[1:4, 3:7, 4:8] == 1)
    np.testing.assert_array_equal(win[0, ..., pw.CHANNEL_POST], seg[1:4, 3:7, 4:8] == 2)
    # Second window starts at (-1, -2, -2): zeros before, volume after.
    assert np.all(win[1, 0] == 0) and np.all(win[1, :, :2] == 0) and np.all(win[1, :, :, :2] == 0)
    np.testing.assert_allclose(win[1, 1:, 2:, 2:, pw.CHANNEL_EM], raw[0:2, 0:2, 0:2] / 255.0)
    np.testing.assert_array_equal(win[1, 1:, 2:, 2:, pw.CHANNEL_PRE], 1.0)


def test_augmented_windows_are_transformed_copies():
    raw, prox, seg = _volumes()
    cands = _candidates([[2, 5, 5]] * 8, [[2, 5, 7]] * 8, [1] * 8, [2] * 8)
    plain = pw.extract_windows(raw, prox, seg, cands, window_shape=(3, 4, 4))
    # With no shift, each augmented window holds the same multiset of values.
    aug = pw.extract_windows(
        raw,
        prox,
        seg,
        cands,
        window_shape=(3, 4, 4),
        rng=np.random.default_rng(0),
        max_shift=(0, 0, 0),
    )
    for a, p in zip(aug, plain, strict=True):
        np.testing.assert_allclose(np.sort(a[..., 0].ravel()), np.sort(p[..., 0].ravel()))
    assert not all(np.array_equal(a, p) for a, p in zip(aug, plain, strict=True))


def test_window_config_errors():
    raw, prox, seg = _volumes()
    cands = _candidates([[0, 0, 0]], [[0, 0, 0]], [1], [2])
    with pytest.raises(ConfigError, match="window_shape"):
        pw.extract_windows(raw, prox, seg, cands, window_shape=(3, 4))


class _Pairs:
    def __init__(self, pre, post, loc):
        self.pre_ids = np.asarray(pre, np.uint64)
        self.post_ids = np.asarray(post, np.uint64)
        self.locations = np.asarray(loc, np.float64)


def test_map_and_label_candidates():
    _, _, seg = _volumes()
    gt = np.zeros(SHAPE, np.uint64)
    gt[..., :5] = 10  # Segment 1 is mostly GT 10, a sliver of GT 20.
    gt[..., 5:] = 20
    np.testing.assert_array_equal(pw.map_to_ground_truth([1, 2, 7], seg, gt), [10, 20, 0])
    cands = _candidates([[2, 5, 5], [2, 5, 7]], [[2, 5, 7], [2, 5, 5]], [1, 2], [2, 1])
    # Candidate 0 spans x 40..56 nm at y = 40, z = 80; GT location 300 nm off in y.
    pairs = _Pairs([10], [20], [[80.0, 340.0, 48.0]])
    labels = pw.label_candidates(cands, seg, gt, pairs, RESOLUTION, max_distance_nm=400.0)
    np.testing.assert_array_equal(labels, [True, False])  # reversed pair is negative
    labels = pw.label_candidates(cands, seg, gt, pairs, RESOLUTION, max_distance_nm=250.0)
    np.testing.assert_array_equal(labels, [False, False])


def test_pruning_cnn_shape_default_window():
    jax.config.update("jax_disable_most_optimizations", True)
    model = PruningCNN(features=(2, 2, 2, 2, 2), dense_features=4)
    x = jax.ShapeDtypeStruct((3, 16, 160, 160, 4), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(model.apply, params, x)
    assert out.shape == (3,)
    # Four poolings: 16x160x160 -> 4x10x10, times 2 features, into the dense layer.
    assert params["params"]["dense0"]["kernel"].shape == (4 * 10 * 10 * 2, 4)


def test_sigmoid_bce_hand_values():
    logits = jnp.array([0.0, 0.0, 2.0])
    labels = jnp.array([1.0, 0.0, 1.0])
    # -[2 log(1/2) + log(1/2) + 2 log(sigmoid(2))] / 3 with pos_weight 2.
    expected = -(2 * np.log(0.5) + np.log(0.5) + 2 * np.log(1 / (1 + np.exp(-2.0)))) / 3
    np.testing.assert_allclose(sigmoid_bce(logits, labels, pos_weight=2.0), expected, rtol=1e-6)
    assert np.isfinite(sigmoid_bce(jnp.array([1e4]), jnp.array([0.0])))


def test_training_step_lowers_loss():
    model = PruningCNN(
        features=(4, 4, 4, 4, 4),
        pools=((1, 2, 2), (1, 2, 2), (2, 1, 1), (1, 1, 1)),
        dense_features=8,
    )
    rng = np.random.default_rng(0)
    x = rng.random((4, 2, 8, 8, 4), dtype=np.float32)
    labels = jnp.array([1.0, 0.0, 1.0, 0.0])
    params = model.init(jax.random.key(0), x)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(p):
        return sigmoid_bce(model.apply(p, x), labels, pos_weight=2.0)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    params, opt_state, first = step(params, opt_state)
    for _ in range(4):
        params, opt_state, _ = step(params, opt_state)
    assert float(loss_fn(params)) < float(first)


def test_candidates_to_labels_windows_and_metric():
    """Generated candidates flow through labelling, windows and the CREMI metric."""
    from synjax.evaluation import partners as pm
    from synjax.io import segment_ids_at
    from synjax.pipelines.partners import candidate_pairs
    from synjax.postprocess.candidates import generate_candidates

    seg = np.zeros((4, 16, 20), np.uint64)
    seg[..., :10] = 1
    seg[..., 10:] = 2
    prox = np.zeros(seg.shape, np.float32)
    prox[:, 6:10, 7:10] = 0.9
    prox[:, 6:10, 10:13] = -0.9
    raw = np.full(seg.shape, 255, np.uint8)
    found = generate_candidates(prox, seg, RESOLUTION, omega=10)
    assert [tuple(r) for r in found.pairs().tolist()] == [(1, 2)]
    gt = seg * 100  # GT neurons 100 and 200 cover segments 1 and 2 exactly.
    truth = pm.PartnerPairs([100], [200], [[40.0, 64.0, 72.0]], [[40.0, 64.0, 80.0]])
    np.testing.assert_array_equal(
        pw.label_candidates(found, seg, gt, truth, RESOLUTION, max_distance_nm=100.0), [True]
    )
    win = pw.extract_windows(raw, prox, seg, found, window_shape=(4, 8, 8))
    # Centre (0, 6, 9.5) rounds to x = 10, so the window's centre column is post.
    assert win[0, 2, 4, 4, pw.CHANNEL_POST] == 1.0 and win[0, 2, 4, 3, pw.CHANNEL_PRE] == 1.0
    pred = candidate_pairs(found, RESOLUTION)
    pred = pm.PartnerPairs(
        segment_ids_at(gt, pred.pre_locations, RESOLUTION),
        segment_ids_at(gt, pred.post_locations, RESOLUTION),
        pred.pre_locations,
        pred.post_locations,
    )
    assert pm.cremi_partner_scores(pred, truth).tp == 1


class _LoggedVolume:
    """Volume-like array that records the windows read from it."""

    def __init__(self, array):
        self._array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.reads = []

    def __getitem__(self, window):
        self.reads.append(tuple((s.start, s.stop) for s in window))
        return self._array[window]


PRUNER_SHAPE = (8, 24, 24)
PRUNER_WINDOW = (4, 16, 16)


@pytest.fixture
def fast_compile():
    """Tiny networks: XLA's optimisations cost more than they save."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def _pruner_config(method="dtype", steps=2):
    import ml_collections

    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "data": {"intensity": {"method": method, "low_percent": 2.0, "high_percent": 98.0}},
            "pruner": {
                "window": PRUNER_WINDOW,
                "features": (2, 2, 2, 2, 2),
                "pools": ((1, 2, 2), (1, 2, 2), (2, 2, 2), (1, 2, 2)),
                "dense_features": 4,
                "train": {
                    "batch_size": 4,
                    "steps": steps,
                    "learning_rate": 1e-3,
                    "log_every": 0,
                    "checkpoint_every": steps,
                    "keep_checkpoints": 1,
                    "num_devices": 1,
                    "label_distance_nm": 400.0,
                },
            },
        }
    )


def _pruner_volumes():
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, PRUNER_SHAPE, dtype=np.uint8)
    prox = rng.uniform(-1, 1, PRUNER_SHAPE).astype(np.float32)
    seg = np.ones(PRUNER_SHAPE, np.uint64)
    seg[..., 12:] = 2
    pre = [[z, y, 10] for z in (1, 4, 6) for y in (3, 12, 20)]
    post = [[z, y, 13] for z, y, _ in pre]
    cands = _candidates(pre, post, [1] * len(pre), [2] * len(pre))
    return raw, prox, seg, cands


def _copies(raw):
    return {
        "uint8": raw,
        "uint16": raw.astype(np.uint16) * 257,
        "float32": raw.astype(np.float32) / np.float32(255),
    }


def test_windows_identical_for_copies_and_only_windows_read():
    raw, prox, seg, cands = _pruner_volumes()
    windows = {}
    for dtype, copy in _copies(raw).items():
        lazy = _LoggedVolume(copy)
        windows[dtype] = pw.extract_windows(
            lazy, prox, seg, cands, PRUNER_WINDOW, rng=np.random.default_rng(1)
        )
        # One read per window, each no larger than the window: never the volume.
        assert len(lazy.reads) == len(cands)
        assert all(
            b - a <= w for read in lazy.reads for (a, b), w in zip(read, PRUNER_WINDOW, strict=True)
        )
    for dtype in ("uint16", "float32"):
        np.testing.assert_array_equal(windows[dtype], windows["uint8"])
    centre = pw.extract_windows(raw, prox, seg, cands.select(np.array([4])), PRUNER_WINDOW)
    # Candidate 4: midpoint (4, 12, 11.5) -> (4, 12, 12); window index (2, 8, 8).
    assert centre[0, 2, 8, 8, pw.CHANNEL_EM] == raw[4, 12, 12] / np.float32(255)


def test_scores_identical_for_uint16_and_float_copies(fast_compile):
    from synjax.data.intensity import DTYPE_RANGE, TrainedParams
    from synjax.stages import pruner

    config = _pruner_config()
    raw, prox, seg, cands = _pruner_volumes()
    model = pruner.PrunerStage.from_config(config).model()
    params = jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, *PRUNER_WINDOW, 4)))["params"]
    trained = TrainedParams(params, DTYPE_RANGE)
    scores = {
        dtype: pruner.PrunerStage.from_config(config).score(trained, copy, prox, seg, cands)
        for dtype, copy in _copies(raw).items()
    }
    assert scores["uint8"].shape == (len(cands),) and np.ptp(scores["uint8"]) > 0
    for dtype in ("uint16", "float32"):
        np.testing.assert_array_equal(scores[dtype], scores["uint8"])
    with pytest.raises(TypeError, match="TrainedParams"):
        pruner.PrunerStage.from_config(config).score(params, raw, prox, seg, cands)


def test_trained_pruner_saves_its_normalization_and_loading_reapplies_it(tmp_path, fast_compile):
    from synjax.data.intensity import INTENSITY_FILE, IntensityNormalization
    from synjax.stages import pruner

    config = _pruner_config("percentiles")
    raw, prox, seg, cands = _pruner_volumes()
    labels = np.arange(len(cands)) % 3 == 0
    trained = pruner.PrunerStage.from_config(config).train(raw, prox, seg, cands, labels, tmp_path)
    low, high = np.percentile(raw, [2.0, 98.0], method="nearest")
    assert trained.intensity == IntensityNormalization("percentiles", 2.0, 98.0, low, high)
    folder = tmp_path / "checkpoints" / pruner.MODEL_NAME
    # orbax keeps its step folder beside the file and still finds the step.
    assert sorted(p.name for p in folder.iterdir()) == ["2", INTENSITY_FILE]
    loaded = pruner.PrunerStage.from_config(config).load(tmp_path)
    assert loaded.intensity == trained.intensity
    # The saved percentiles are re-applied, never re-measured on the volume
    # scored: against uint8 percentiles a uint16 copy saturates, scores change.
    u16 = raw.astype(np.uint16) * 257
    same = pruner.PrunerStage.from_config(config).score(loaded, raw, prox, seg, cands)
    np.testing.assert_array_equal(
        same, pruner.PrunerStage.from_config(config).score(trained, raw, prox, seg, cands)
    )
    assert not np.array_equal(
        pruner.PrunerStage.from_config(config).score(loaded, u16, prox, seg, cands), same
    )


def test_pruning_cnn_equals_relu_then_pool_formulation():
    # The network pools its pre-activations with the fused ReLU + pool: same
    # logits and parameter gradients as ReLU, then XLA's max pool.
    class Reference(PruningCNN):
        @nn.compact
        def __call__(self, x):
            for i, width in enumerate(self.features):
                x = nn.relu(Conv3D(width, KERNEL, padding="SAME", name=f"conv{i}")(x))
                if i < len(self.pools):
                    pool = tuple(self.pools[i])
                    x = nn.max_pool(x, pool, strides=pool, padding="VALID")
            x = nn.relu(nn.Dense(self.dense_features, name="dense0")(x.reshape(x.shape[0], -1)))
            return nn.Dense(1, name="dense1")(x)[:, 0]

    settings = dict(
        features=(4, 4, 4, 4, 4),
        pools=((1, 2, 2), (1, 2, 2), (2, 1, 1), (1, 1, 1)),
        dense_features=8,
    )
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 2, 8, 8, 4)), jnp.float32)
    labels = jnp.array([1.0, 0.0, 1.0])
    params = PruningCNN(**settings).init(jax.random.key(0), x)

    def logits_and_grads(model):
        loss = lambda p: sigmoid_bce(model.apply(p, x), labels)  # noqa: E731
        return model.apply(params, x), jax.grad(loss)(params)

    got = jax.jit(lambda: logits_and_grads(PruningCNN(**settings)))()
    want = jax.jit(lambda: logits_and_grads(Reference(**settings)))()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(got[1]["params"]["conv0"]["kernel"]).sum()) > 0
