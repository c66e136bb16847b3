"""Fine-tuning runs (XTuner-style): base loading, data from configs, the loop, multiple-choice evaluation."""
from internlm_jax.finetune.base import base_kind, load_base
from internlm_jax.finetune.evaluate import choice_accuracy, choice_predictions
from internlm_jax.finetune.loop import METHODS, run, validate

__all__ = ["METHODS", "base_kind", "choice_accuracy", "choice_predictions", "load_base", "run", "validate"]
