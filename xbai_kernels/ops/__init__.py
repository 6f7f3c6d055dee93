"""SPRM ops: ``reference`` (plain PyTorch, the oracle), ``triton``, ``cuda``; ``dispatch`` picks one."""
