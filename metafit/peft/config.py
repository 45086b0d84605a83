"""Frozen configs for each PEFT method, and the umbrella :class:`PeftConfig`.

Defaults live only here. Target selection is shared by the module-wrapping
methods (LoRA/DoRA, adapters, IA3, BitFit):

* ``targets`` — patterns on the module's dotted attribute path
  (``layers.0.self_attn.q_proj``; ``base_layer`` links of earlier PEFT wrappers
  are left out):

  - ``"re:<regex>"``     -> ``re.fullmatch`` on the path;
  - a pattern with ``* ? [`` -> ``fnmatch`` glob on the path (``*`` crosses dots);
  - a bare name ``"q_proj"`` -> the path equals it or ends with ``".q_proj"``
    (Hugging Face PEFT's ``target_modules`` rule).

  An empty tuple means "every module of a target type".
* ``target_types`` — class names; a module matches when one of its classes (MRO)
  has that name, e.g. ``"Linear"`` matches ``flax.nnx.Linear`` and subclasses.
* ``exclude`` — patterns (same syntax) that veto a match.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

# Houlsby places adapters after the attention-output and the FFN-output projections.
# These cover the HF names that metafit's Llama/Qwen2, GPT-2 and BERT/MiniLM mirror.
ATTENTION_OUTPUT = (
    "re:.*self_attn\\.o_proj",          # Llama / Qwen2
    "re:.*attn\\.c_proj",               # GPT-2 attention
    "re:.*attention\\.output\\.dense",  # BERT / MiniLM
)
FFN_OUTPUT = (
    "re:.*mlp\\.down_proj",             # Llama / Qwen2
    "re:.*mlp\\.c_proj",                # GPT-2
    "re:.*layer\\.\\d+\\.output\\.dense",  # BERT / MiniLM (FFN output; not attention.output)
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA / DoRA: ``y = base(x) + g * (alpha / r) * dropout(x) A B``.

    Attributes:
      rank: r, inner dimension of ``A [in, r]`` and ``B [r, out]``.
      alpha: scale numerator; the update is scaled by ``alpha / r``
        (``alpha / sqrt(r)`` with ``use_rslora``).
      dropout: dropout rate on the LoRA input (0 = no dropout module), applied in training steps only
        (:func:`metafit.peft.dropout_enabled`).
      targets, target_types, exclude: see module docstring.
      use_dora: weight-decomposed LoRA (Liu et al., 2024).
      use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski, 2023).
      init: ``"default"`` (A ~ U(+-1/sqrt(in)) as torch's kaiming_uniform(a=sqrt 5), B = 0),
        ``"gaussian"`` (A ~ N(0, 1/r), B = 0), ``"random"`` (A and B both random: NOT identity at
        init; for tests of merging/export).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    target_types: tuple[str, ...] = ("Linear",)
    exclude: tuple[str, ...] = ()
    use_dora: bool = False
    use_rslora: bool = False
    init: Literal["default", "gaussian", "random"] = "default"

    @classmethod
    def from_hf(cls, source=None, /, **fields) -> "LoraConfig":
        """From peft's ``LORA`` fields: a dict, an adapter folder, a peft config object, or keywords.

        ``r -> rank``, ``lora_alpha -> alpha``, ``lora_dropout -> dropout``, ``target_modules -> targets``,
        ``exclude_modules -> exclude``, ``use_dora``, ``use_rslora``, ``init_lora_weights`` (True -> default,
        "gaussian", False -> random); missing fields take peft's defaults (``r=8, lora_alpha=8``).
        Example: ``LoraConfig.from_hf(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])``.

        Unknown fields and fields metafit cannot honour raise, naming the field; see
        :func:`metafit.peft.hf_import.config_from_hf`.
        """
        from metafit.peft.hf_import import config_from_hf

        return config_from_hf(cls, source, **fields)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapter after a projection: ``h' = h + g * act(h W_down + b_down) W_up + b_up``.

    ``style="houlsby"`` targets attention-output and FFN-output projections, ``"pfeiffer"`` only the
    FFN output; ``targets`` (if non-empty) overrides the style's targets. ``W_up``/``b_up`` start at zero,
    so the adapted model equals the base model at init.
    """

    bottleneck: int = 16
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    style: Literal["houlsby", "pfeiffer"] = "houlsby"
    targets: tuple[str, ...] = ()
    target_types: tuple[str, ...] = ("Linear",)
    exclude: tuple[str, ...] = ()
    init_scale: float = 1e-2  # std of W_down (W_up = 0)


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning: P learned key/value vectors prepended in every targeted attention module.

    Targets are attention modules exposing the ``kv_prefix`` hook (see :mod:`metafit.peft.prefix`);
    ``targets`` (patterns on the attention module path) narrows them, empty = all.
    """

    num_prefix: int = 10
    init_scale: float = 0.02
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, source=None, /, **fields) -> "PrefixConfig":
        """From peft's ``PREFIX_TUNING`` fields: a dict, an adapter folder, a peft config object, or keywords.

        ``num_virtual_tokens -> num_prefix``; the shape fields follow from the model.

        Unknown fields and fields metafit cannot honour raise, naming the field; see
        :func:`metafit.peft.hf_import.config_from_hf`.
        """
        from metafit.peft.hf_import import config_from_hf

        return config_from_hf(cls, source, **fields)


@dataclasses.dataclass(frozen=True)
class BitFitConfig:
    """BitFit: train bias offsets only: ``y = base(x) + g * delta_b`` (base bias stays frozen).

    ``add_missing_bias`` also gives a bias offset to targets that have no bias (e.g. Llama's Linear
    layers); otherwise they are skipped. Default targets: every Linear and LayerNorm with a bias.
    """

    targets: tuple[str, ...] = ()
    target_types: tuple[str, ...] = ("Linear", "LayerNorm")
    exclude: tuple[str, ...] = ()
    add_missing_bias: bool = False

    @classmethod
    def from_hf(cls, source=None, /, **fields) -> "BitFitConfig":
        """From peft's ``BEFT`` fields: a dict, an adapter folder, a peft config object, or keywords.

        peft's BEFT is BitFit on Linear layers as a bias offset: ``target_modules -> targets``,
        ``target_types=("Linear",)``, ``add_missing_bias=True``.

        Unknown fields and fields metafit cannot honour raise, naming the field; see
        :func:`metafit.peft.hf_import.config_from_hf`.
        """
        from metafit.peft.hf_import import config_from_hf

        return config_from_hf(cls, source, **fields)


@dataclasses.dataclass(frozen=True)
class IA3Config:
    """IA3 (Liu et al., 2022): learned rescaling vectors, initialised to 1.

    Non-feedforward targets rescale the output (``y = base(x) * l``), ``feedforward`` targets rescale the
    input (``y = base(x * l)``), as in HF PEFT. ``feedforward`` patterns must also be in ``targets``.
    """

    targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward: tuple[str, ...] = ("down_proj",)
    target_types: tuple[str, ...] = ("Linear",)
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, source=None, /, **fields) -> "IA3Config":
        """From peft's ``IA3`` fields: a dict, an adapter folder, a peft config object, or keywords.

        ``target_modules -> targets``, ``feedforward_modules -> feedforward`` (both required),
        ``exclude_modules -> exclude``.

        Unknown fields and fields metafit cannot honour raise, naming the field; see
        :func:`metafit.peft.hf_import.config_from_hf`.
        """
        from metafit.peft.hf_import import config_from_hf

        return config_from_hf(cls, source, **fields)


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Which PEFT method to apply, with one sub-config per method (YAML: ``{method: lora, lora: {rank: 4}}``).

    ``method`` is a name in :data:`metafit.peft.PEFT_METHODS`: ``lora``, ``dora`` (= LoRA with
    ``use_dora``), ``adapter``, ``prefix``, ``bitfit``, ``ia3``.
    """

    method: str = "lora"
    lora: LoraConfig = LoraConfig()
    adapter: AdapterConfig = AdapterConfig()
    prefix: PrefixConfig = PrefixConfig()
    bitfit: BitFitConfig = BitFitConfig()
    ia3: IA3Config = IA3Config()
