"""Session-wide test setup: Triton's CPU interpreter for the fused-MLP kernels.

Without a CUDA device, tests/test_fused_mlp.py runs clipforge's Triton kernels in Triton's
interpreter (TRITON_INTERPRET=1). Triton reads the variable when its own library functions
(``tl.cdiv``, ``tl.sum``, ...) are decorated, i.e. when triton is first imported, and other test
modules import torch's compiler stack (which imports triton) at collection: so it is set here,
before any test module is imported. Nothing else in the tests runs Triton on a CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
