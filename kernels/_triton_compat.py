"""Triton CPU-interpreter (TRITON_INTERPRET=1) workarounds shared by every kernel module.

The compiled GPU path never needs these; they let the CPU tests run the real kernels.
"""
import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def ensure_interpreter_compat() -> None:
    """Let TRITON_INTERPRET=1 run loops whose bounds are loaded scalars under NumPy >= 2.4.

    The Triton 3.6 interpreter stores every scalar as a 1-element array and implements __index__ as
    int(array), which NumPy 2.4 rejects for ndim > 0: `for b in range(0, hi)` with a loaded bound
    fails on the CPU interpreter. Idempotent.
    """
    if not interpreting():
        return
    from triton.runtime import interpreter

    if getattr(interpreter, "_msa_index_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._msa_index_patched = True


def fp32_products() -> bool:
    """Whether fp32 tl.dot operands must multiply in IEEE fp32: torch's own switch for fp32 matmuls
    decides (torch.set_float32_matmul_precision / torch.backends.cuda.matmul.allow_tf32; default
    "highest" = fp32), so fp32 training means fp32 attention and index scores too."""
    import torch

    return torch.get_float32_matmul_precision() == "highest"
