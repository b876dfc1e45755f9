"""Quantization-aware training: the student trains with fake-quantized weights, then becomes the
quantized build it was trained to be.

``prepare`` swaps every ``nn.Linear`` of the decoder for torchao's ``FakeQuantizedLinear``: the
forward pass rounds each weight to int``bits`` in groups of ``group_size`` along the input dimension
(symmetric, one scale per group), the backward pass goes straight through the rounding (STE) to the
float weights, which the optimizer updates. The fake quantizer is derived by torchao from the same
``IntxWeightOnlyConfig`` that `distill export --to torchao --quant int4` applies, so the model the
loss sees is the model that is deployed. The embedding and the output head stay in float: the
export leaves them so (transformers' ``TorchAoConfig`` skips the output embeddings), and the fused
chunked loss reads the head's weight directly.

``to_float`` swaps the modules back (the float master); ``distill.training`` saves it and builds the
quantized student from it with ``distill.export.torchao_build``.
"""

from __future__ import annotations

from torch import nn

from distill.errors import UserError

QAT_BITS = (4,)


def quantized_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers a torchao build quantizes: all but the output head."""
    head = model.get_output_embeddings()
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def check_settings(bits: int, group_size: int) -> None:
    """Refuse, with one line, settings the fake quantizer does not take (config validation calls this too)."""
    if bits not in QAT_BITS:
        raise UserError(f"train.qat.bits={bits}: quantization-aware training supports int4 weights (bits: 4), the "
                        "torchao int4 build's quantizer; int8 loses too little to need it (BENCHMARKS.md, Export)")
    if group_size < 1 or group_size & (group_size - 1):
        raise UserError(f"train.qat.group_size must be a power of two, got {group_size}")


def check_qat(model: nn.Module, bits: int, group_size: int) -> None:
    """Refuse, with one line, what the fake quantizer cannot do for ``model``."""
    check_settings(bits, group_size)
    for name in quantized_linears(model):
        width = model.get_submodule(name).in_features
        if width % group_size:
            raise UserError(f"train.qat.group_size={group_size} does not divide the input width {width} of {name}; "
                            "choose a group size that divides every linear layer's input width")


def prepare(model: nn.Module, bits: int = 4, group_size: int = 32) -> nn.Module:
    """Swap ``model``'s quantized linears (in place) for fake-quantized ones; returns ``model``."""
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig
    except ImportError:
        raise UserError("train.qat needs torchao: pip install torchao (or pip install 'distill[export]')") from None
    from distill.export.torchao_build import torchao_config

    check_qat(model, bits, group_size)
    names = set(quantized_linears(model))
    quantize_(model, QATConfig(torchao_config("int4", group_size), step="prepare"),
              filter_fn=lambda module, fqn: fqn in names)
    return model


def is_prepared(model: nn.Module) -> bool:
    from torchao.quantization.qat import FakeQuantizedLinear

    return any(isinstance(m, FakeQuantizedLinear) for m in model.modules())


def to_float(model: nn.Module) -> nn.Module:
    """Swap fake-quantized linears back to ``nn.Linear`` (in place), keeping their float weights."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    quantize_(model, QATConfig(step="convert"), filter_fn=lambda module, fqn: isinstance(module, FakeQuantizedLinear))
    return model
