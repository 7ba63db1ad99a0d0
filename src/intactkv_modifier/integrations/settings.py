"""What a quantizer-neutral IntactKV run is asked to do: which prefix, and whether to calibrate it.

The same fields as :class:`~intactkv_modifier.IntactKVModifier`'s prefix and
calibration options, so a recipe and an optimum or quanto script say the same
thing the same way.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from intactkv_modifier.calibration import CalibrationSettings

__all__ = ["IntactKVSettings"]


class IntactKVSettings(BaseModel):
    """The prefix to keep intact and, optionally, IntactKV+Cal's settings.

    :param prefix_token_ids: explicit prefix ids (e.g. ``[2]``)
    :param prefix_text: fixed text every prompt starts with (a chat template's
        system prompt), tokenized with the model's tokenizer, special tokens included
    :param calibration: fit the stored K/V after quantization (IntactKV+Cal); the
        full-precision targets are recorded at capture, on the calibration data given there

    With neither prefix field set, the prefix is the tokenizer's ``[BOS]``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix_token_ids: list[int] | None = Field(default=None, min_length=1)
    prefix_text: str | None = Field(default=None, min_length=1)
    calibration: CalibrationSettings | None = None

    @model_validator(mode="after")
    def _one_prefix_source(self) -> IntactKVSettings:
        if self.prefix_token_ids is not None and self.prefix_text is not None:
            raise ValueError("Set either `prefix_token_ids` or `prefix_text`, not both.")
        return self
