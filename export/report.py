"""The export report: JSON for machines, Markdown and pictures for people, a console summary.

Written on success and on failure, into its own directory; it is not part of the
manifest and carries timings, so it is not byte-stable (the manifest is).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mnist_edge.training.data import atomic_write


def _font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow without sized default font
        return ImageFont.load_default()


def confusion_image(matrix: np.ndarray, title: str) -> Image.Image:
    """A labelled 10x10 confusion matrix: rows true digit, columns predicted digit."""
    cell, margin, top = 44, 48, 40
    size = (margin + cell * 10 + 10, top + margin + cell * 10 + 10)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    draw.text((10, 8), title, fill="black", font=font)
    draw.text((margin + cell * 4, top + 4), "predicted", fill="black", font=small)
    draw.text((4, top + margin + cell * 5), "true", fill="black", font=small)
    peak = math.log1p(max(int(matrix.max()), 1))
    for c in range(10):
        draw.text((margin + c * cell + cell // 2 - 3, top + 22), str(c), fill="black", font=font)
        draw.text((margin - 16, top + margin + c * cell + cell // 2 - 6), str(c), fill="black", font=font)
    for r in range(10):
        for c in range(10):
            v = int(matrix[r, c])
            x0, y0 = margin + c * cell, top + margin + r * cell
            if r == c:
                shade = int(255 - 120 * math.log1p(v) / peak)
                color = (shade, 255, shade)
            elif v:
                shade = int(235 - 180 * math.log1p(v) / peak)
                color = (255, shade, shade)
            else:
                color = (250, 250, 250)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color, outline=(200, 200, 200))
            text = str(v)
            draw.text((x0 + cell // 2 - 3 * len(text), y0 + cell // 2 - 6), text, fill="black", font=small)
    return img


def image_grid(images: np.ndarray, captions: list[str], title: str, columns: int = 10, scale: int = 3) -> Image.Image:
    """A grid of 28x28 digits (as the model saw them: white ink on black), each captioned."""
    tile_w, tile_h, top = 28 * scale + 8, 28 * scale + 30, 28
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    img = Image.new("RGB", (max(columns * tile_w, 360), top + rows * tile_h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 6), title if n else f"{title}: none", fill="black", font=_font(13))
    font = _font(10)
    for i in range(n):
        x0, y0 = (i % columns) * tile_w + 4, top + (i // columns) * tile_h
        digit = Image.fromarray(np.asarray(images[i], dtype=np.uint8)).resize((28 * scale, 28 * scale), Image.Resampling.NEAREST)
        img.paste(digit.convert("RGB"), (x0, y0))
        draw.text((x0, y0 + 28 * scale + 2), captions[i], fill="black", font=font)
    return img


def per_digit_image(rows: list[tuple[str, list[float]]], title: str, budget: float | None = None) -> Image.Image:
    """Per-digit accuracy as a table of coloured cells: one row per set, one column per digit.

    Green at 100%, through yellow, to red at (or below) 80%; cells under `budget` are outlined.
    """
    cell_w, cell_h, label_w, top = 58, 30, 170, 48
    img = Image.new("RGB", (label_w + 10 * cell_w + 10, top + cell_h * max(len(rows), 1) + 10), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    draw.text((8, 8), title, fill="black", font=font)
    for d in range(10):
        draw.text((label_w + d * cell_w + cell_w // 2 - 3, top - 18), str(d), fill="black", font=font)
    for r, (name, accs) in enumerate(rows):
        y0 = top + r * cell_h
        draw.text((8, y0 + cell_h // 2 - 6), name, fill="black", font=small)
        for d, a in enumerate(accs):
            x0 = label_w + d * cell_w
            t = min(max((a - 0.8) / 0.2, 0.0), 1.0) if a == a else 0.0  # a == a: not NaN
            color = (int(255 * min(1.0, 2 * (1 - t))), int(255 * min(1.0, 2 * t)), 80)
            draw.rectangle([x0, y0, x0 + cell_w - 2, y0 + cell_h - 2], fill=color)
            if budget is not None and a < budget:
                draw.rectangle([x0, y0, x0 + cell_w - 2, y0 + cell_h - 2], outline="black", width=3)
            text = "n/a" if a != a else f"{100 * a:.1f}"
            draw.text((x0 + 10, y0 + cell_h // 2 - 6), text, fill="black", font=small)
    return img


def per_digit_rows(report: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """(set, per-digit accuracy) for MNIST and every measured proxy split, int8."""
    rows: list[tuple[str, list[float]]] = []
    final = report.get("final") or {}
    if final.get("per_class_accuracy"):
        rows.append(("mnist (test, raw)", list(final["per_class_accuracy"])))
    for name, f in ((report.get("proxy") or {}).get("int8") or {}).items():
        rows.append((name, list(f["per_digit"])))
    return rows


def _save_png(img: Image.Image, path: Path) -> None:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    atomic_write(path, buf.getvalue())


def write(
    report: dict[str, Any],
    report_dir: Path,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    proxy_sets: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, str]:
    """Write report.json, report.md and the pictures; return the paths written."""
    report_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    pictures = report.setdefault("pictures", {})
    final = report.get("final") or {}
    if final.get("confusion") is not None:
        _save_png(confusion_image(np.asarray(final["confusion"]), f"int8 confusion matrix (test set, {final.get('name', '')})"), report_dir / "confusion_int8.png")
        pictures["confusion_int8"] = "confusion_int8.png"
    if images is not None and labels is not None:
        changed = final.get("changed_vs_torch") or []
        idx = [c["index"] for c in changed][:200]
        caps = [f"#{c['index']} y={c['label']} {c['before']}->{c['after']}" for c in changed][:200]
        _save_png(image_grid(images[idx] if idx else np.zeros((0, 28, 28)), caps, "test images whose prediction changed (torch -> int8)"), report_dir / "changed_torch_to_int8.png")
        pictures["changed_torch_to_int8"] = "changed_torch_to_int8.png"
        wrong = final.get("int8_wrong") or []
        idx = [w["index"] for w in wrong][:200]
        caps = [f"#{w['index']} y={w['label']} got {w['after']}" for w in wrong][:200]
        more = f" (first 200 of {len(wrong)})" if len(wrong) > 200 else ""
        _save_png(image_grid(images[idx] if idx else np.zeros((0, 28, 28)), caps, f"test images int8 gets wrong{more}"), report_dir / "int8_wrong.png")
        pictures["int8_wrong"] = "int8_wrong.png"
    rows = per_digit_rows(report)
    if rows:
        budget = (report.get("budgets") or {}).get("min_digit_accuracy")
        _save_png(per_digit_image(rows, "int8 accuracy per digit (%); outlined: under the worst-digit budget", budget), report_dir / "per_digit.png")
        pictures["per_digit"] = "per_digit.png"
    for name, (x, _) in (proxy_sets or {}).items():
        wrong = (report.get("proxy_wrong") or {}).get(name) or []
        idx = [w["index"] for w in wrong][:100]
        caps = [f"#{w['index']} y={w['label']} got {w['after']}" for w in wrong][:100]
        more = f" (first 100 of {len(wrong)})" if len(wrong) > 100 else ""
        key = f"wrong_{name}".replace("-", "_")
        _save_png(image_grid(x[idx] if idx else np.zeros((0, 28, 28)), caps, f"{name}: digits int8 gets wrong, as the model saw them{more}"), report_dir / f"{key}.png")
        pictures[key] = f"{key}.png"
    atomic_write(report_dir / "report.json", (json.dumps(report, indent=2, sort_keys=True, default=_json_default) + "\n").encode())
    atomic_write(report_dir / "report.md", markdown(report).encode())
    written.update({"json": str(report_dir / "report.json"), "markdown": str(report_dir / "report.md")})
    return written


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _captures_line(c: dict[str, Any]) -> str:
    return (
        f"held-out field captures ({c.get('held_out', 0)}): before fine-tuning {_pct(c.get('held_out_accuracy_before'))}, "
        f"after {_pct(c.get('held_out_accuracy_after'))} (PyTorch), int8 {_pct(c.get('held_out_accuracy_int8'))}"
    )


def markdown(r: dict[str, Any]) -> str:
    out: list[str] = []
    verdict = "PASSED" if r.get("passed") else "FAILED"
    out.append(f"# mnist-edge export report: {verdict}\n")
    if r.get("error"):
        out.append(f"**Error:** {r['error']}\n")
    out.append(f"- checkpoint: `{r.get('checkpoint')}`\n- version: {r.get('version')}\n- output: `{r.get('out')}` "
               f"({'written' if r.get('published') else 'left untouched'})\n")
    acc = r.get("accuracy", {})
    if acc:
        out.append("## Accuracy on the 10,000 MNIST test images\n")
        out.append("| model | accuracy |\n|---|---|")
        for k in ("torch", "fp32", "int8"):
            if k in acc:
                out.append(f"| {k} | {_pct(acc[k])} |")
        out.append("")
    if r.get("captures"):
        out.append("## Field captures (fine-tuning, held-out part)\n")
        out.append(_captures_line(r["captures"]) + "\n")
    fp32 = r.get("fp32_check")
    if fp32:
        out.append("## fp32 ONNX vs PyTorch\n")
        out += [f"- {_check_line(c)}" for c in fp32["checks"]]
        out.append("")
    attempts = r.get("attempts", [])
    if attempts:
        out.append("## int8 attempts (in order)\n")
        out.append("| # | remedy | fp32 layers | accuracy | drop | agreement vs torch | result |\n|---|---|---|---|---|---|---|")
        for i, a in enumerate(attempts, 1):
            out.append(
                f"| {i} | {a['name']} | {', '.join(a['config']['nodes_to_exclude']) or '-'} | {_pct(a.get('accuracy'))} | "
                f"{100 * a['drop']:.2f} pts | {_pct(a.get('agreement_with_torch'))} | {'pass' if a['passed'] else 'FAIL'} |"
            )
        out.append("")
        for i, a in enumerate(attempts, 1):
            out.append(f"### Attempt {i}: {a['name']}\n")
            out += [f"- {_check_line(c)}" for c in a["gate"]["checks"]]
            if a.get("layer_errors"):
                out.append("\n| layer | output SQNR dB | error added dB | weight SQNR dB |\n|---|---|---|---|")
                for e in a["layer_errors"]:
                    w = "-" if e.get("weight_sqnr_db") is None else f"{e['weight_sqnr_db']:.1f}"
                    out.append(f"| {e['layer']} | {e['output_sqnr_db']:.1f} | {e['added_error_db']:.1f} | {w} |")
            out.append("")
    final = r.get("final")
    proxy = r.get("proxy") or {}
    rows = per_digit_rows(r)
    if rows:
        out.append("## Per-digit accuracy (int8)\n")
        overall = {name: f["accuracy"] for name, f in (proxy.get("int8") or {}).items()}
        if (r.get("accuracy") or {}).get("int8") is not None:
            overall["mnist (test, raw)"] = r["accuracy"]["int8"]
        out.append("| set | overall | " + " | ".join(str(d) for d in range(10)) + " |")
        out.append("|---" * 12 + "|")
        for name, accs in rows:
            out.append(f"| {name} | {_pct(overall.get(name))} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |")
        out.append("")
        if proxy.get("spec"):
            spec = proxy["spec"]
            out.append(f"Proxy splits (normalised by imaging normaliser version {r.get('normaliser_version')}): "
                       f"{spec['handwriting_per_digit']} synthetic handwritten and {spec['fonts_per_digit']} font-rendered "
                       f"digits per class and split, seed {spec['seed']}.")
        for name, why in (proxy.get("unavailable") or {}).items():
            out.append(f"- {name}: not measured: {why}")
        for c in (proxy.get("gate") or {}).get("checks", []):
            out.append(f"- {_check_line(c)}")
        out.append("")
    if final and final.get("per_class_accuracy"):
        if final.get("failed"):
            out.append(f"## The best failed attempt in detail: {final['name']}\n")
        changed = final.get("changed_vs_torch", [])
        out.append(f"## Predictions changed between PyTorch and int8: {len(changed)}\n")
        if changed:
            out.append("| test index | label | torch | int8 |\n|---|---|---|---|")
            out += [f"| {c['index']} | {c['label']} | {c['before']} | {c['after']} |" for c in changed[:100]]
            out.append("")
    sizes = r.get("files", {})
    if sizes:
        out.append("## Files\n\n| model | file | bytes | sha256 |\n|---|---|---|---|")
        out += [f"| {k} | `{v['file']}` | {v['bytes']:,} | `{v['sha256'][:16]}...` |" for k, v in sizes.items()]
        if "int8" in sizes and "fp32" in sizes:
            out.append(f"\nint8 file is {100 * sizes['int8']['bytes'] / sizes['fp32']['bytes']:.1f}% of the fp32 file.")
        out.append("")
    lat = r.get("latency_us", {})
    if lat:
        out.append("## onnxruntime latency (this machine, 1 intra-op thread, median)\n\n| model | 1 image | batch of 1024 | per image in batch |\n|---|---|---|---|")
        for k, v in lat.items():
            out.append(f"| {k} | {v['batch_1']:.1f} us | {v['batch_1024'] / 1000:.2f} ms | {v['batch_1024'] / 1024:.2f} us |")
        out.append("")
    pics = r.get("pictures", {})
    if pics:
        out.append("## Pictures\n")
        out += [f"![{k}]({v})" for k, v in pics.items()]
        out.append("")
    versions = r.get("versions", {})
    if versions:
        out.append("## Tool versions\n\n" + "\n".join(f"- {k}: {v}" for k, v in sorted(versions.items())) + "\n")
    return "\n".join(out)


def _check_line(c: dict[str, Any]) -> str:
    mark = "PASS" if c["passed"] else "**FAIL**"
    detail = f" ({c['detail']})" if c.get("detail") else ""
    return f"{mark} {c['name']}: {c['value']:.6g}, budget {c['op']} {c['budget']:.6g}{detail}"


def console_summary(r: dict[str, Any]) -> str:
    lines = [f"export {'PASSED' if r.get('passed') else 'FAILED'}: {r.get('checkpoint')} -> {r.get('out')} (version {r.get('version')})"]
    if r.get("error"):
        lines.append(f"  error: {r['error']}")
    acc = r.get("accuracy", {})
    if acc:
        lines.append("  accuracy: " + ", ".join(f"{k} {_pct(v)}" for k, v in acc.items()))
    for c in (r.get("fp32_check") or {}).get("checks", []):
        lines.append("  " + _check_line(c).replace("**", ""))
    for i, a in enumerate(r.get("attempts", []), 1):
        lines.append(f"  attempt {i} [{a['name']}]: {'pass' if a['passed'] else 'FAIL'}")
        for c in a["gate"]["checks"]:
            lines.append("    " + _check_line(c).replace("**", ""))
    proxy = r.get("proxy") or {}
    for name, f in (proxy.get("int8") or {}).items():
        lines.append(f"  {name}: {_pct(f['accuracy'])}, worst digit {f['worst_digit']} {_pct(f['worst'])}")
    if r.get("captures"):
        lines.append("  " + _captures_line(r["captures"]))
    for c in (proxy.get("gate") or {}).get("checks", []):
        lines.append("  " + _check_line(c).replace("**", ""))
    files = r.get("files", {})
    if files:
        lines.append("  files: " + ", ".join(f"{k} {v['file']} ({v['bytes']:,} B)" for k, v in files.items()))
    lat = r.get("latency_us", {})
    if lat:
        lines.append("  latency: " + ", ".join(f"{k} {v['batch_1']:.0f} us/1 img, {v['batch_1024'] / 1000:.1f} ms/1024" for k, v in lat.items()))
    if r.get("report_dir"):
        lines.append(f"  report: {r['report_dir']}/report.md")
    return "\n".join(lines)
