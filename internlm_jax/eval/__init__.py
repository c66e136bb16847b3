"""Evaluation like OpenCompass: datasets and prompt templates, gen / ppl / log-likelihood inferencers with a
per-sample cache, metrics (HumanEval in the sandbox), needle-in-a-haystack, and the summary table, against an
in-process model or any OpenAI-compatible endpoint. Entry point: `experiments/evaluate.py`."""
from internlm_jax.eval.backends import Backend, BackendError, InProcessBackend, loglikelihood, rolling_loglikelihood
from internlm_jax.eval.loading import LoadError, load_model
from internlm_jax.eval.openai_backend import OpenAIBackend
from internlm_jax.eval.runner import run, train_eval_hook

__all__ = ["Backend", "BackendError", "InProcessBackend", "LoadError", "OpenAIBackend", "load_model", "loglikelihood",
           "rolling_loglikelihood", "run", "train_eval_hook"]
