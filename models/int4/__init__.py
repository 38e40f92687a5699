"""Int4 inference: quantized linear layers on real int4 kernels, and loading GPTQ checkpoints onto them."""

from .embedding import QuantEmbedding, QuantTiedHead
from .linear import (
    KERNEL_CHOICES,
    KERNELS,
    DequantLinear,
    GemliteLinear,
    KernelName,
    KernelUnavailableError,
    QuantLinear,
    kernel_for,
)
from .loading import load_quantized, model_weight_bytes, quantize_linears_in_place

__all__ = [
    "KERNELS",
    "KERNEL_CHOICES",
    "DequantLinear",
    "GemliteLinear",
    "KernelName",
    "KernelUnavailableError",
    "QuantEmbedding",
    "QuantLinear",
    "QuantTiedHead",
    "kernel_for",
    "load_quantized",
    "model_weight_bytes",
    "quantize_linears_in_place",
]
