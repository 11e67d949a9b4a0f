"""Helpers shared by the kernel launchers, and their contract.

Every ``kernels/<op>.py`` exposes launchers named for the op's kernel-level steps (``forward`` /
``backward`` for class_attention and mask_logits; ``upsampled_ce``, ``upsampled_argmax``,
``merge_scores``, and the loss's ``log_sum_scores``, ``log_sum_grad``, ``learner_map``,
``learner_grads`` and ``combine_grads`` for the ensemble ops, which senformer._C provides for the CPU
under the same names and contracts, csrc/ops.h; its CUDA build has only the full-resolution steps
so far). A launcher takes tensors and Python
scalars and returns new tensors (or writes an explicit ``out=``); it never writes into an argument,
never synchronises with the host, runs on its inputs' device (``on_input_device``), allocates outputs
and scratch through ``alloc`` (tests swap in a NaN fill to prove every element is written) and picks
its launch configuration in a
``_*config`` function of the problem sizes, dtype and interpreter mode, so tests/sm90_compile.py can
enumerate what ships. A module whose older design (a variant) leaves a step to the op's plain-torch
path says so in ``unused_steps()``.

Importing this module (every kernel module does) also fixes triton <= 3.6's interpreter under
numpy >= 2.4 (``patch_interpreter_index``)."""
from __future__ import annotations

import contextlib
import functools
import os

import torch


def alloc(shape, dtype, device) -> torch.Tensor:
    """Every output and scratch buffer of a launcher (uninitialised)."""
    return torch.empty(shape, dtype=dtype, device=device)


def padded_rows(n: int, row_align: int) -> int:
    """The row stride of a channels-last grid of n classes whose rows are padded to row_align."""
    return -(-n // row_align) * row_align if row_align > 1 else n


def interpret() -> bool:
    """Whether Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(x: int, lo: int = 16) -> int:
    """The next power of two >= x (at least ``lo``): Triton block sizes."""
    import triton  # only kernel modules (which import triton) call this

    return max(lo, triton.next_power_of_2(int(x)))


@functools.lru_cache(maxsize=None)
def cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def on_input_device(fn):
    """Run a launcher with its first tensor argument's CUDA device current.

    Triton launches on the *current* CUDA device, not on the device of the tensors it is given: a
    tensor on cuda:1 launched from a process whose current device is cuda:0 reads foreign memory
    (an illegal address at best). Buffers the launcher allocates follow the same guard."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)

    return wrapper


class Designs:
    """The kernel designs a launcher module ships (``names[0]`` the default) and the one in use.

    A module exposes ``VARIANTS = designs.names``, ``use_variant = designs.use`` and
    ``current_variant = designs.current``; benchmarks add a ``triton[<name>]`` row per older design
    until a GPU run has measured them, then the loser goes. The choice is module-global, not
    thread-local, on purpose: autograd runs a CUDA backward on its own device thread, which must see
    the same design as the forward."""

    def __init__(self, op: str, names: tuple[str, ...]):
        self.op, self.names, self._current = op, tuple(names), names[0]

    def current(self) -> str:
        return self._current

    @contextlib.contextmanager
    def use(self, name: str):
        """Run the module's launchers with design ``name`` inside the block."""
        if name not in self.names:
            raise ValueError(f"{self.op}: unknown variant {name!r}; expected one of {self.names}")
        prev, self._current = self._current, name
        try:
            yield
        finally:
            self._current = prev


def patch_interpreter_index() -> None:
    """Make triton's CPU interpreter take scalar kernel arguments as loop bounds under numpy >= 2.4.

    The interpreter holds a scalar argument as a one-element 1-D array; triton <= 3.6 turns it into
    a Python int with ``int(array)``, which numpy 2.4 refuses for arrays with a dimension ("only
    0-dimensional arrays can be converted to Python scalars"), so every ``range(n)`` over a runtime
    argument fails. Later triton squeezes the array first; this gives older triton that same
    ``__index__``. Only the interpreter's language patching is touched (GPU launches never run
    it), and only for the duration of each interpreted launch, as triton's own patches are."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_senformer_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._senformer_index_fix = True
    interpreter._patch_lang_tensor = patched


patch_interpreter_index()
