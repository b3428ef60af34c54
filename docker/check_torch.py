"""Run at image build time, after torch and torchvision are installed: refuse a torchvision built
for another torch. A mismatched pair imports and passes `python -m job --help`, then fails every
image run (its C++ ops, decode_jpeg among them, do not load: "operator torchvision::nms does not
exist"), which the job can only report as exit 1."""

import sys

import torch
import torchvision
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.ops import nms

try:
    nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # the compiled ops library
    decode_jpeg(encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8)))  # the image library (libjpeg)
except (RuntimeError, OSError) as exc:
    sys.exit(
        f"torchvision {torchvision.__version__} does not work with torch {torch.__version__} ({exc}); "
        "install the torchvision release made for this torch (TORCHVISION_VERSION) from the same index"
    )
print(f"torch {torch.__version__} and torchvision {torchvision.__version__} work together")
