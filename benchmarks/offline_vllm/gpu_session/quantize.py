"""GPU machine: quantize a prepared model with a recipe on saved calibration windows (the CPU runs' windows)."""
import sys
from pathlib import Path

import torch

import intactkv_modifier  # noqa: F401
from intactkv_modifier.export import quantize_to_checkpoint

src, recipe, out, windows_file, count, length = sys.argv[1:7]
windows = torch.load(windows_file)["calibration"][: int(count), : int(length)]
torch.manual_seed(0)
print(quantize_to_checkpoint(src, Path(recipe), Path(out), windows, dtype=torch.float32))
