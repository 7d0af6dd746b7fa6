"""Session set-up that must happen before any test module imports ryzlab."""
import os

import torch

# Triton decides when a kernel is decorated (@triton.jit, at import of ryzlab.kv.triton.*) whether
# it runs in its interpreter. Any test may import those modules first, so the choice is made here,
# once: without a GPU the kernels run on CPU tensors in the interpreter (TRITON_INTERPRET=1).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
