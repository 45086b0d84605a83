"""Frozen-model scoring: per-sequence response log-probabilities, computed once per dataset and cached.

KTO and DPO compare the policy with a frozen reference. The reference never changes during a
run, so its log-probabilities of every training sequence are computed once, before training,
in a jitted forward over fixed-size chunks, and stored beside the run
(``reference_logp.npz``, keyed by a fingerprint of the sequences and of the reference weights):
a resumed run reads them back instead of recomputing. Each training step then costs one policy
forward/backward only (measured in ``docs/posttrain.md``).

The same scorer serves the data pipeline: the teacher's log-likelihood of category names and of
candidate responses (perplexity) are response log-probabilities too.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.posttrain.losses import model_sequence_logprob

SEQUENCE_KEYS = ("input_ids", "attention_mask", "loss_mask")


def check_same_vocabulary(policy, reference, policy_tokenizer=None, reference_tokenizer=None) -> None:
    """Raises ``ValueError`` unless the reference scores the same token ids as the policy.

    Log-probability ratios only mean something when both models share one vocabulary: the
    embedding sizes must match, and so must the tokenizers' token-to-id maps when given.
    """
    sizes = (policy.config.vocab_size, reference.config.vocab_size)
    if sizes[0] != sizes[1]:
        raise ValueError(f"the reference model's vocabulary ({sizes[1]} tokens) differs from the policy's "
                         f"({sizes[0]}); KTO/DPO need the reference to be a checkpoint of the same model "
                         "(e.g. the SFT run the policy starts from)")
    if policy_tokenizer is not None and reference_tokenizer is not None:
        if policy_tokenizer.get_vocab() != reference_tokenizer.get_vocab():
            raise ValueError("the reference tokenizer maps tokens to other ids than the policy's; "
                             "use the reference's own tokenizer family for the policy")


def reference_logprobs(graphdef: nnx.GraphDef, params: Any, sequences: Mapping[str, np.ndarray], *,
                       chunk: int = 64) -> np.ndarray:
    """``[n]`` per-sequence response log-probabilities of ``sequences`` under the frozen model.

    ``sequences`` holds ``input_ids``, ``attention_mask``, ``loss_mask`` (``[n, L]``); rows are
    scored ``chunk`` at a time (the last chunk padded), so one program is compiled per length.
    """
    n = len(sequences["input_ids"])
    score = _jitted_scorer(graphdef)
    out = np.empty(n, np.float32)
    for start in range(0, n, chunk):
        rows = {k: np.asarray(sequences[k][start:start + chunk]) for k in SEQUENCE_KEYS}
        real = len(rows["input_ids"])
        if real < chunk:  # pad with copies of the last row: same shape, one compilation
            rows = {k: np.concatenate([v, np.repeat(v[-1:], chunk - real, 0)]) for k, v in rows.items()}
        out[start:start + real] = np.asarray(score(params, *(jnp.asarray(rows[k]) for k in SEQUENCE_KEYS)))[:real]
    return out


_SCORERS: dict[Any, Any] = {}


def _jitted_scorer(graphdef):
    if graphdef not in _SCORERS:
        _SCORERS[graphdef] = jax.jit(lambda params, ids, mask, loss_mask: model_sequence_logprob(
            graphdef, params, ids, mask, loss_mask))
    return _SCORERS[graphdef]


def fingerprint(params: Any, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the reference weights and the scored sequences (what the cached values depend on)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.asarray(leaf).tobytes())
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def cached_reference_logprobs(path: str | Path, graphdef: nnx.GraphDef, params: Any,
                              groups: Mapping[str, Mapping[str, np.ndarray]], *, chunk: int = 64) -> dict[str, np.ndarray]:
    """Reference log-probabilities of several sequence groups, read from ``path`` or computed once and saved.

    Args:
      path: the ``.npz`` cache file (in the run folder).
      graphdef, params: the frozen reference model.
      groups: ``{name: sequences}`` (e.g. ``{"": examples, "kl_": mismatched pairs}``).

    Returns:
      ``{name: [n] log-probabilities}``. The file is reused only when its fingerprint matches the
      weights and sequences given, so a changed reference or dataset is recomputed, never reused.
    """
    path = Path(path)
    flat = {f"{group}{k}": v[k] for group, v in groups.items() for k in SEQUENCE_KEYS}
    key = fingerprint(params, flat)
    if path.exists():
        with np.load(path) as stored:
            if str(stored["fingerprint"]) == key:
                return {group: stored[f"logp_{group}"] for group in groups}
    values = {group: reference_logprobs(graphdef, params, seqs, chunk=chunk) for group, seqs in groups.items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, fingerprint=np.asarray(key), **{f"logp_{g}": v for g, v in values.items()})
    tmp.replace(path)
    return values
