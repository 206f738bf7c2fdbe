#!/usr/bin/env python3
"""One mask prediction at a Wan shape, for Nsight Compute: ncu -k regex:SelectKernel ... python3 this."""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_sparge import structured_qk  # noqa: E402

torch.ops.load_library(sys.argv[1])
H, L = (12, 32760) if len(sys.argv) < 3 or sys.argv[2] == "1.3B" else (40, 75600)
q, k = structured_qk(1, L, H, 128, seed=L)
knobs = [torch.tensor([4], dtype=torch.int32, device="cuda"), torch.tensor([0.03], device="cuda"),
         torch.tensor([0.3], device="cuda")]
for _ in range(2):
    torch.ops.sparge.predict_block_mask(q, k, *knobs, 128, 128)
torch.cuda.synchronize()
