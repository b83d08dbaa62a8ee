"""The `mnist-edge` command: one entry point, one subcommand per stage.

Each subcommand imports only its own stage when it runs, so `mnist-edge serve`
on a device never imports torch, and a missing optional extra is reported with
the exact install line instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with `main(argv) -> int`, extra it needs, one-line help)
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "train": ("mnist_edge.training.train", "train", "train the MLP on MNIST and write a checkpoint"),
    "export": ("mnist_edge.export.cli", "train", "export a checkpoint to ONNX fp32 + int8, gate it, write models/"),
    "serve": ("mnist_edge.server.cli", None, "serve a model over gRPC (Open Inference Protocol + native API)"),
    "keygen": ("mnist_edge.export.signing", "sign", "make an Ed25519 key pair for signing models"),
    "classify": ("mnist_edge.client.cli", None, "classify image or IDX files through a running server"),
    "health": ("mnist_edge.client.health_cli", None, "check a server's health (exit 0 only when SERVING)"),
    "bench": ("mnist_edge.bench.cli", None, "benchmark the server against the transport and compute floors"),
    "label": ("mnist_edge.client.label", None, "label captured digits in the terminal (keys 0-9, s, x, u, q)"),
    "captures": ("mnist_edge.server.capture", None, "manage field captures: captures purge DIR [--before DATE]"),
}

# Modules whose absence means an optional extra is not installed.
_EXTRA_MODULES = {"torch", "onnx", "onnxscript", "tqdm", "cryptography"}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mnist-edge COMMAND [options]   (mnist-edge COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from mnist_edge import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"mnist-edge: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, extra, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if extra and missing in _EXTRA_MODULES:
            print(
                f"mnist-edge {name} needs the '{extra}' extra ({missing} is not installed). Install it with:\n"
                f"    pip install 'mnist-edge[{extra}]'    (from a checkout: pip install -e '.[{extra}]')",
                file=sys.stderr,
            )
            return 3
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
