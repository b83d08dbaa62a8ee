"""Train the MLP on MNIST and write a checkpoint: `mnist-edge train`.

The training set is MNIST's raw images plus picture-path data (training.pictures: synthetic
handwriting and MNIST re-sent as pictures, normalised by the imaging normaliser version the
checkpoint records). `train(cfg) -> TrainResult` is the whole stage; `main()` is a thin argparse shell
around it. Training is deterministic for a given seed on a given machine: the model
init and dropout use torch's global generator seeded from `seed`, shuffling and
augmentation use their own generator, and torch runs in deterministic mode with a
fixed thread count.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mnist_edge.imaging.normalize import NORMALISER_VERSION, SUPPORTED_VERSIONS
from mnist_edge.training import captures
from mnist_edge.training import data as mnist_data
from mnist_edge.training.model import MLP, ModelConfig

FORMAT_VERSION = 1
HANDWRITING_EVAL_PER_DIGIT = 200  # synthetic handwriting per digit in the tune and held-out figures
DEFAULT_OUT = "runs/mnist.pt"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 36
    batch_size: int = 128
    lr: float = 2e-3  # peak of the one-cycle schedule
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    seed: int = 0
    augment: bool = True
    rotate_deg: float = 10.0
    scale: float = 0.1  # zoom in [1 - scale, 1 + scale]
    shear_deg: float = 8.0
    translate_px: float = 2.0
    thickness_p: float = 0.15  # probability of a random stroke dilation or erosion
    elastic_alpha: float = 2.5  # elastic distortion strength in pixels (0 = off)
    elastic_sigma: float = 4.0  # smoothness of the elastic displacement field, pixels
    ema: float = 0.999  # decay of an exponential moving average of the weights (0 = off)
    # Picture-path data added to MNIST's raw images (training.pictures), normalised by `normaliser`:
    handwriting: int = 1500  # synthetic handwritten digits per digit class (0 = none)
    # More synthetic digits of the classes MNIST writes one way only, as "digit:count,...": the
    # flagged 1 and the 7 it is mistaken for (docs/model-card.md, "How the defaults were chosen").
    handwriting_extra: str = "1:8000,7:3500"
    mnist_pictures: int = 10000  # MNIST training images re-encoded as pictures and normalised back (0 = none)
    normaliser: int = NORMALISER_VERSION  # imaging.normalize version the model is made for
    data_workers: int = 2  # processes drawing and normalising the picture data
    picture_cache: bool = True  # keep the picture data in the cache (pictures/ next to MNIST's)
    limit: int | None = None  # train on the first N images only (smoke runs)
    init: str | None = None  # fine-tune: start from this checkpoint's weights (and its widths)
    extra_data: list[str] = field(default_factory=list)  # labelled capture folders (docs/field-loop.md)
    extra_share: float = 0.1  # the training captures' share of each epoch
    extra_held_out: float = 0.2  # share of the captures never trained on, only evaluated
    threads: int = 1  # torch CPU threads; see docs/model-card.md for why one
    data_dir: str | None = None
    offline: bool = False
    out: str = DEFAULT_OUT
    eval_proxy: bool = True
    progress: bool | None = None  # None: a bar only on a terminal


@dataclass
class TrainResult:
    checkpoint: dict[str, Any]
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def _augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random affine (rotation, zoom, shear, shift) and stroke-width change, per image.

    x: float pixels [N, 28, 28] in 0..255. Runs on whole batches with affine_grid and
    grid_sample, so it costs little next to the model step.
    """
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180)
    shear = uniform(-cfg.shear_deg, cfg.shear_deg) * (math.pi / 180)
    zoom = uniform(1 - cfg.scale, 1 + cfg.scale)
    # affine_grid works in output->input coordinates normalised to [-1, 1] (28 px = 2 units).
    tx = uniform(-cfg.translate_px, cfg.translate_px) * (2 / 28)
    ty = uniform(-cfg.translate_px, cfg.translate_px) * (2 / 28)
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos / zoom
    theta[:, 0, 1] = (-sin + cos * tan) / zoom
    theta[:, 1, 0] = sin / zoom
    theta[:, 1, 1] = (cos + sin * tan) / zoom
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    img = x.unsqueeze(1)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    if cfg.elastic_alpha > 0:
        grid = grid + _elastic_field(n, cfg.elastic_alpha, cfg.elastic_sigma, gen)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.thickness_p > 0:
        pick = torch.rand(n, generator=gen)
        dilate = pick < cfg.thickness_p / 2
        erode = (pick >= cfg.thickness_p / 2) & (pick < cfg.thickness_p)
        if dilate.any():
            out[dilate] = F.max_pool2d(out[dilate], 3, stride=1, padding=1)
        if erode.any():
            out[erode] = -F.max_pool2d(-out[erode], 3, stride=1, padding=1)
    return out.squeeze(1)


def _elastic_field(n: int, alpha: float, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Smooth random displacements (Simard et al. 2003), as offsets in affine_grid's units."""
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    d = torch.rand(n * 2, 1, 28, 28, generator=gen) * 2 - 1
    d = F.conv2d(F.pad(d, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    d = F.conv2d(F.pad(d, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    # Normalise the field to unit peak per image so alpha is the largest shift in pixels.
    d = d.view(n, 2, 28, 28)
    d = d / d.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return (d * (alpha * 2 / 28)).permute(0, 2, 3, 1)


class _Ema:
    """Exponential moving average of the weights, evaluated and saved instead of the raw weights.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so a short run
    (a smoke test, a few epochs) averages its own trained weights rather than staying
    close to the random initialisation.
    """

    def __init__(self, model: MLP, decay: float) -> None:
        import copy

        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        self.updates = 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update_parameters(self, model: MLP) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = list(self.module.parameters())
        torch._foreach_mul_(ema, d)
        torch._foreach_add_(ema, [p.detach() for p in model.parameters()], alpha=1 - d)


@torch.no_grad()
def evaluate(model: MLP, images: np.ndarray, labels: np.ndarray, batch: int = 2000) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on uint8 images [N,28,28]."""
    model.eval()
    x = torch.from_numpy(np.array(images))
    y = torch.from_numpy(labels.astype(np.int64))
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch])
        loss_sum += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    n = max(len(x), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n}


def _progress(total: int, desc: str, enabled: bool | None):
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:  # the bar is a nicety; training works without it
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=(not enabled) if enabled is not None else None, file=sys.stderr)


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    mnist_data.atomic_write(path, buf.getvalue())


def _proxy_accuracy(model: MLP, version: int, log) -> dict[str, Any]:
    """Accuracy on the font proxy splits and the synthetic handwriting splits (tune and held-out)."""
    from mnist_edge.training import handwriting, proxy

    results: dict[str, Any] = {"available": True}
    for split in ("tune", "holdout"):
        images, labels, _ = handwriting.build(HANDWRITING_EVAL_PER_DIGIT, split, 0, workers=2, version=version)
        results[f"handwriting_{split}"] = evaluate(model, images, labels)["accuracy"]
        images, labels, _ = handwriting.build(HANDWRITING_EVAL_PER_DIGIT, split, 0, workers=2, version=version, capture="scan")
        results[f"scans_{split}"] = evaluate(model, images, labels)["accuracy"]
    try:
        for subset in ("tune", "holdout"):
            images, labels, _ = proxy.build_proxy_set(subset=subset, version=version)
            results[subset] = evaluate(model, images, labels)["accuracy"]
    except proxy.ProxyUnavailable as exc:
        log(f"font proxy set unavailable: {exc}")
        results.update(available=False, reason=str(exc))
    return results


def _picture_data(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, sha256: dict[str, str], log):
    """The picture-path training data for this config; a smoke run (--limit) gets a proportional share."""
    from mnist_edge.training.pictures import picture_training_set

    hw, mp, extra = cfg.handwriting, cfg.mnist_pictures, parse_extra(cfg.handwriting_extra)
    if cfg.limit is not None:
        hw, mp, extra = min(hw, max(1, cfg.limit // 40)), min(mp, cfg.limit // 6), {}
    if hw <= 0 and mp <= 0:
        return np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8), {"handwriting": 0, "mnist_pictures": 0}
    cache = mnist_data.cache_dir().parent / "pictures" if cfg.picture_cache else None
    return picture_training_set(
        images, labels, handwriting_per_digit=hw, handwriting_extra=extra, mnist_pictures=mp, seed=cfg.seed, version=cfg.normaliser,
        data_sha256=sha256, workers=cfg.data_workers, cache=cache, log=log,
    )


def train(cfg: TrainConfig, model_cfg: ModelConfig | None = None, dataset: mnist_data.Mnist | None = None, log=print) -> TrainResult:
    """Train one model from `cfg`; write its checkpoint to `cfg.out` atomically."""
    model_cfg = model_cfg or ModelConfig()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    ds = dataset or mnist_data.load(cfg.data_dir, offline=cfg.offline, log=log)
    train_x = torch.from_numpy(np.array(ds.train.images))  # a writable copy
    train_y = torch.from_numpy(ds.train.labels.astype(np.int64))
    if cfg.limit is not None:
        train_x, train_y = train_x[: cfg.limit], train_y[: cfg.limit]
    if len(train_x) == 0:
        raise ValueError("no training images (check --limit)")
    prep_started = time.perf_counter()
    extra_x, extra_y, extra_counts = _picture_data(cfg, train_x.numpy(), train_y.numpy(), ds.sha256, log)
    prep_seconds = time.perf_counter() - prep_started
    if len(extra_y):
        train_x = torch.cat([train_x, torch.from_numpy(extra_x)])
        train_y = torch.cat([train_y, torch.from_numpy(extra_y.astype(np.int64))])
    held_captures = None
    if cfg.extra_data:
        train_captures, held_captures = captures.load(cfg.extra_data, cfg.extra_held_out)
        if len(train_captures) + len(held_captures) == 0:
            raise ValueError(f"no labelled captures in {', '.join(cfg.extra_data)} (label them with `mnist-edge label DIR`)")
        mixed_x, mixed_y = captures.mix(train_x.numpy(), train_y.numpy(), train_captures, cfg.extra_share)
        train_x, train_y = torch.from_numpy(np.ascontiguousarray(mixed_x)), torch.from_numpy(mixed_y.astype(np.int64))
        log(f"captures: {len(train_captures)} trained on (repeated to {cfg.extra_share:.0%} of an epoch), {len(held_captures)} held out")
    n = len(train_x)

    if cfg.init:
        model, init_ckpt = load_checkpoint(cfg.init)
        model_cfg = ModelConfig.from_dict(init_ckpt["model_config"])  # a fine-tune keeps the widths it starts from
        if init_ckpt.get("normaliser_version", 1) != cfg.normaliser:
            raise ValueError(f"{cfg.init} was trained for normaliser version {init_ckpt.get('normaliser_version', 1)}, this run uses {cfg.normaliser}")
    else:
        model = MLP(model_cfg)
    captures_before = evaluate(model, held_captures.images, held_captures.labels) if held_captures is not None and len(held_captures) else None
    averaged = _Ema(model, cfg.ema) if cfg.ema > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)

    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen)
        bar = _progress(steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", cfg.progress)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = train_x[idx].to(torch.float32)
            y = train_y[idx]
            if cfg.augment:
                x = _augment(x, cfg, gen)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if averaged is not None:
                averaged.update_parameters(model)
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        if bar is not None:
            bar.close()
        final = averaged.module if averaged is not None else model
        test = evaluate(final, ds.test.images, ds.test.labels)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "elapsed_s": time.perf_counter() - started,
        }
        history.append(row)
        log(
            f"epoch {epoch:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
            f"test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.4f}  [{row['elapsed_s']:.0f}s]"
        )

    train_seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "test_accuracy": history[-1]["test_accuracy"],
        "test_loss": history[-1]["test_loss"],
        "train_seconds": train_seconds,
        "picture_data_seconds": prep_seconds,
        "train_images": n,
        "picture_images": extra_counts,
        "history": history,
    }
    model = averaged.module if averaged is not None else model
    if cfg.eval_proxy:
        metrics["proxy"] = _proxy_accuracy(model, cfg.normaliser, log)
    if held_captures is not None:
        after = evaluate(model, held_captures.images, held_captures.labels) if len(held_captures) else None
        metrics["captures"] = {
            "folders": list(cfg.extra_data),
            "held_out_share": cfg.extra_held_out,
            "train": len(train_captures),
            "held_out": len(held_captures),
            "held_out_accuracy_before": captures_before["accuracy"] if captures_before else None,
            "held_out_accuracy_after": after["accuracy"] if after else None,
        }
        if after is not None:
            before_text = f"{captures_before['accuracy']:.4f} before, " if captures_before else ""
            log(f"held-out captures ({len(held_captures)}): {before_text}{after['accuracy']:.4f} after")

    model.eval()
    checkpoint: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_config": model_cfg.to_dict(),
        "train_config": asdict(cfg),
        "normaliser_version": cfg.normaliser,
        "state_dict": model.state_dict(),
        "metrics": metrics,
        "data_sha256": dict(ds.sha256),
        "versions": {"torch": str(torch.__version__), "numpy": np.__version__, "python": platform.python_version()},
    }
    out = Path(cfg.out)
    _atomic_save(checkpoint, out)
    log(f"test accuracy {metrics['test_accuracy']:.4f} after {cfg.epochs} epochs in {train_seconds:.0f}s; checkpoint {out}")
    if cfg.eval_proxy:
        px = metrics["proxy"]
        log(f"synthetic handwriting accuracy: tune {px['handwriting_tune']:.4f}, holdout {px['handwriting_holdout']:.4f}; "
            f"scans: tune {px['scans_tune']:.4f}, holdout {px['scans_holdout']:.4f}")
        if px.get("available"):
            log(f"font proxy set accuracy: tune {px['tune']:.4f}, holdout {px['holdout']:.4f}")
    return TrainResult(checkpoint=checkpoint, path=out, metrics=metrics)


def load_checkpoint(path: str | os.PathLike) -> tuple[MLP, dict[str, Any]]:
    """Load a checkpoint safely (weights_only) and rebuild the model from its own config."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {version!r}, expected {FORMAT_VERSION}")
    model = MLP(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


def parse_extra(text: str) -> dict[int, int]:
    """ "1:3000,7:1500" -> {1: 3000, 7: 1500}; "" -> {}."""
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        digit, _, count = part.partition(":")
        try:
            d, n = int(digit), int(count)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected digit:count pairs such as 1:3000,7:1500, got {text!r}") from None
        if not 0 <= d <= 9 or n < 0:
            raise argparse.ArgumentTypeError(f"expected a digit 0-9 and a count >= 0 in {part!r}")
        out[d] = n
    return out


def _parse_hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated widths like 512,256,128, got {text!r}") from None
    if len(widths) != 3:
        raise argparse.ArgumentTypeError(f"expected exactly three hidden widths (the depth is fixed), got {text!r}")
    return widths


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    m = ModelConfig()
    p = argparse.ArgumentParser(
        prog="mnist-edge train",
        description="Train the MNIST MLP and write a checkpoint (weights, config, metrics, data hashes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {d.epochs}; 1 with --smoke)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (one-cycle schedule, AdamW)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="cross-entropy label smoothing")
    p.add_argument("--hidden", type=_parse_hidden, default=m.hidden, help="the three hidden widths, e.g. 512,256,128")
    p.add_argument("--dropout", type=float, default=m.dropout, help="dropout after each hidden layer")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (same seed, same machine: same weights)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment, help="random affine augmentation")
    p.add_argument("--rotate-deg", type=float, default=d.rotate_deg, help="augmentation: max rotation, degrees")
    p.add_argument("--scale", type=float, default=d.scale, help="augmentation: max zoom change (fraction)")
    p.add_argument("--shear-deg", type=float, default=d.shear_deg, help="augmentation: max shear, degrees")
    p.add_argument("--translate-px", type=float, default=d.translate_px, help="augmentation: max shift, pixels")
    p.add_argument("--thickness-p", type=float, default=d.thickness_p, help="augmentation: probability of a stroke-width change")
    p.add_argument("--elastic-alpha", type=float, default=d.elastic_alpha, help="augmentation: elastic distortion, max shift in pixels (0 = off)")
    p.add_argument("--elastic-sigma", type=float, default=d.elastic_sigma, help="augmentation: elastic field smoothness, pixels")
    p.add_argument("--ema", type=float, default=d.ema, help="decay of the weights' moving average that is evaluated and saved (0 = off)")
    p.add_argument("--handwriting", type=int, default=d.handwriting, help="synthetic handwritten digits per class added to the training set (0 = none)")
    p.add_argument("--handwriting-extra", default=d.handwriting_extra, metavar="D:N,...",
                   help="more synthetic digits of these classes, e.g. 1:8000,7:3500 ('' = none)")
    p.add_argument("--mnist-pictures", type=int, default=d.mnist_pictures, help="MNIST training images added again as re-encoded, normalised pictures (0 = none)")
    p.add_argument("--normaliser", type=int, choices=SUPPORTED_VERSIONS, default=d.normaliser, help="imaging normaliser version the picture data (and the model) is made for")
    p.add_argument("--data-workers", type=int, default=d.data_workers, help="processes drawing and normalising the picture data")
    p.add_argument("--picture-cache", action=argparse.BooleanOptionalAction, default=d.picture_cache, help="cache the picture data next to the MNIST cache")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images only (smoke runs)")
    p.add_argument("--init", default=None, metavar="CHECKPOINT", help="fine-tune: start from this checkpoint's weights and widths (with --extra-data; fewer epochs and a lower --lr suit it)")
    p.add_argument("--extra-data", nargs="+", default=[], metavar="DIR", help="labelled capture folders (mnist-edge label DIR) trained on next to MNIST; a held-out part of them is only evaluated")
    p.add_argument("--extra-share", type=float, default=d.extra_share, help="the training captures' share of each epoch (repeated to reach it)")
    p.add_argument("--extra-held-out", type=float, default=d.extra_held_out, help="share of the captures held out (chosen by file name; never trained on)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (fixed, for determinism)")
    p.add_argument("--data-dir", default=None, help="directory holding the four MNIST IDX files (else MNIST_EDGE_DATA_DIR, the cache, then download)")
    p.add_argument("--offline", action="store_true", help="never download; use only --data-dir and the cache")
    p.add_argument("--out", default=d.out, help="checkpoint path (written atomically)")
    p.add_argument("--eval-proxy", action=argparse.BooleanOptionalAction, default=d.eval_proxy, help="report accuracy on the font-rendered proxy set")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: only on a terminal)")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run for tests and CI: --epochs 1 --limit 2000 unless given")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, ModelConfig]:
    epochs, limit = args.epochs, args.limit
    if epochs is None:
        epochs = 1 if args.smoke else TrainConfig.epochs
    if args.smoke and limit is None:
        limit = 2000
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        augment=args.augment,
        rotate_deg=args.rotate_deg,
        scale=args.scale,
        shear_deg=args.shear_deg,
        translate_px=args.translate_px,
        thickness_p=args.thickness_p,
        elastic_alpha=args.elastic_alpha,
        elastic_sigma=args.elastic_sigma,
        ema=args.ema,
        handwriting=args.handwriting,
        handwriting_extra=",".join(f"{d}:{n}" for d, n in parse_extra(args.handwriting_extra).items()),
        mnist_pictures=args.mnist_pictures,
        normaliser=args.normaliser,
        data_workers=args.data_workers,
        picture_cache=args.picture_cache,
        limit=limit,
        init=args.init,
        extra_data=list(args.extra_data),
        extra_share=args.extra_share,
        extra_held_out=args.extra_held_out,
        threads=args.threads,
        data_dir=args.data_dir,
        offline=args.offline,
        out=args.out,
        eval_proxy=args.eval_proxy,
        progress=args.progress,
    )
    return cfg, ModelConfig(hidden=tuple(args.hidden), dropout=args.dropout)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, model_cfg = config_from_args(args)
    try:
        train(cfg, model_cfg)
    except (mnist_data.DataError, ValueError, OSError) as exc:
        print(f"mnist-edge train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
