"""Fixed-batch training of a two-stage detector (Mask R-CNN, the instance network) in tests."""

import jax
import numpy as np
import optax

LOSS_TERMS = ("rpn_objectness", "rpn_box", "roi_class", "roi_box", "mask")


def train_on_fixed_batch(model, batch, steps: int, learning_rate: float = 3e-3):
    """Trains `model` with Adam on one batch, again and again.

    Checks on the way that the first step saw both instances of the batch and
    that every loss term of it is finite.

    Args:
      model: a detector built with `training=True`; `apply` returns a dict
        with "loss" and the terms of `LOSS_TERMS`.
      batch: `[n, z, y, x, 2]` image and instance ids, two instances each.
      steps: steps after the first.
      learning_rate: Adam's.

    Returns:
      (params after every step, outputs of the first step, outputs of each
      later step).
    """
    params = jax.jit(model.init)(jax.random.key(1), batch[:1])["params"]
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state):
        def loss_of(p):
            out = model.apply({"params": p}, batch)
            return out["loss"], out

        (_, out), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, out

    opt_state = tx.init(params)
    params, opt_state, first = step(params, opt_state)
    assert float(first["gt_instances"]) == 2.0
    for name in LOSS_TERMS:
        assert np.isfinite(float(first[name])), name
    later = []
    for _ in range(steps):
        params, opt_state, out = step(params, opt_state)
        later.append(out)
    return params, first, later
