"""Expert kernels: how the E MLPs of :class:`~visionmoe.moe.experts.Experts` run on rows
sorted by expert. One module per kernel; ``Experts`` picks one (``impl``):

- :mod:`.fused` (CPU default): one autograd node, buffers reused, experts one after another
  or in parallel over the threads in the compiled loop of :mod:`visionmoe.moe.native`
  (:mod:`.threads`);
- :mod:`.grouped`: ``grouped_forward`` (``torch._grouped_mm``, CUDA default) and
  ``split_forward`` (plain autograd, one matmul per expert: dropout, GLU, ``torch.compile``).
"""

from .fused import FusedOptions, fused_experts, scatter_rows
from .grouped import grouped_forward, grouped_mm_available, grouped_mm_ok, split_forward
from .threads import MIN_THREADED_WORK, SCRATCH, THREAD_MODES, check_mode, clear_scratch

__all__ = ["FusedOptions", "fused_experts", "scatter_rows", "grouped_forward", "grouped_mm_available",
           "grouped_mm_ok", "split_forward", "MIN_THREADED_WORK", "SCRATCH", "THREAD_MODES", "check_mode",
           "clear_scratch"]
