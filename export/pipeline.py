"""The export stage: checkpoint -> fp32 ONNX -> int8 ONNX -> gate -> models/.

`run(cfg) -> ExportOutcome` does everything; nothing is written to `cfg.out` unless
every check passed, and the report is written to `cfg.report_dir` either way.

Accuracy-aware fallback. When the int8 model misses a budget, these remedies are
tried in order, each a fresh quantization of the same fp32 model, until one passes:

1. `minmax`: MinMax calibration (the default; the shipped model must pass here);
2. `percentile`: Percentile calibration (99.999th), which clips activation outliers;
3. `entropy`: Entropy (KL-divergence) calibration;
4. `keep-fp32:<layer>`: the layer that adds the most quantization error, measured as
   the SQNR it loses between its input and its output (fp32 vs int8 on calibration
   images), is kept in fp32, on top of the best calibration so far; repeated up to
   `max_fp32_layers` times.

The report lists every attempt with its figures; the manifest lists any layer kept
in fp32.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mnist_edge.export import manifest as mf
from mnist_edge.export import proxies
from mnist_edge.export import report as rpt
from mnist_edge.export.verify import (
    Budgets,
    GateResult,
    Predictions,
    changed_predictions,
    check_fp32,
    check_int8,
    ort_predict,
    session,
    torch_predict,
)


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path
    out: Path
    report_dir: Path
    version: int = 1
    budgets: Budgets = field(default_factory=Budgets)
    data_dir: str | None = None
    offline: bool = False
    calibration_size: int = 2000
    calibration_seed: int = 0
    fallback: bool = True
    max_fp32_layers: int = 2
    golden_per_digit: int = 2
    measure_latency: bool = True
    sign_key: Path | None = None
    proxy: proxies.ProxySpec = field(default_factory=proxies.ProxySpec)
    workers: int = 2  # processes rendering the proxy splits


@dataclass
class ExportOutcome:
    passed: bool
    report: dict[str, Any]
    manifest: dict[str, Any] | None = None
    exit_code: int = 0


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    from mnist_edge import __version__

    return {
        "mnist-edge": __version__,
        "torch": str(torch.__version__),
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _latency_us(model_bytes: bytes, images: np.ndarray) -> dict[str, float]:
    sess = session(model_bytes, threads=1)

    def median_run(x: np.ndarray, n: int) -> float:
        for _ in range(5):
            sess.run(None, {"pixels": x})
        times = []
        for _ in range(n):
            t = time.perf_counter()
            sess.run(None, {"pixels": x})
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1e6)

    return {"batch_1": median_run(images[:1], 300), "batch_1024": median_run(images[:1024], 15)}


def _attempt_record(name: str, qcfg, gate: GateResult, labels: np.ndarray, fp32: Predictions, int8: Predictions, torch_p: Predictions) -> dict[str, Any]:
    return {
        "name": name,
        "config": qcfg.describe(),
        "passed": gate.passed,
        "accuracy": int8.accuracy(labels),
        "drop": fp32.accuracy(labels) - int8.accuracy(labels),
        "agreement_with_torch": float((int8.digits == torch_p.digits).mean()),
        "agreement_with_fp32": float((int8.digits == fp32.digits).mean()),
        "gate": gate.to_dict(),
    }


def _ladder(base) -> list[tuple[str, Any]]:
    from mnist_edge.export.quantize import Calibration

    return [
        ("minmax", replace(base, calibration=Calibration.MINMAX)),
        ("percentile", replace(base, calibration=Calibration.PERCENTILE)),
        ("entropy", replace(base, calibration=Calibration.ENTROPY)),
    ]


def _held_out_captures(ckpt: dict[str, Any], int8_bytes: bytes, log: Callable[[str], None]) -> dict[str, Any] | None:
    """A fine-tune's held-out field captures (docs/field-loop.md): the accuracy its training
    recorded before and after, and the int8 model's own, read again from the capture folders
    when they are still here. Reported next to MNIST; the gate is MNIST's and the proxies'."""
    recorded = (ckpt.get("metrics") or {}).get("captures")
    if not recorded:
        return None
    out = dict(recorded)
    try:
        from mnist_edge.training import captures

        _, held = captures.load(recorded["folders"], recorded["held_out_share"])
    except (OSError, ValueError) as exc:
        log(f"held-out captures not re-read ({exc}); the training run's figures are reported")
        return out
    if len(held):
        out["held_out_accuracy_int8"] = ort_predict(int8_bytes, held.images).accuracy(held.labels)
    return out


def run(cfg: ExportConfig, log: Callable[[str], None] = print, quantizer: Callable | None = None) -> ExportOutcome:
    """Export, gate and (if it passes) publish. `quantizer` replaces export.quantize.quantize in tests."""
    import onnx

    from mnist_edge.export import onnx_export
    from mnist_edge.export import quantize as q
    from mnist_edge.training import data as mnist_data
    from mnist_edge.training.train import load_checkpoint

    quantize_fn = quantizer or q.quantize
    report: dict[str, Any] = {
        "passed": False,
        "published": False,
        "checkpoint": str(cfg.checkpoint),
        "out": str(cfg.out),
        "report_dir": str(cfg.report_dir),
        "version": str(cfg.version),
        "budgets": cfg.budgets.to_dict(),
        "attempts": [],
    }
    outcome = ExportOutcome(passed=False, report=report, exit_code=1)
    test_images = test_labels = None
    proxy_sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        report["versions"] = _versions()
        mlp, ckpt = load_checkpoint(cfg.checkpoint)
        ds = mnist_data.load(cfg.data_dir, offline=cfg.offline, log=log)
        if ckpt.get("data_sha256") and ckpt["data_sha256"] != ds.sha256:
            raise ValueError("the checkpoint was trained on data whose sha256 differs from the verified MNIST files")
        test_images, test_labels = ds.test.images, ds.test.labels.astype(np.int64)
        calibration = q.calibration_sample(ds.train.images, cfg.calibration_size, cfg.calibration_seed)
        report["calibration"] = {"source": "MNIST training images", "size": int(len(calibration)), "seed": cfg.calibration_seed}
        report["model_config"] = ckpt["model_config"]
        from mnist_edge.imaging.normalize import NORMALISER_VERSION

        # Checkpoints from before the normaliser had versions were trained for version 1.
        normaliser = int(ckpt.get("normaliser_version", 1))
        if normaliser != NORMALISER_VERSION:
            raise ValueError(
                f"the checkpoint was trained for imaging normaliser version {normaliser}, but this mnist-edge "
                f"normalises pictures with version {NORMALISER_VERSION} and its server refuses models made for "
                "another; retrain with `mnist-edge train`"
            )
        report["normaliser_version"] = normaliser

        torch_p = torch_predict(mlp, test_images)
        with tempfile.TemporaryDirectory(prefix="mnist-edge-export-") as tmp:
            fp32_path = Path(tmp) / "fp32.onnx"
            fp32_model = onnx_export.export_fp32(mlp, fp32_path)
            fp32_p = ort_predict(fp32_path, test_images)
            report["accuracy"] = {"torch": torch_p.accuracy(test_labels), "fp32": fp32_p.accuracy(test_labels)}
            fp32_gate = check_fp32(torch_p, fp32_p, cfg.budgets)
            report["fp32_check"] = fp32_gate.to_dict()
            if not fp32_gate.passed:
                report["error"] = "fp32 ONNX does not match PyTorch; not quantizing"
                return outcome

            base = q.QuantConfig()
            plan = _ladder(base) if cfg.fallback else _ladder(base)[:1]
            best: tuple[float, Any, Path, dict[str, Any], Predictions] | None = None
            passed_attempt: tuple[dict[str, Any], Any, Path, Predictions] | None = None
            attempt_no = 0

            def try_config(name: str, qcfg) -> tuple[dict[str, Any], Path, Predictions]:
                nonlocal attempt_no
                attempt_no += 1
                path = Path(tmp) / f"int8-{attempt_no}.onnx"
                log(f"int8 attempt {attempt_no}: {name}")
                quantize_fn(fp32_path, path, qcfg, calibration)
                pred = ort_predict(path, test_images)
                gate = check_int8(test_labels, fp32_p, pred, torch_p, cfg.budgets)
                record = _attempt_record(name, qcfg, gate, test_labels, fp32_p, pred, torch_p)
                report["attempts"].append(record)
                return record, path, pred

            for name, qcfg in plan:
                record, path, pred = try_config(name, qcfg)
                if best is None or record["agreement_with_torch"] > best[0]:
                    best = (record["agreement_with_torch"], qcfg, path, record, pred)
                if record["passed"]:
                    passed_attempt = (record, qcfg, path, pred)
                    break

            excluded: tuple[str, ...] = ()
            while passed_attempt is None and cfg.fallback and best is not None and len(excluded) < cfg.max_fp32_layers:
                _, best_cfg, best_path, best_record, _ = best
                errors = q.layer_errors(fp32_model, onnx.load(str(best_path)), calibration[:500])
                best_record["layer_errors"] = [e.__dict__ for e in errors.layers]
                worst = errors.worst(exclude=excluded)
                if worst is None:
                    break
                excluded = excluded + (worst.layer,)
                qcfg = best_cfg.with_excluded(*excluded)
                record, path, pred = try_config(f"keep-fp32:{','.join(excluded)} ({best_cfg.calibration.value})", qcfg)
                if record["agreement_with_torch"] > best[0]:
                    best = (record["agreement_with_torch"], qcfg, path, record, pred)
                else:  # keep excluding on top of the better configuration, with this layer added
                    best = (best[0], qcfg, path, record, pred)
                if record["passed"]:
                    passed_attempt = (record, qcfg, path, pred)

            def final_section(name: str, qcfg, path: Path, pred: Predictions) -> dict[str, Any]:
                return {
                    "name": name,
                    "confusion": pred.confusion(test_labels).tolist(),
                    "per_class_accuracy": pred.per_class_accuracy(test_labels),
                    "changed_vs_torch": changed_predictions(test_labels, torch_p, pred),
                    "changed_vs_fp32": changed_predictions(test_labels, fp32_p, pred),
                    "int8_wrong": [
                        {"index": int(i), "label": int(test_labels[i]), "after": int(pred.digits[i])}
                        for i in np.flatnonzero(pred.digits != test_labels)
                    ],
                    "fp32_layers": list(qcfg.nodes_to_exclude),
                    "weight_sources": q.quantized_weight_sources(onnx.load(str(path))),
                }

            if passed_attempt is None:
                report["error"] = "no int8 attempt met every budget; models/ left untouched"
                if best is not None:
                    # Show the best failed attempt in full, so people can see what went wrong.
                    report["final"] = final_section(best[3]["name"], best[1], best[2], best[4])
                    report["final"]["failed"] = True
                return outcome

            record, qcfg, int8_path, int8_p = passed_attempt
            report["accuracy"]["int8"] = int8_p.accuracy(test_labels)
            report["final"] = final_section(record["name"], qcfg, int8_path, int8_p)

            # Stamp metadata into both files, then take their final bytes.
            int8_model = onnx.load(str(int8_path))
            common = {
                "model_name": mf.MODEL_NAME,
                "model_version": str(cfg.version),
                "input_convention": mf.PIXEL_CONVENTION,
                "training_data_sha256": ",".join(f"{k}={v}" for k, v in sorted(ds.sha256.items())),
                "fp32_test_accuracy": f"{fp32_p.accuracy(test_labels):.6f}",
                "int8_test_accuracy": f"{int8_p.accuracy(test_labels):.6f}",
                "int8_agreement_with_torch": f"{record['agreement_with_torch']:.6f}",
                "exporter_versions": ",".join(f"{k}={v}" for k, v in sorted(report["versions"].items())),
                "model_config": ",".join(str(h) for h in ckpt["model_config"]["hidden"]),
            }
            onnx_export.set_metadata(fp32_model, {**common, "precision": "fp32"})
            onnx_export.set_metadata(
                int8_model,
                {**common, "precision": "int8", "quantization": ";".join(f"{k}={v}" for k, v in sorted(qcfg.describe().items()))},
            )
            fp32_bytes = onnx_export.serialize(fp32_model)
            int8_bytes = onnx_export.serialize(int8_model)
            # The stamped bytes are what ships: check they still compute the same thing.
            if not np.array_equal(ort_predict(int8_bytes, test_images[:2000]).digits, int8_p.digits[:2000]):
                raise RuntimeError("int8 model changed its predictions after metadata was stamped")

        # Digits that are not MNIST, as the server would normalise them: per digit, gated on the held-out splits.
        proxy_sets, unavailable = proxies.build_sets(cfg.proxy, normaliser, workers=cfg.workers, log=log)
        figures = proxies.measure(int8_bytes, proxy_sets)
        proxy_gate = GateResult(proxies.digit_checks(figures, cfg.budgets))
        report["proxy"] = {"spec": cfg.proxy.to_dict(), "int8": figures, "unavailable": unavailable, "gate": proxy_gate.to_dict()}
        report["proxy_wrong"] = {}
        for name, (x, y) in proxy_sets.items():
            got = ort_predict(int8_bytes, x).digits
            report["proxy_wrong"][name] = [{"index": int(i), "label": int(y[i]), "after": int(got[i])} for i in np.flatnonzero(got != y)]
        report["captures"] = _held_out_captures(ckpt, int8_bytes, log)
        if not proxy_gate.passed:
            report["error"] = "the int8 model misses a held-out proxy budget; models/ left untouched"
            return outcome

        margins = np.minimum(int8_p.margins(), fp32_p.margins())
        agree = (int8_p.digits == test_labels) & (fp32_p.digits == test_labels) & (torch_p.digits == test_labels)
        golden = mf.golden_set(test_images, test_labels, margins, agree, cfg.golden_per_digit)
        fp32_layers = list(qcfg.nodes_to_exclude)
        models = {
            "int8": mf.model_entry(
                "int8", int8_bytes, precision="int8", accuracy=int8_p.accuracy(test_labels),
                agreement=record["agreement_with_torch"], fp32_layers=fp32_layers,
                extra={"quantization": qcfg.describe()},
            ),
            "fp32": mf.model_entry(
                "fp32", fp32_bytes, precision="fp32", accuracy=fp32_p.accuracy(test_labels),
                agreement=float((fp32_p.digits == torch_p.digits).mean()), fp32_layers=[],
            ),
        }
        # An ORT-format copy for onnxruntime minimal builds; it must give exactly the int8 model's digits.
        from mnist_edge.export.ort_format import to_ort
        from mnist_edge.export.ort_format import verify as verify_ort

        ort_bytes = to_ort(int8_bytes)
        report["ort_format"] = verify_ort(ort_bytes, int8_bytes, test_images)
        models["ort"] = mf.model_entry(
            "int8", ort_bytes, precision="int8", accuracy=int8_p.accuracy(test_labels),
            agreement=record["agreement_with_torch"], fp32_layers=fp32_layers,
            extra={
                "file": mf.content_name("int8", ort_bytes, ".ort"),
                "format": "ort",
                "ort": {"optimization_level": "extended", "qdq_int8_allowed": False, "same_digits_as": models["int8"]["file"]},
            },
        )
        manifest = mf.build(
            version=cfg.version,
            models=models,
            default="int8",
            data_sha256=ds.sha256,
            created_by=report["versions"],
            golden=golden,
            training={
                "model_config": ckpt["model_config"],
                "seed": ckpt["train_config"].get("seed"),
                "epochs": ckpt["train_config"].get("epochs"),
                "torch_test_accuracy": round(torch_p.accuracy(test_labels), 6),
            },
            budgets=cfg.budgets.to_dict(),
            normaliser={"version": normaliser},
            proxy={"spec": cfg.proxy.to_dict(), "int8": figures, "unavailable": sorted(unavailable)},
            per_digit={"mnist_int8": [round(a, 6) for a in int8_p.per_class_accuracy(test_labels)]},
        )
        report["files"] = {k: {"file": v["file"], "bytes": v["bytes"], "sha256": v["sha256"]} for k, v in models.items()}
        if cfg.measure_latency:
            report["latency_us"] = {"int8": _latency_us(int8_bytes, test_images), "fp32": _latency_us(fp32_bytes, test_images)}
        manifest_bytes = mf.dumps(manifest)
        signature = None
        if cfg.sign_key is not None:
            from mnist_edge.export.signing import sign

            signature = sign(manifest_bytes, cfg.sign_key)
        mf.publish(
            cfg.out,
            {models["int8"]["file"]: int8_bytes, models["fp32"]["file"]: fp32_bytes, models["ort"]["file"]: ort_bytes},
            manifest_bytes,
            signature,
        )
        report["passed"] = True
        report["published"] = True
        outcome.passed = True
        outcome.manifest = manifest
        outcome.exit_code = 0
        return outcome
    except Exception as exc:  # the report must name what went wrong, then the CLI exits non-zero
        import traceback

        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        outcome.exit_code = 2 if isinstance(exc, (FileNotFoundError, ValueError)) else 1
        return outcome
    finally:
        try:
            rpt.write(report, cfg.report_dir, test_images, test_labels, proxy_sets)
        except Exception as exc:  # a broken report must not hide the real result
            log(f"could not write the report to {cfg.report_dir}: {exc}")
        log(rpt.console_summary(report))
