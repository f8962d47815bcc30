"""Imports every module that defines gin configurables, so any gin file can name them."""

from memlm_jax.data import bias_sampling, long_document_tasks, pipeline, passkey, speech  # noqa: F401
from memlm_jax.data import speech_features, summarization_tasks, tasks, vocabularies  # noqa: F401
from memlm_jax.layers import attention, conformer, frontend, infini_attention, transformer  # noqa: F401
from memlm_jax.models import infini_lm, nam, transducer, transducer_parts, transformer_lm  # noqa: F401
from memlm_jax.runtime import checkpoints, optimizers, partitioning  # noqa: F401
from memlm_jax.launch import asr_lib, biasing, eval_lib, infer_lib, long_document_lib  # noqa: F401,E402
from memlm_jax.launch import passkey_lib, summarization_lib, train_lib  # noqa: F401,E402
