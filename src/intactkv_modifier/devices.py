"""Where a module computes, with or without compressed-tensors.

llm-compressor offloads weights through compressed-tensors, whose
``get_execution_device`` knows the onload device of an offloaded module; a
model quantized by optimum, quanto or a transformers quantizer never carries
that offloading, and its environment may lack compressed-tensors altogether.
"""

from __future__ import annotations

import torch

__all__ = ["execution_device"]


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device inputs must be on before ``module`` runs: compressed-tensors' answer where it is installed,
    else accelerate's hook's, else the first materialised parameter's (the CPU for a module without one)."""
    try:
        from compressed_tensors.offload import get_execution_device
    except ImportError:
        get_execution_device = None
    if get_execution_device is not None:
        return get_execution_device(module)
    hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device)
    for parameter in module.parameters():
        if not parameter.is_meta:
            return parameter.device
    return torch.device("cpu")
