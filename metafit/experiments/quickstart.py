"""Quickstart: an MLP classifier on scikit-learn's bundled digits, through the one trainer.

Shows the whole machinery end to end on a real dataset in well under a minute:
config -> trainer (jitted, fused steps, checkpoints, resume) -> eval -> results
table -> learning-curve plot.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from metafit.data.batching import epoch_batches
from metafit.data.digits import digits_split
from metafit.experiments import RunConfig, experiment, plot_curves
from metafit.models.mlp import MLP
from metafit.parallel import make_mesh
from metafit.runs import RunDir
from metafit.train import fit
from metafit.train.losses import classification_loss


@dataclass(frozen=True)
class QuickstartArgs:
    """Options of the quickstart experiment.

    Attributes:
      hidden: widths of the hidden layers.
      test_fraction: share of the 1,797 digits held out for testing (fixed split from the seed).
    """

    hidden: tuple[int, ...] = (128, 128)
    test_fraction: float = 0.25

    def __post_init__(self):
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"args.test_fraction must be in (0, 1), got {self.test_fraction}")
        if not all(1 <= width <= 1 << 16 for width in self.hidden):
            raise ValueError(f"args.hidden: every width must be in [1, 65536], got {list(self.hidden)}")




@experiment("quickstart", config=QuickstartArgs)
def quickstart(cfg: RunConfig, run: RunDir) -> dict:
    """Trains the digits MLP and reports test accuracy/loss with a learning-curve plot."""
    (x_train, y_train), (x_test, y_test) = digits_split(cfg.seed, cfg.args.test_fraction)
    model = MLP(x_train.shape[1], cfg.args.hidden, 10, rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model)
    loss_fn = classification_loss(graphdef)
    test_batch = (jnp.asarray(x_test), jnp.asarray(y_test))
    evaluate = jax.jit(lambda p: loss_fn(p, test_batch, None))

    def eval_fn(p):
        loss, metrics = evaluate(p)
        return {"test_loss": loss, "test_accuracy": metrics["accuracy"]}

    result = fit(
        loss_fn, params, epoch_batches((x_train, y_train), cfg.train.batch_size, cfg.seed), cfg.train,
        key=jax.random.key(cfg.seed), workdir=run.checkpoint_dir("train"), eval_fn=eval_fn,
        mesh=make_mesh(cfg.mesh), log=run.metrics,
    )
    steps = [h["step"] for h in result.history]
    plot_curves(run.plot_path("learning_curve"), {
        "train loss": (steps, [h["loss"] for h in result.history]),
        "test loss": ([e["step"] for e in result.evals], [e["test_loss"] for e in result.evals]),
    }, xlabel="step", ylabel="cross-entropy", title="digits MLP", logy=True)
    return {"metrics": {
        "test_accuracy": result.eval["test_accuracy"],
        "test_loss": result.eval["test_loss"],
        "train_loss": result.history[-1]["loss"],
        "steps": result.step,
    }}
