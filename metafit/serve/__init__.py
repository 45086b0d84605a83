"""Serving many tasks from one base model: heterogeneous multi-LoRA batching behind an OpenAI-style HTTP API.

Parts:

* :mod:`metafit.serve.multitask` -- staged multi-task LoRA fine-tuning (task filtering by negative
  transfer and gradient conflict, a high-resource stage, then every kept task with temperature
  sampling), each stage a :func:`metafit.train.fit` run;
* :mod:`metafit.serve.adapters` -- per-row LoRA adapters in one jitted forward, each row computing
  only its own adapter's rank (rank-8 units from rank-class slots, gathered once per batch;
  :class:`AdapterBank`, :func:`read_lora_adapter`);
* :mod:`metafit.serve.engine` -- dynamic batching, a bounded queue, padded length buckets,
  token streaming per request (:class:`Engine`);
* :mod:`metafit.serve.config` -- the validated serve config (:class:`ServeConfig`);
* :mod:`metafit.serve.app` -- the Starlette app (``/v1/completions``, ``/v1/chat/completions``,
  ``/v1/models``, ``/health``, ``/metrics``, adapter admin) and :func:`serve` under uvicorn.

Only :mod:`~metafit.serve.adapters` is imported here (``multitask`` on use); the HTTP parts import Starlette and are
loaded on use, so ``import metafit.serve`` stays light.
"""
from metafit.serve.adapters import (AdapterBank, AdapterError, BatchedLoRALinear, LoraAdapter, rank_class,
                                    read_lora_adapter)

__all__ = ["AdapterBank", "AdapterError", "BatchedLoRALinear", "LoraAdapter", "rank_class", "read_lora_adapter"]
