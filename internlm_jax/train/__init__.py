"""Training: state, optimizer, the jitted step (loss, accumulation, remat), the loop, metrics."""
from internlm_jax.train.adam8bit import adamw_8bit, scale_by_adam_8bit
from internlm_jax.train.optimizer import OptimizerConfig, make_optimizer
from internlm_jax.train.state import TrainState, create_train_state
from internlm_jax.train.step import cross_entropy_sums, make_train_step

__all__ = ["OptimizerConfig", "make_optimizer", "adamw_8bit", "scale_by_adam_8bit", "TrainState",
           "create_train_state", "cross_entropy_sums", "make_train_step"]
