"""mnist-edge: MNIST from PyTorch training to an int8 ONNX model served over gRPC."""

from pathlib import Path as _Path

__version__ = "0.3.0"

# In a source checkout the stage folders (server/, client/, training/, ...) sit beside this
# package, and pyproject's package-dir maps them to mnist_edge.<stage> only once installed.
# Looking for sub-packages in the checkout's root too lets a tree run its own code: `python -m
# mnist_edge` from an uninstalled checkout, and bench.ab's worktrees of other revisions while
# another checkout is installed in editable mode. An installed wheel has no pyproject.toml
# beside it, so nothing changes there.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "server" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821 (a package's __path__ exists at import time)
del _Path, _root
