"""Real images that ship offline inside packages, as tensors.

(The full data-set layer — Fashion-MNIST, MNIST, textures, faces, photos, image folders,
mixtures, transforms — is tracked in the data issue; this module starts with the sources
the demo needs.)
"""

from .sources import TensorSplits, load_digits, load_fashion_mnist, read_idx

__all__ = ["TensorSplits", "load_digits", "load_fashion_mnist", "read_idx"]
