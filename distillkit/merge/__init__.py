"""Model merging: in-place weighted averaging, TIES, DARE, streaming safetensors merge, and the
distributed average MoT uses when each rank trains one branch."""
from distillkit.merge.average import average_
from distillkit.merge.checkpoint import merge_checkpoints
from distillkit.merge.distributed import all_reduce_average_
from distillkit.merge.ties_dare import dare, ties

__all__ = ["average_", "ties", "dare", "merge_checkpoints", "all_reduce_average_"]
