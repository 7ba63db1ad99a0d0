"""Whether a quantizer left the decoder in a shape IntactKV can follow.

IntactKV splices the stored prefix K/V where each attention layer hands its
fresh keys and values to the cache (:mod:`intactkv_modifier.runtime`). Weight
quantizers (GPTQ, quanto, torchao, HQQ) swap linear layers and keep that path;
a quantizer that fuses or replaces the attention itself, drops layers or
changes the KV geometry may not, and a prefix attached to such a model would be
silently ignored, or applied to the wrong layers. So the decoder is described
when the prefix is captured, compared when it is attached, and the attached
prefix is proved to reach every layer's attention by a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from intactkv_modifier.architecture import KVGeometry, attention_modules, decoder_stack, kv_geometry
from intactkv_modifier.devices import execution_device
from intactkv_modifier.runtime import IntactKVRuntime
from intactkv_modifier.storage import prefix_kv_of

__all__ = [
    "DecoderStructure",
    "UnfollowableModelError",
    "check_prefix_reaches_attention",
    "quantization_signs",
    "transformers_model",
]

#: Packages whose modules replace ``nn.Linear`` (or carry quantized weights) when a model is quantized.
_QUANTIZATION_PACKAGES = ("optimum.quanto", "gptqmodel", "auto_gptq", "hqq", "bitsandbytes", "awq", "torchao")
#: ``quantization_config`` methods whose weights are dequantized to floating point when loaded.
_DEQUANTIZED_AT_LOAD = ("gguf",)


class UnfollowableModelError(TypeError):
    """The quantized model is built in a way IntactKV cannot apply its prefix to."""


@dataclass(frozen=True)
class DecoderStructure:
    """What IntactKV relies on in a decoder: its KV geometry and each layer's attention class."""

    model_class: str
    geometry: KVGeometry
    attention_classes: tuple[str, ...]

    @classmethod
    def of(cls, model: PreTrainedModel) -> DecoderStructure:
        return cls(
            model_class=type(model).__name__,
            geometry=kv_geometry(model.config),
            attention_classes=tuple(_qualified_name(a) for a in _attentions(model)),
        )

    def check(self, model: PreTrainedModel) -> None:
        """Raise :class:`UnfollowableModelError` unless ``model`` is built as the captured model was."""
        now = DecoderStructure.of(model)
        if now.geometry != self.geometry:
            raise UnfollowableModelError(
                f"the quantized {now.model_class} has KV geometry {now.geometry}, the model the prefix was captured "
                f"from had {self.geometry}: the prefix K/V cannot belong to it. Attach to the model the prefix was "
                "captured from, quantized by a method that keeps its layers and attention heads."
            )
        changed = [i for i, (a, b) in enumerate(zip(self.attention_classes, now.attention_classes)) if a != b]
        if changed:
            first = changed[0]
            raise UnfollowableModelError(
                f"the quantizer replaced the attention modules of layers {changed} "
                f"({self.attention_classes[first]} -> {now.attention_classes[first]}); IntactKV splices the prefix "
                "where transformers' attention hands its keys and values to the cache and cannot tell whether the "
                "replacement does that. Quantize the linear layers only (keep the model's attention modules), or "
                "leave IntactKV out for this quantizer."
            )


def check_prefix_reaches_attention(model: PreTrainedModel, prefix_token_ids: list[int]) -> None:
    """Prove with forward passes that every layer attends to the attached prefix K/V, or raise why not.

    A layer that never calls the cache's ``update`` is caught by the runtime;
    one that calls it but attends to K/V of its own is caught by changing that
    layer's stored values alone and finding the output after the prefix unchanged.
    """
    runtime = IntactKVRuntime.of(model)
    if runtime is None:
        raise ValueError("the model carries no intact prefix; attach one first")
    stored = prefix_kv_of(model)
    decoder = decoder_stack(model)
    ids = torch.tensor([[*prefix_token_ids, prefix_token_ids[0]]], device=execution_device(decoder))

    def last_hidden() -> torch.Tensor:
        return decoder(input_ids=ids, use_cache=False).last_hidden_state[0, -1]

    with torch.no_grad():
        try:
            reference = last_hidden()
        except RuntimeError as error:
            if "never wrote their KV" not in str(error):
                raise
            raise UnfollowableModelError(
                f"after quantization, {error} Quantize the linear layers only, or leave IntactKV out."
            ) from error
        ignored = []
        for layer, value in enumerate(stored.values):
            values = list(stored.values)
            values[layer] = value + 1.0 + value.abs().max()
            with runtime.overridden(list(stored.keys), values):
                if torch.equal(last_hidden(), reference):
                    ignored.append(layer)
    if ignored:
        raise UnfollowableModelError(
            f"attention layers {ignored} of the quantized model do not attend to the K/V they hand to the cache, so "
            "the stored prefix would be ignored there. Quantize the linear layers only (keep the model's attention "
            "modules), or leave IntactKV out for this quantizer."
        )


def quantization_signs(model: torch.nn.Module) -> list[str]:
    """Why ``model`` looks quantized already (empty when it computes in floating point): for the capture, which
    needs the full-precision model."""
    signs = []
    method = _quantization_method(getattr(model, "config", None))
    if method is not None and method not in _DEQUANTIZED_AT_LOAD:
        signs.append(f"config.quantization_config is {method!r}")
    packages = sorted({_package_of(type(m)) for m in model.modules()} & set(_QUANTIZATION_PACKAGES))
    signs += [f"it holds {package} modules" for package in packages]
    if any(getattr(m, "quantization_scheme", None) is not None for m in model.modules()):
        signs.append("llm-compressor quantization schemes are attached")
    subclassed = sorted({type(p.data).__name__ for p in model.parameters() if type(p.data) is not torch.Tensor})
    signs += [f"its weights are {name} tensors" for name in subclassed]
    return signs


def transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model itself: ``model``, or the one a quantizer's wrapper holds (optimum-quanto's
    ``QuantizedModelForCausalLM`` keeps it in ``_wrapped``)."""
    if isinstance(model, PreTrainedModel):
        return model
    wrapped = vars(model).get("_wrapped")
    if isinstance(wrapped, PreTrainedModel):
        return wrapped
    raise TypeError(
        f"IntactKV applies to transformers models (PreTrainedModel); got {type(model).__name__}. Pass the "
        "transformers model the quantizer worked on."
    )


def _attentions(model: PreTrainedModel) -> list[torch.nn.Module]:
    try:
        return attention_modules(model)
    except TypeError as error:
        raise UnfollowableModelError(
            f"IntactKV cannot find the attention layers of this {type(model).__name__}: {error} If a quantizer "
            "changed the decoder's layers, quantize the linear layers only, or leave IntactKV out."
        ) from error


def _qualified_name(cls_or_module: object) -> str:
    cls = type(cls_or_module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _package_of(cls: type) -> str:
    module = cls.__module__
    return next((package for package in _QUANTIZATION_PACKAGES if module.startswith(package)), module)


def _quantization_method(config: object) -> str | None:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(
        quantization, "quant_method", None
    )
    return str(getattr(method, "value", method))
