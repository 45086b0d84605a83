"""Multi-task serving: staged multi-task LoRA fine-tuning (:mod:`metafit.serve.multitask`)."""
