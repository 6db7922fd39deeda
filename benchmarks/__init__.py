"""Benchmarks of resnet_jax (run from a checkout: python -m benchmarks.NAME)."""
import sys


def import_torch(prog: str):
    """PyTorch, or None after one line naming the install (the entry point then exits 2)."""
    try:
        import torch
    except ImportError:
        print(f"{prog}: error: PyTorch is not installed: pip install -e '.[torch]'",
              file=sys.stderr)
        return None
    return torch
