"""`mnist-edge export`: a thin shell around export.pipeline.run and export.check.run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnist_edge.export.proxies import ProxySpec
from mnist_edge.export.verify import Budgets


def build_parser() -> argparse.ArgumentParser:
    b = Budgets()
    p = argparse.ArgumentParser(
        prog="mnist-edge export",
        description=(
            "Export a training checkpoint to ONNX fp32 and int8, prove on the full MNIST test set that int8 still "
            "agrees with PyTorch, and only then publish content-addressed models and manifest.json to --out. "
            "Exit 0: published; 1: a budget was missed (report says which, --out untouched); 2: bad input."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint written by `mnist-edge train`")
    p.add_argument("--out", type=Path, default=Path("models"), help="models directory to publish into")
    p.add_argument("--report-dir", type=Path, default=Path("reports/export"), help="where report.json, report.md and pictures go (success or failure)")
    p.add_argument("--version", type=int, default=None, help="model version to record (an integer; required for export)")
    # Budgets have no argparse default so --check can tell "given" from "not given" (then the
    # manifest's recorded value applies); export fills in Budgets()' defaults.
    p.add_argument("--min-accuracy", type=float, default=argparse.SUPPRESS, help=f"gate: int8 test accuracy at least (fraction; default {b.min_accuracy})")
    p.add_argument("--max-drop", type=float, default=argparse.SUPPRESS, help=f"gate: fp32 accuracy minus int8 accuracy at most (fraction; default {b.max_drop})")
    p.add_argument("--min-agreement", type=float, default=argparse.SUPPRESS, help=f"gate: int8 vs PyTorch top-1 agreement at least (fraction; default {b.min_agreement})")
    p.add_argument("--min-digit-accuracy", type=float, default=argparse.SUPPRESS,
                   help=f"gate: accuracy of the worst digit on each held-out proxy split at least (fraction; default {b.min_digit_accuracy})")
    p.add_argument("--proxy-per-digit", type=int, default=None, metavar="N",
                   help=f"synthetic handwritten digits per class in each proxy split (default {ProxySpec().handwriting_per_digit}; 0 = skip)")
    p.add_argument("--fonts-per-digit", type=int, default=None, metavar="N",
                   help=f"font-rendered digits per class in each font proxy split (default {ProxySpec().fonts_per_digit}; 0 = skip)")
    p.add_argument("--workers", type=int, default=2, help="processes rendering the proxy splits")
    p.add_argument("--fallback", action=argparse.BooleanOptionalAction, default=True, help="try the documented remedies when int8 misses a budget")
    p.add_argument("--max-fp32-layers", type=int, default=2, help="fallback: at most this many layers kept in fp32")
    p.add_argument("--calibration-size", type=int, default=2000, help="training images used for calibration")
    p.add_argument("--calibration-seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--data-dir", default=None, help="directory holding the MNIST IDX files (else MNIST_EDGE_DATA_DIR, the cache, download)")
    p.add_argument("--offline", action="store_true", help="never download MNIST")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True, help="measure onnxruntime latency for the report")
    p.add_argument("--sign", type=Path, default=None, metavar="KEY", help="Ed25519 private key (PEM): write manifest.json.sig")
    p.add_argument("--check", type=Path, default=None, metavar="MODELS",
                   help="re-verify a published models/ directory (hashes, golden images, the gate with the budgets recorded in its manifest) instead of exporting")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: getattr(args, k) for k in ("min_accuracy", "max_drop", "min_agreement", "min_digit_accuracy") if hasattr(args, k)}
    if args.check is not None:
        from mnist_edge.export import check

        return check.main(args.check, given, data_dir=args.data_dir, offline=args.offline)
    budgets = Budgets.from_dict({**Budgets().to_dict(), **given})
    d = ProxySpec()
    spec = ProxySpec(
        handwriting_per_digit=d.handwriting_per_digit if args.proxy_per_digit is None else args.proxy_per_digit,
        fonts_per_digit=d.fonts_per_digit if args.fonts_per_digit is None else args.fonts_per_digit,
    )
    if args.checkpoint is None or args.version is None:
        parser.error("export needs --checkpoint CKPT and --version N (or --check MODELS)")
    if args.version < 0:
        parser.error(f"--version must be a non-negative integer, got {args.version}")
    if not args.checkpoint.is_file():
        print(f"mnist-edge export: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    from mnist_edge.export.pipeline import ExportConfig, run

    cfg = ExportConfig(
        checkpoint=args.checkpoint,
        out=args.out,
        report_dir=args.report_dir,
        version=args.version,
        budgets=budgets,
        data_dir=args.data_dir,
        offline=args.offline,
        calibration_size=args.calibration_size,
        calibration_seed=args.calibration_seed,
        fallback=args.fallback,
        max_fp32_layers=args.max_fp32_layers,
        measure_latency=args.latency,
        sign_key=args.sign,
        proxy=spec,
        workers=args.workers,
    )
    return run(cfg).exit_code


if __name__ == "__main__":
    sys.exit(main())
