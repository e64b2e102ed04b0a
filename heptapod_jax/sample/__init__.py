"""On-device sampling: strategies (how a token is drawn) and the KV-cached sampler."""

from heptapod_jax.sample.sampler import (
    SampleBatch, Sampler, class_balanced_labels, default_sample_config,
    example_keys, guidance_enabled, labels_from_config, make_sample_fn,
    sampling_params_from_config, step_keys)
from heptapod_jax.sample.strategies import SamplingParams, filter_logits, sample_codes

__all__ = [
    "SampleBatch", "Sampler", "SamplingParams", "class_balanced_labels",
    "default_sample_config", "example_keys", "filter_logits", "guidance_enabled",
    "labels_from_config", "make_sample_fn", "sample_codes",
    "sampling_params_from_config", "step_keys",
]
