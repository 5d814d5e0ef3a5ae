"""
layermatch.py: LayerMatch semi-supervised image classification in one file of PyTorch.

LayerMatch (Liang et al., "LayerMatch: Do Pseudo-labels Benefit All Layers?", arXiv 2406.14207)
is FixMatch with two changes: pseudo-labels stop training the linear classifier (Grad-ReLU) and pull
features towards smoothed class centres (Avg-Clustering). The paper's full text was not available to
us; section "Our reading of the method" in README.md says exactly what we implemented and why.

    python layermatch.py --dataset cifar10 --labels 40                  # LayerMatch, FixMatch protocol
    python layermatch.py --dataset cifar10 --labels 40 --algorithm fixmatch   # the baseline
    python layermatch.py --dataset digits --labels 20                   # offline demo, minutes on a CPU
    python layermatch.py --dataset folder --data-dir PATH --labels 40 --image-size 96 --arch resnet18  # your photos
    python layermatch.py --dataset imagenet100 --data-dir ROOT --labels 1300   # ResNet-50, 224 px, 13 per class
    python layermatch.py --table runs --markdown      # finished runs: over seeds, and paired with fixmatch seed by seed
    torchrun --nproc_per_node=4 layermatch.py --dataset cifar100 --labels 400   # batch = global batch

From Python (your own uint8 images [N, C, H, W] and int64 labels), and a trained model:

    from layermatch import Config, train, load, predict
    summary = train(Config(dataset="mydata", labels=40, steps=5000),
                    data=dict(train_x=..., train_y=..., test_x=..., test_y=..., unlabeled_x=None))
    classes, probs = predict(load("runs/mydata@40-layermatch-s0"), images)

The method, top to layermatch_step's end, runs pasted alone. Images sit on the device as uint8 (or in host memory,
--data-on host), augmented in whole batches; one forward pass over [labeled, weak, strong] per step, as in FixMatch.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import pickle
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import typing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------
# Config

def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))

@dataclass
class Config:
    # run
    dataset: str = arg("cifar10", "cifar10 | cifar100 | svhn | stl10 | digits (offline) | folder (your images in "
                                  "--data-dir: train/<class>/, test/<class>/ or val/, optional unlabeled/) | "
                                  "imagenet100 (ImageNet's folders in --data-dir); any name with train(data=...)")
    labels: int = arg(40, "number of labeled training images, class-balanced")
    algorithm: str = arg("layermatch", "what to train; gradrelu and avgclustering are FixMatch plus that part alone",
                         choices=["layermatch", "fixmatch", "gradrelu", "avgclustering", "supervised"])
    seed: int = arg(0, "seeds the labeled subset, the initialisation, sampling and augmentation")
    data_dir: str = arg("./data", "where torchvision datasets are (or get downloaded to); --dataset folder: the "
                                  "folder of your images", metavar="DIR")
    image_size: int | None = arg(None, "--dataset folder: shorter side resized to SIZE, centre SIZE x SIZE kept; "
                                       "imagenet100: the training crop, as TorchSSL's (default 32; imagenet100 224)")
    data_on: str = arg("auto", "where the images are kept: on the device, or in host memory for data larger than the "
                               "GPU; auto: device if they fit beside the training", choices=["auto", "device", "host"])
    cache_dir: str = arg("", "--dataset folder, imagenet100: where decoded images are cached (default: "
                             "$XDG_CACHE_HOME/layermatch or ~/.cache/layermatch)", metavar="DIR")
    out: str = arg("", "output folder (default: runs/<dataset>@<labels>-<algorithm>-s<seed>)", metavar="DIR")
    resume: bool = arg(False, "continue the run in --out from its checkpoint, or start it where --out holds none yet")
    overwrite: bool = arg(False, "delete an existing --out and start afresh")
    stop_at: int = arg(0, "checkpoint and stop after this step (split a run into time-limited jobs); 0 = off")
    checkpoint_minutes: float = arg(10.0, "also checkpoint when this many minutes have passed since the last one: "
                                          "what a kill can lose; 0 = at evaluations only")
    device: str = arg("auto", "auto | cuda | cpu | mps")
    tensorboard: bool = arg(False, "learning curves in <out>/tb, for tensorboard --logdir (pip install tensorboard)")
    # FixMatch recipe (None = per-dataset default, see DATASET_DEFAULTS)
    steps: int | None = arg(None, "training steps K (default 2^20; digits 1500)")
    batch_size: int | None = arg(None, "labeled batch B, global over all processes (default 64; digits 16)")
    uratio: int = arg(7, "unlabeled batch = uratio * B (mu)")
    threshold: float | None = arg(None, "confidence threshold tau for pseudo-labels (default 0.95)")
    lambda_u: float | None = arg(None, "weight of the unsupervised (pseudo-label) loss (default 1)")
    lr: float = arg(0.03, "SGD learning rate, cosine-decayed as lr*cos(7*pi*k/(16*K))")
    weight_decay: float | None = arg(None, "L2 on conv/linear weights (default 5e-4; cifar100 1e-3)")
    ema: float | None = arg(None, "decay d of the weight EMA used for evaluation, warmed up as min(d, (1+k)/(10+k)) "
                                  "(default 0.999)")
    eval_every: int | None = arg(None, "steps between evaluations and checkpoints (default 1024; digits 25)")
    arch: str | None = arg(None, "network: WideResNet (--depth, --widen, --stages) or torchvision's ResNet (3x3 "
                                 "stem without max-pool below 96 px, ImageNet stem from 96 px) (default wrn; "
                                 "imagenet100 resnet50)", choices=["wrn", "resnet18", "resnet50"])
    pretrained: str = arg("", "start a ResNet from a torchvision state dict FILE, or from torchvision's ImageNet-1k "
                              "weights with 'imagenet' (downloaded), normalising inputs as they expect", metavar="FILE")
    depth: int = arg(28, "WideResNet depth 6n+4: n blocks per stage")
    stages: int | None = arg(None, "WideResNet stages: 3 (WRN-28-k) or 4 (WRN-37-k, first stage stride 2; "
                                   "default for stl10)", choices=[3, 4])
    widen: int | None = arg(None, "WideResNet widening factor (default 2; cifar100 8)")
    hflip: bool | None = arg(None, "random horizontal flip in weak augmentation (default on; off for svhn, digits)")
    augment: str | None = arg(None, "strong augmentation: fixmatch (the FixMatch paper's RandAugment) or usb (USB's "
                                    "and TorchSSL's RandAugment(3, 5)) (default fixmatch; imagenet100 usb)",
                              choices=["fixmatch", "usb"])
    # LayerMatch (None = per-algorithm default, see ALGORITHM_DEFAULTS)
    grad_relu: str | None = arg(None, "pseudo-label gradient into the head (layermatch, gradrelu: zero; else off)",
                                choices=["zero", "relu", "off"])
    lambda_ac: float | None = arg(None, "weight of the Avg-Clustering loss (layermatch, avgclustering: 1; else 0)")
    ac_momentum: float = arg(0.99, "momentum alpha of the Avg-Clustering class centres")
    # speed
    precision: str | None = arg(None, "autocast dtype; fp16 adds a GradScaler (default: bf16 on CUDA GPUs of compute "
                                "capability >= 8.0, fp16 on older ones, else fp32)", choices=["bf16", "fp16", "fp32"])
    channels_last: bool = arg(True, "channels_last memory format (faster convolutions on GPUs and recent CPUs)")
    compile: bool = arg(False, "torch.compile the model")
    # instead of training
    evaluate: bool = arg(False, "report the test accuracy of the run in --out (EMA and live model), then exit")
    table: str = arg("", "print the results table of finished runs (summary.json) below DIR, then exit", metavar="DIR")
    baseline: str = arg("fixmatch", "--table: paired with this algorithm", choices=algorithm.metadata["choices"])
    markdown: bool = arg(False, "--table: also a column per seed, for a markdown file")

DATASET_DEFAULTS = {  # FixMatch protocol; digits is sized for a 2-core CPU demo.
    "cifar10": dict(), "cifar100": dict(widen=8, weight_decay=1e-3), "svhn": dict(hflip=False),
    "stl10": dict(stages=4),  # WRN-37-2 in USB's layout (wrn_var_37_2; README: Network)
    "digits": dict(steps=1500, batch_size=16, eval_every=25, hflip=False), "folder": dict(),
    "imagenet100": dict(arch="resnet50", image_size=224, batch_size=32, weight_decay=3e-4, augment="usb")}  # TorchSSL
BASE_DEFAULTS = dict(steps=2**20, batch_size=64, eval_every=1024, widen=2, stages=3, weight_decay=5e-4, ema=0.999,
                     hflip=True, threshold=0.95, lambda_u=1.0, arch="wrn", image_size=32, augment="fixmatch")
ALGORITHM_DEFAULTS = {  # the ablations gradrelu and avgclustering: FixMatch plus one part of LayerMatch
    "layermatch": dict(grad_relu="zero", lambda_ac=1.0), "fixmatch": dict(grad_relu="off", lambda_ac=0.0),
    "gradrelu": dict(grad_relu="zero", lambda_ac=0.0), "avgclustering": dict(grad_relu="off", lambda_ac=1.0),
    "supervised": dict(grad_relu="off", lambda_ac=0.0)}
IDENTITY = ("dataset", "labels", "seed", "algorithm")  # an experiment
SAME_RUN = IDENTITY + ("arch", "pretrained", "image_size", "depth", "widen", "stages")  # a resumed run agrees on these
MIN_SIDE = 3  # pixels: the smallest image every augmentation op handles (Sharpness's 3x3 filter)
ARCHS = ("wrn", "resnet18", "resnet50")

class UserError(Exception):
    """A mistake in the input: reported as one line, no traceback."""

class Interrupted(Exception):
    """A stop signal arrived; the checkpoint has been written."""

    def __init__(self, signum, step, out):
        super().__init__(f"interrupted by {signal.Signals(signum).name}: checkpoint of step {step} saved in '{out}'; "
                         "--resume continues it")
        self.signum = signum

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UserError(f"{message} (see --help)")

def parse_args(argv=None) -> Config:
    p = Parser(description="LayerMatch / FixMatch semi-supervised training (arXiv 2406.14207).", allow_abbrev=False)
    for f in dataclasses.fields(Config):
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)
        flag, meta = "--" + f.name.replace("_", "-"), dict(f.metadata)
        if f.default not in (None, "") and "default" not in meta["help"]:
            meta["help"] += f" (default: {f.default})"
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, **meta)
        else:
            meta.setdefault("metavar", None if "choices" in meta else kind.__name__.upper())
            p.add_argument(flag, type=kind, default=f.default, **meta)
    return Config(**vars(p.parse_args(argv)))

def resolve(cfg: Config, user_data: bool) -> Config:
    """Fill the None fields from the dataset and algorithm tables and check every value."""
    if not user_data and cfg.dataset not in DATASET_DEFAULTS:
        raise UserError(f"unknown dataset '{cfg.dataset}' (choose from {', '.join(DATASET_DEFAULTS)})")
    if cfg.algorithm not in ALGORITHM_DEFAULTS:
        raise UserError(f"unknown algorithm '{cfg.algorithm}' (choose from {', '.join(ALGORITHM_DEFAULTS)})")
    unused = [k for k in ("threshold", "lambda_u", "lambda_ac", "grad_relu") if getattr(cfg, k) is not None]
    if cfg.algorithm == "supervised" and unused:
        raise UserError(f"--algorithm supervised uses no pseudo-labels, so --{unused[0].replace('_', '-')} "
                        "would be ignored; drop it or choose another algorithm")
    defaults = {**BASE_DEFAULTS, **DATASET_DEFAULTS.get(cfg.dataset, {}), **ALGORITHM_DEFAULTS[cfg.algorithm]}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None},
                              out=cfg.out or f"runs/{cfg.dataset}@{cfg.labels}-{cfg.algorithm}-s{cfg.seed}")
    for name, lo in dict(labels=1, steps=1, batch_size=1, uratio=1, eval_every=1, widen=1, image_size=MIN_SIDE).items():
        if getattr(cfg, name) < lo:
            raise UserError(f"--{name.replace('_', '-')} must be at least {lo} (got {getattr(cfg, name)})")
    checks = [(0 < cfg.threshold <= 1, "--threshold must be in (0, 1]"), (cfg.lr > 0, "--lr must be positive"),
              (0 <= cfg.ema < 1 and 0 <= cfg.ac_momentum < 1, "--ema and --ac-momentum must be in [0, 1)"),
              (cfg.weight_decay >= 0 and cfg.lambda_u >= 0 and cfg.lambda_ac >= 0, "weights and decays must be >= 0"),
              (cfg.depth >= 10 and (cfg.depth - 4) % 6 == 0, "--depth must be 6n+4 with n >= 1 (e.g. 28)"),
              (cfg.stop_at >= 0 and cfg.checkpoint_minutes >= 0, "--stop-at and --checkpoint-minutes must be >= 0"),
              (not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other"),
              (0 <= cfg.seed < 2**32, f"--seed must be in 0..{2**32 - 1} (got {cfg.seed})"),  # (rank offsets: 64 bits)
              (cfg.arch in ARCHS, f"unknown --arch '{cfg.arch}' (choose from {', '.join(ARCHS)})"),
              (not cfg.pretrained or cfg.arch != "wrn", "--pretrained needs --arch resnet18 or resnet50")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return cfg

# ---------------------------------------------------------------------------------------------
# Data: whole datasets as uint8 tensors [N, C, H, W], labels int64 (load_data reads them, after the method)

def check_data(data: dict):
    """Validate the data (user tensors especially) so that mistakes are one clear line before any work starts."""
    keys = ("train_x", "train_y", "test_x", "test_y", "unlabeled_x", "classes", "mean_std")
    if not isinstance(data, dict) or not set(data) <= set(keys):
        raise UserError(f"data must be a dict with keys {', '.join(keys[:4])} and optionally unlabeled_x "
                        f"(more images, no labels), classes (names) and mean_std (train_x's per-channel mean and std)")
    for split in ("train", "test"):
        x, y = data.get(f"{split}_x"), data.get(f"{split}_y")
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.ndim == 4 and len(x)):
            raise UserError(f"data['{split}_x'] must be a uint8 tensor [N, C, H, W] with N >= 1")
        if not (isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.shape == (len(x),)):
            raise UserError(f"data['{split}_y'] must be an int64 tensor [N] matching data['{split}_x']")
    u, test, shape = data.get("unlabeled_x"), data["test_x"], data["train_x"].shape[1:]
    bad_u = u is not None and not (isinstance(u, torch.Tensor) and u.dtype == torch.uint8 and u.shape[1:] == shape)
    if bad_u or test.shape[1] != shape[0] or any(a > b for a, b in zip(test.shape[2:], shape[1:])):
        raise UserError(f"image tensors must be uint8 of the train images' shape [N, {', '.join(map(str, shape))}] "
                        "(test images may be smaller: training then takes random crops of their size)")
    if shape[0] not in (1, 3) or min(test.shape[2:]) < MIN_SIDE:
        raise UserError(f"images must have 1 (grayscale) or 3 (RGB) channels (RandAugment's colour ops) and at least "
                        f"{MIN_SIDE}x{MIN_SIDE} pixels (its Sharpness filter); got [N, {', '.join(map(str, shape))}]")
    num_classes = int(data["train_y"].max()) + 1
    if min(data["train_y"].min(), data["test_y"].min()) < 0 or num_classes < 2:
        raise UserError("labels must be 0..num_classes-1, with at least 2 classes")
    if data["test_y"].max() >= num_classes:
        raise UserError(f"test label {int(data['test_y'].max())} is not a training class (training labels are "
                        f"0..{num_classes - 1}): its images would count as wrong whatever the model predicts")
    names = data.get("classes")
    if names is not None and (not isinstance(names, (list, tuple)) or len(names) != num_classes):
        raise UserError(f"data['classes'] must be a list of {num_classes} class names, one per training label")

def labeled_subset(y: torch.Tensor, n_labels: int, num_classes: int, seed: int, names=None) -> torch.Tensor:
    """Indices of a class-balanced labeled subset: n_labels / num_classes images of every class."""
    if n_labels % num_classes:
        raise UserError(f"--labels {n_labels} is not divisible by the {num_classes} classes")
    per_class, counts = n_labels // num_classes, torch.bincount(y, minlength=num_classes)
    if per_class > counts.min():
        k = counts.argmin().item()
        raise UserError(f"--labels {n_labels} asks for {per_class} per class, but class "
                        f"{repr(names[k]) if names else k} has only {counts.min().item()} training images")
    g = torch.Generator().manual_seed(seed)
    picks = [(y == k).nonzero().squeeze(1) for k in range(num_classes)]
    return torch.cat([idx[torch.randperm(len(idx), generator=g)[:per_class]] for idx in picks])

# ---------------------------------------------------------------------------------------------
# Augmentation: batched, on the device, per-image random parameters; uint8 in, uint8 out.

def reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Map any integer coordinate into [0, n) by mirroring at the borders (numpy 'reflect' padding)."""
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)

def weak_augment(x: torch.Tensor, gen: torch.Generator, hflip: bool, crop: tuple | None = None) -> torch.Tensor:
    """Random flip, then a random crop (default: the images' size) of the image reflect-padded by 12.5% of the side (at
    32 px RandomCrop(32, padding=4)), or by 4 px from images stored larger (TorchSSL's 224 of 256). One gather."""
    N, C, H, W = x.shape
    (h, w), dev = crop or (H, W), x.device
    py, px = (round(0.125 * h), round(0.125 * w)) if (h, w) == (H, W) else (4, 4)
    dy = torch.randint(-py, H - h + py + 1, (N, 1), device=dev, generator=gen)
    dx = torch.randint(-px, W - w + px + 1, (N, 1), device=dev, generator=gen)
    rows = reflect(torch.arange(h, device=dev) + dy, H)  # [N, h]
    cols = reflect(torch.arange(w, device=dev) + dx, W)  # [N, w]
    flip = (torch.rand(N, 1, device=dev, generator=gen) < 0.5) & bool(hflip)  # drawn either way: the same stream
    cols = torch.where(flip, W - 1 - cols, cols)  # the crop of the flipped image: RandomHorizontalFlip, then RandomCrop
    pixel = (rows[:, :, None] * W + cols[:, None, :]).view(N, 1, h * w).expand(N, C, h * w)
    return x.flatten(2).gather(2, pixel).view(N, C, h, w)

def autocontrast(x):
    """PIL's autocontrast: each channel stretched from [lo, hi] to [0, 255] in integers, a constant one unchanged."""
    lo, hi = (v.int() for v in (x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)))
    stretched = (x.int() - lo) * 255 // (hi - lo).clamp(min=1)
    return torch.where(hi > lo, stretched, x.int()).to(torch.uint8)

def blend(x, degenerate, factor):
    """PIL's ImageEnhance: degenerate + factor (x - degenerate) in float32, truncated to uint8 as PIL's blend."""
    out = degenerate + factor.view(-1, 1, 1, 1) * (x.float() - degenerate)
    return out.clamp_(0, 255).to(torch.uint8)  # float -> uint8 truncates

def grayscale(x):
    """PIL's convert("L"): integer ITU-R 601-2 luma (19595 R + 38470 G + 7471 B + 2^15) >> 16, as float."""
    if x.shape[1] == 1:
        return x.float()
    r, g, b = x.int().unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16)[:, None].float()

def sharpen_degenerate(x):
    """PIL's SMOOTH filter (3x3, centre weight 5, sum 13) inside, original pixels on the border."""
    C, out = x.shape[1], x.float()  # a new tensor: x is uint8
    kernel = torch.ones(3, 3, device=x.device)  # built on the device: a tensor from a list would sync
    kernel[1, 1] = 5
    out[:, :, 1:-1, 1:-1] = F.conv2d(out, (kernel / 13).expand(C, 1, 3, 3), groups=C).round()
    return out

def enhance_factor(level):
    """0.1 + 1.8 L / 10 as (5 + 9 L) / 50: one float32 rounding, the float32 of the references' double exactly."""
    return (5 + 9 * level) / 50

def affine(x, m, op, fill=128):
    """Rotate / ShearX / ShearY / TranslateX / TranslateY by m (degrees, shear factor, pixels) as PIL's: rotation about
    the centre, shears about the top-left corner, nearest neighbour, uncovered pixels fill (FixMatch 128, USB 0)."""
    N, C, H, W = x.shape
    m = m.float()
    angle, one, zero = torch.deg2rad(m), torch.ones_like(m), torch.zeros_like(m)
    A = {  # per op: 2x3 matrix in pixel units, coordinates about the image centre
        7: [[angle.cos(), -angle.sin(), zero], [angle.sin(), angle.cos(), zero]],
        8: [[one, m, m * H / 2], [zero, one, zero]],  # the shift moves the shear's origin to the corner
        9: [[one, zero, zero], [m, one, m * W / 2]],
        10: [[one, zero, m], [zero, one, zero]], 11: [[one, zero, zero], [zero, one, m]]}
    mats = torch.stack([torch.stack([torch.stack(r, -1) for r in A[k]], -2) for k in A])  # [5, N, 2, 3]
    k = (op - 7).clamp(0, 4)  # on accelerators every image comes here, whatever its op; where() drops the rest
    theta = mats.gather(0, k.view(1, N, 1, 1).expand(1, N, 2, 3))[0].clone()
    theta[:, 0, 1] *= H / W  # pixels -> grid_sample's [-1, 1] coordinates: D^-1 A D, D = diag(W/2, H/2)
    theta[:, 1, 0] *= W / H
    theta[:, 0, 2] *= 2 / W
    theta[:, 1, 2] *= 2 / H
    grid = F.affine_grid(theta, [N, C, H, W], align_corners=False)
    out = F.grid_sample(x.float() - fill, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return (out + fill).round_().clamp_(0, 255).to(torch.uint8)

# The 14 RandAugment ops of FixMatch's "RA" variant and of USB; (x uint8 [n,C,H,W], magnitude m [n] in the op's unit).
COLOR_OPS = {
    1: lambda x, m: autocontrast(x),
    2: lambda x, m: TF.equalize(x),
    3: lambda x, m: blend(x, torch.zeros((), device=x.device), m),  # Brightness, m = blend factor
    4: lambda x, m: blend(x, grayscale(x), m),  # Color
    5: lambda x, m: blend(x, (grayscale(x).mean((1, 2, 3), keepdim=True) + 0.5).floor(), m),  # Contrast: PIL's mean
    6: lambda x, m: blend(x, sharpen_degenerate(x), m),  # Sharpness
    12: lambda x, m: x & (0xFF << (8 - m.int())).to(torch.uint8).view(-1, 1, 1, 1),  # Posterize: keep m bits
    13: lambda x, m: torch.where(x >= m.view(-1, 1, 1, 1), 255 - x, x)}  # Solarize: invert from threshold m on
GEOMETRIC_OPS = (7, 8, 9, 10, 11)  # Rotate, ShearX, ShearY, TranslateX, TranslateY; 0 is Identity

def fixmatch_magnitudes(level, sign, H, W):
    """[14, n]: each op's magnitude at FixMatch RA's level L in 1..9 (of 10) with a random sign (README: table)."""
    L, s = level.float(), sign.float()
    f, zero = enhance_factor(L), torch.zeros_like(L)
    return torch.stack([zero, zero, zero, f, f, f, f, 3 * L * s, 0.03 * L * s, 0.03 * L * s, L * s * W / 32,
                        L * s * H / 32, 4 - (0.4 * L).floor(), 256 - (25.6 * L).floor()])

def usb_magnitudes(u, H, W):
    """[14, n]: each op's magnitude in USB's RandAugment(3, 5), uniform in its range (README: table), u ~ U[0, 1)."""
    v, zero = 2 * u - 1, torch.zeros_like(u)
    f = 0.05 + 0.9 * u
    return torch.stack([zero, zero, zero, f, f, f, f, 30 * v, 0.3 * v, 0.3 * v, 0.3 * W * v, 0.3 * H * v,
                        (4 + 4 * u).floor(), 256 * u])

_FORCE_ACCELERATOR_PATHS = False  # tests set this to run the CPU through every path that CUDA/MPS take

def accelerator_paths(device: torch.device) -> bool:
    return device.type != "cpu" or _FORCE_ACCELERATOR_PATHS

def apply_to(x, chosen, op, *params):
    """x with op applied where `chosen`: on the CPU to those images only; on an accelerator to all, then selected, as
    a data-dependent size would force a host sync. The same result: every op is per image."""
    if accelerator_paths(x.device):
        return torch.where(chosen.view(-1, 1, 1, 1), op(x, *params), x)
    idx = chosen.nonzero().squeeze(1)
    if len(idx):
        x[idx] = op(x[idx], *(p[idx] for p in params))
    return x

def strong_augment(x: torch.Tensor, gen: torch.Generator, augment: str = "fixmatch", n_ops: int | None = None):
    """RandAugment + Cutout, per image: n_ops ops drawn with replacement from 14. fixmatch (FixMatch RA): 2 ops, each
    with probability 0.5 at a level in 1..9, then cutout. usb (USB, TorchSSL): 3 ops, all applied, then usb_cutout."""
    N, C, H, W = x.shape
    dev, x, fixmatch = x.device, x.clone(), augment == "fixmatch"
    geometric = functools.partial(affine, fill=128 if fixmatch else 0)
    for _ in range(n_ops or (2 if fixmatch else 3)):
        op = torch.randint(0, 14, (N,), device=dev, generator=gen)
        if fixmatch:
            op = torch.where(torch.rand(N, device=dev, generator=gen) < 0.5, op, 0)  # 0 = Identity
            level = torch.randint(1, 10, (N,), device=dev, generator=gen)
            sign = torch.randint(0, 2, (N,), device=dev, generator=gen) * 2 - 1
            m = fixmatch_magnitudes(level, sign, H, W)
        else:
            m = usb_magnitudes(torch.rand(N, device=dev, generator=gen), H, W)
        m = m.gather(0, op.view(1, N))[0]  # [N]: each image's magnitude for its op
        x = apply_to(x, (op >= 7) & (op <= 11), geometric, m, op)
        for k, fn in COLOR_OPS.items():
            x = apply_to(x, op == k, fn, m)
    return cutout(x, gen) if fixmatch else usb_cutout(x, gen)

def cutout(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A mid-gray square of half the image side around a uniform random centre, clipped at the border."""
    N, C, H, W = x.shape
    dev, h, w = x.device, H // 2, W // 2
    top = (torch.rand(N, 1, 1, device=dev, generator=gen) * H).floor() - h // 2
    left = (torch.rand(N, 1, 1, device=dev, generator=gen) * W).floor() - w // 2
    rows, cols = torch.arange(H, device=dev).view(1, H, 1), torch.arange(W, device=dev).view(1, 1, W)
    hole = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # [N, H, W]
    return x.masked_fill(hole[:, None], 128)

def usb_cutout(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """USB's CutoutAbs(s = v W), v ~ U[0, 0.5]: corner int(max(0, c - s / 2)), c = np.random.uniform(W) in (1, W];
    through corner + s, both ends included (PIL's rectangle); fill (125, 123, 114), grayscale 123 (their luma)."""
    (N, C, H, W), dev = x.shape, x.device
    side, cx, cy = (torch.rand(N, 1, 1, device=dev, generator=gen) * s for s in (0.5 * W, 1, 1))  # s = v W
    left, top = ((n - (n - 1) * c - side / 2).clamp(min=0).floor() for n, c in ((W, cx), (H, cy)))
    right, bottom = ((corner + side).clamp(max=n).floor() for corner, n in ((left, W), (top, H)))
    rows, cols = torch.arange(H, device=dev).view(1, H, 1), torch.arange(W, device=dev).view(1, 1, W)
    hole = (side > 0) & (rows >= top) & (rows <= bottom) & (cols >= left) & (cols <= right)  # [N, H, W]
    fill = torch.full((1, C, 1, 1), 123, dtype=torch.uint8, device=dev)  # built on the device: a list would sync
    if C == 3:
        fill[:, 0], fill[:, 2] = 125, 114
    return torch.where(hole[:, None], fill, x)

# ---------------------------------------------------------------------------------------------
# Network: pre-activation WideResNet as in the FixMatch ports, or torchvision's ResNet; features() and fc kept apart.

BN_MOMENTUM = 0.001  # FixMatch's BatchNorm momentum m, applied by average_running_stats

def BatchNorm(channels):
    """Momentum 1: the buffers hold the batch's statistics, which the loop averages (a per-step momentum recompiles)."""
    return nn.BatchNorm2d(channels, momentum=1.0)

class Block(nn.Module):
    def __init__(self, c_in, c_out, stride, activate_before_residual=False):
        super().__init__()
        self.bn1, self.conv1 = BatchNorm(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = BatchNorm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if c_in == c_out and stride == 1 else nn.Conv2d(c_in, c_out, 1, stride, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x):
        a = F.leaky_relu(self.bn1(x), 0.1)
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(a)), 0.1))
        residual = a if self.activate_before_residual else x  # only the very first block
        return out + (residual if self.shortcut is None else self.shortcut(residual))

class WideResNet(nn.Module):
    """WRN-(6n+4)-k: stages of n blocks, widths 16k, 32k, 64k (, 128k: WRN-37-2 of STL-10, stride 2 from the first)."""

    def __init__(self, num_classes, depth=28, widen=2, in_channels=3, stages=3):
        super().__init__()
        n, widths = (depth - 4) // 6, [16] + [16 * widen * 2**i for i in range(stages)]
        layers = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)]
        for stage in range(stages):
            for i in range(n):
                c_in, stride = widths[stage + (i > 0)], 2 if i == 0 and (stage > 0 or stages == 4) else 1
                layers.append(Block(c_in, widths[stage + 1], stride, stage == i == 0))
        layers += [BatchNorm(widths[-1]), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)  # x [N, C, H, W] -> f [N, widths[-1]]
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        f = self.features(x)
        return self.fc(f), f

class ResNet(nn.Module):
    """torchvision's ResNet-18/50 split as WideResNet; below 96 px the CIFAR stem (3x3 at stride 1, no max-pool)."""

    def __init__(self, arch, num_classes, in_channels=3, image_size=32):
        super().__init__()
        import torchvision.models
        net = getattr(torchvision.models, arch)(norm_layer=BatchNorm)  # momentum 1, as the WideResNet's: see BatchNorm
        if image_size < 96:
            net.conv1, net.maxpool = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.Identity()
        elif in_channels != 3:  # the ImageNet stem for grayscale images
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        self.fc = nn.Linear(net.fc.in_features, num_classes)
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        net.fc = nn.Identity()
        self.features = net  # x [N, C, H, W] -> f [N, 512 (resnet18) or 2048 (resnet50)]

    forward = WideResNet.forward  # (logits, features)

def make_network(cfg: dict, num_classes: int, shape) -> nn.Module:
    """The --arch network for images [C, H, W] (cfg: a checkpoint's dict); pretrained weights take RGB (gray too)."""
    if cfg.get("arch", "wrn") == "wrn":
        return WideResNet(num_classes, cfg["depth"], cfg["widen"], shape[0], cfg["stages"])
    return ResNet(cfg["arch"], num_classes, 3 if cfg.get("pretrained") else shape[0], min(shape[1:]))

# ---------------------------------------------------------------------------------------------
# Losses: FixMatch, Grad-ReLU, Avg-Clustering (our reading of arXiv 2406.14207: README, Our reading)

def pseudo_label(z_weak: torch.Tensor, tau: float):
    """FixMatch: hard pseudo-label y_hat = argmax p(weak view), kept where max p >= tau (mask m)."""
    p_max, y_hat = z_weak.detach().float().softmax(1).max(1)
    return y_hat, (p_max >= tau).float()

class GradReLULinear(torch.autograd.Function):
    """z = f W^T + b; backward: the features get g W, the head only ReLU(g)^T f and sum ReLU(g) (`--grad-relu relu`)."""

    @staticmethod
    def forward(ctx, f, weight, bias):
        ctx.save_for_backward(f, weight)
        return F.linear(f, weight, bias)

    @staticmethod
    def backward(ctx, g):
        f, weight = ctx.saved_tensors
        g_head = g.float().clamp(min=0)
        return ((g @ weight.to(g.dtype)).to(f.dtype), (g_head.t() @ f.float()).to(weight.dtype),
                g_head.sum(0).to(weight.dtype))

def grad_relu_logits(f: torch.Tensor, fc: nn.Linear, mode: str) -> torch.Tensor:
    """Head logits for the pseudo-label loss. Grad-ReLU "removes the gradient detrimental effects of
    pseudo-labels in the linear classification layer" (abstract): with `zero` the head's parameters are
    detached here, so dL_u/dW = dL_u/db = 0 while dL_u/df is unchanged from FixMatch."""
    if mode == "zero":
        return F.linear(f, fc.weight.detach(), fc.bias.detach())
    if mode == "relu":
        return GradReLULinear.apply(f, fc.weight, fc.bias)
    return fc(f)  # off: plain FixMatch

def consistent(mask, z_strong, y_hat):
    """Unlabeled Avg-Clustering contributors: confident (m = 1) and the strong view's argmax agrees with y_hat."""
    return mask * (z_strong.argmax(1) == y_hat)

def cluster_sums(f, y, weight, num_classes):
    """Per-class sum of unit-normalised features and per-class contributor counts (weight in {0, 1})."""
    f = F.normalize(f.detach().float(), dim=1) * weight[:, None]
    sums = torch.zeros(num_classes, f.shape[1], device=f.device).index_add_(0, y, f)
    return sums, torch.zeros(num_classes, device=f.device).index_add_(0, y, weight.float())

def avg_clustering_update(centres, seen, sums, counts, alpha):
    """c_k <- normalize(alpha c_k + (1 - alpha) mean_k) for classes with contributors; first c_k = normalize(mean_k)."""
    has = counts > 0
    mean = sums / counts.clamp(min=1)[:, None]
    new = F.normalize(torch.where(seen[:, None], alpha * centres + (1 - alpha) * mean, mean), dim=1)
    return torch.where(has[:, None], new, centres), seen | has

def avg_clustering_loss(f_strong, centres, seen, y_hat, mask):
    """L_ac = (1/muB) sum m (1 - cos(f_strong, c_yhat)); centres are constants, so only features learn."""
    cos = F.cosine_similarity(f_strong.float(), centres[y_hat], dim=1)
    return (mask * seen[y_hat] * (1 - cos)).mean()

def layermatch_loss(z_l, y, z_s, y_hat, mask, f_s, centres, seen, lambda_u, lambda_ac):
    """L = L_s + lambda_u L_u + lambda_ac L_ac. z_s must come from grad_relu_logits(f_s, ...)."""
    L_s = F.cross_entropy(z_l.float(), y)
    L_u = (F.cross_entropy(z_s.float(), y_hat, reduction="none") * mask).mean()
    L_ac = avg_clustering_loss(f_s, centres, seen, y_hat, mask) if lambda_ac else torch.zeros_like(L_u)
    return L_s + lambda_u * L_u + lambda_ac * L_ac, dict(L_s=L_s, L_u=L_u, L_ac=L_ac)

# ---------------------------------------------------------------------------------------------
# One step of LayerMatch: from a batch of images to the loss

def all_reduce(*tensors):
    if dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)

def avg_clustering_step(f, y, weight, centres, seen, alpha):
    """The centres updated with the contributors' (weight 1) features, summed over all processes: all hold the same."""
    with torch.no_grad():
        sums, counts = cluster_sums(f, y, weight, len(centres))
        all_reduce(sums, counts)
        return avg_clustering_update(centres, seen, sums, counts, alpha)

def layermatch_step(model, head, batch, normalize, gen, centres, seen, cfg, dtype=None):
    """Augment (outside autocast), one forward pass, the loss; no host sync. batch (Batches): uint8 x_l, labels y, u
    with true labels y_u (-1: unknown; diagnostics), crop (H, W) or None. model(x) -> (logits, features), head its
    linear layer; forward and losses under autocast in dtype (None: fp32). Centres for every algorithm (diagnostic)."""
    dev, alpha = centres.device, cfg.ac_momentum
    amp = torch.autocast(dev.type, dtype, enabled=dtype is not None)
    weak = lambda x: weak_augment(x, gen, cfg.hflip, batch["crop"])
    x_l, y = weak(batch["x_l"]), batch["y"]
    if cfg.algorithm == "supervised":
        with amp:
            z_l, f_l = model(normalize(x_l))
            loss = F.cross_entropy(z_l.float(), y)  # L_s alone
            return loss, dict(L_s=loss), *avg_clustering_step(f_l, y, torch.ones_like(y), centres, seen, alpha)
    u, B, uB = batch["u"], len(y), len(batch["u"])
    x_w = weak(u)  # the strong view draws its own crop; images stored larger than it are RandAugmented first (TorchSSL)
    x_s = weak(strong_augment(u, gen, cfg.augment)) if batch["crop"] else strong_augment(weak(u), gen, cfg.augment)
    with amp:
        z, f = model(normalize(torch.cat([x_l, x_w, x_s])))  # one pass: BatchNorm sees [labeled, weak, strong]
        z_l, z_w, z_s = z.split([B, uB, uB])
        f_l, f_w, f_s = f.split([B, uB, uB])
        y_hat, mask = pseudo_label(z_w, cfg.threshold)
        z_u = grad_relu_logits(f_s, head, cfg.grad_relu)  # the head's share of the pseudo-label gradient
        loss, terms = layermatch_loss(z_l, y, z_u, y_hat, mask, f_s, centres, seen, cfg.lambda_u, cfg.lambda_ac)
        weight = torch.cat([torch.ones_like(mask[:B]), consistent(mask, z_s, y_hat)])  # after L_ac: see README
        centres, seen = avg_clustering_step(torch.cat([f_l, f_w]), torch.cat([y, y_hat]), weight, centres, seen, alpha)
    hidden = batch["y_u"]
    terms |= dict(mask=mask.mean(), pl_correct=(mask * (y_hat == hidden)).sum(), pl_known=(mask * (hidden >= 0)).sum())
    return loss, terms, centres, seen

# ---------------------------------------------------------------------------------------------
# Reading the data (torchvision's datasets, the digits demo, your own images) and pretrained weights

DOWNLOAD_HINTS = {  # what torchvision looks for in --data-dir
    "cifar10": "cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ (www.cs.toronto.edu/~kriz/cifar.html)",
    "cifar100": "cifar-100-python.tar.gz or its extracted cifar-100-python/ (www.cs.toronto.edu/~kriz/cifar.html)",
    "svhn": "train_32x32.mat and test_32x32.mat (http://ufldl.stanford.edu/housenumbers/)",
    "stl10": "stl10_binary.tar.gz or its extracted stl10_binary/ (https://cs.stanford.edu/~acoates/stl10/)",
}

IMAGENET100 = (  # the 100 classes of CMC (Tian et al. 2019, imagenet100.txt), as solo-learn and most SSL papers
    "n01558993 n01692333 n01729322 n01735189 n01749939 n01773797 n01820546 n01855672 n01978455 n01980166 n01983481 "
    "n02009229 n02018207 n02085620 n02086240 n02086910 n02087046 n02089867 n02089973 n02090622 n02091831 n02093428 "
    "n02099849 n02100583 n02104029 n02105505 n02106550 n02107142 n02108089 n02109047 n02113799 n02113978 n02114855 "
    "n02116738 n02119022 n02123045 n02138441 n02172182 n02231487 n02259212 n02326432 n02396427 n02483362 n02488291 "
    "n02701002 n02788148 n02804414 n02859443 n02869837 n02877765 n02974003 n03017168 n03032252 n03062245 n03085013 "
    "n03259280 n03379051 n03424325 n03492542 n03494278 n03530642 n03584829 n03594734 n03637318 n03642806 n03764736 "
    "n03775546 n03777754 n03785016 n03787032 n03794056 n03837869 n03891251 n03903868 n03930630 n03947888 n04026417 "
    "n04067472 n04099969 n04111531 n04127249 n04136333 n04229816 n04238763 n04336792 n04418357 n04429376 n04435653 "
    "n04485082 n04493381 n04517823 n04589890 n04592741 n07714571 n07715103 n07753275 n07831146 n07836838 n13037406 "
    "n13040303"
).split()

def load_digits():
    """scikit-learn's bundled 8x8 digits (1797 images, no download): a fixed 1297/500 train/test split."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise UserError("the digits demo needs scikit-learn: pip install scikit-learn") from None
    d = sklearn_digits()
    x = torch.from_numpy(d.images * (255 / 16)).round().to(torch.uint8)[:, None]  # [1797, 1, 8, 8]
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # same split for every --seed
    train, test = perm[:1297], perm[1297:]
    return dict(train_x=x[train], train_y=y[train], test_x=x[test], test_y=y[test])

def load_data(cfg: Config) -> dict:
    """Returns dict(train_x, train_y, test_x, test_y, unlabeled_x or None); downloads if needed."""
    if cfg.dataset == "digits":
        return load_digits()
    if cfg.dataset == "folder":
        return load_folder(cfg.data_dir, cfg.image_size, cfg.cache_dir)
    if cfg.dataset == "imagenet100":
        d = load_folder(cfg.data_dir, cfg.image_size, cfg.cache_dir, IMAGENET100, squash=True)  # as TorchSSL feeds it
        return d | dict(mean_std=tuple(255 * torch.tensor(v, dtype=torch.float64) for v in IMAGENET_MEAN_STD))
    import torchvision.datasets as D
    nhwc = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # CIFAR stores [N, H, W, C]
    cls = getattr(D, cfg.dataset.upper())  # CIFAR10, CIFAR100, SVHN or STL10
    try:
        if cfg.dataset in ("cifar10", "cifar100"):
            tr, te = (cls(cfg.data_dir, train=t, download=True) for t in (True, False))
            return dict(train_x=nhwc(tr.data), train_y=torch.tensor(tr.targets), test_x=nhwc(te.data),
                        test_y=torch.tensor(te.targets), unlabeled_x=None, classes=tr.classes)
        splits = ("train", "test") if cfg.dataset == "svhn" else ("train", "test", "unlabeled")
        sets = [cls(cfg.data_dir, split=s, download=True) for s in splits]
        return dict(train_x=torch.from_numpy(sets[0].data), train_y=torch.from_numpy(sets[0].labels).long(),
                    test_x=torch.from_numpy(sets[1].data), test_y=torch.from_numpy(sets[1].labels).long(),
                    unlabeled_x=torch.from_numpy(sets[2].data) if len(sets) > 2 else None)
    except Exception as e:  # no internet, a half-downloaded file, a read-only --data-dir ...
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise UserError(f"could not load {cfg.dataset} from '{cfg.data_dir}' ({reason}). Without internet, put "
                        f"{DOWNLOAD_HINTS[cfg.dataset]} into '{cfg.data_dir}' or pass --data-dir") from None

def read_image(path: str, size: int, squash: bool = False) -> bytes:
    """An image file -> RGB bytes [3, size, size]: shorter side to size (antialiased bilinear), centre crop; or, squash,
    resized to size x size (TorchSSL's ImageNet). PIL only: safe in a forked process."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = TF.center_crop(TF.resize(im.convert("RGB"), [size, size] if squash else size), size)
            return b"".join(band.tobytes() for band in im.split())
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # not an image, truncated, a decompression bomb
        raise UserError(f"cannot read image '{path}' ({type(e).__name__}: {e})") from None

def write_images(file: str, start: int, paths: list, size: int, squash: bool) -> int:
    """Decode images into the uint8 file [N, 3, size, size] from image number start on (a decoding process's task)."""
    pixels = b"".join(read_image(p, size, squash) for p in paths)
    with open(file, "r+b") as fh:
        fh.seek(start * 3 * size * size)
        fh.write(pixels)
    return len(paths)

def usable_cpus() -> int:
    """The CPUs this process may use: under Slurm or in a container, fewer than the host's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

CHUNK = 32  # images per task of a decoding process, at most

def die_with_parent():
    """A decoding process ends with its run (Linux), which may be SIGKILLed; else it holds the run's locks forever."""
    if sys.platform == "linux":
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the run died before that (init adopted this process)
            os._exit(1)

def decode_into(file: str, paths: list, size: int, squash: bool = False):
    """Decode into file, made uint8 [N, 3, size, size], by one process per CPU this process may use (threads: the GIL).
    A bad image cancels the tasks not yet started."""
    with open(file, "wb") as fh:
        fh.truncate(len(paths) * 3 * size * size)
    cores = usable_cpus()
    chunk = max(1, min(CHUNK, len(paths) // (4 * cores)))  # a few tasks per process at least, to balance the load
    starts, work = range(0, len(paths), chunk), functools.partial(write_images, file, size=size, squash=squash)
    workers = min(cores, -(-len(paths) // CHUNK))  # a small folder is decoded here, without starting processes
    pool = ProcessPoolExecutor(workers, initializer=die_with_parent) if workers > 1 else None
    with pool or contextlib.nullcontext(), \
            tqdm(total=len(paths), desc="decoding", unit="img", disable=len(paths) < 1000, leave=False) as bar:
        for n in (pool.map if pool else map)(work, starts, [paths[i:i + chunk] for i in starts]):
            bar.update(n)

def read_images(paths: list, size: int) -> torch.Tensor:
    """Image files -> uint8 [N, 3, size, size] in memory (e.g. for predict), decoded as for the cache."""
    with tempfile.TemporaryDirectory() as folder:
        file, shape = os.path.join(folder, "images.u8"), (len(paths), 3, size, size)
        decode_into(file, paths, size)
        return torch.from_file(file, size=math.prod(shape), dtype=torch.uint8).view(shape).clone()

@contextlib.contextmanager
def cache_lock(path: str):
    """Yields whether it holds an exclusive lock on the file path while the block runs (the system releases it when the
    process and its decoding processes end): the processes of one node decode once. The cache is right without it."""
    with open(path, "a") as fh:
        try:
            import fcntl
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (unlike lockf, also between this process's threads)
        except BlockingIOError:
            print(f"note: waiting for another process decoding into the image cache ('{path}')", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError) as e:  # Windows; ENOLCK: NFS without its lock service; ENOSYS: Lustre, no locks
            print(f"note: no lock on '{path}' ({e}): processes that start together may each decode", file=sys.stderr)
            fcntl = None  # no lock held
        yield fcntl is not None

def read_json(path: str, needs: dict | None = None) -> dict:
    """The JSON object in path, {} if absent. needs (a run's files: {key: type}): a file that is not an object with
    those keys and types is an error; without, it reads as {}."""
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        obj = None
    if needs is not None and not (isinstance(obj, dict) and all(isinstance(obj.get(k), t) for k, t in needs.items())):
        raise UserError(f"'{path}' is unreadable or corrupt (not the JSON object a run writes); it was left untouched: "
                        "move it away, or replace the run with --overwrite")
    return obj if isinstance(obj, dict) else {}

def cache_meta(stem: str, nbytes: int) -> dict | None:
    """A complete cache's meta: stem.json (published last) read, stem.u8 of nbytes; None if not published yet."""
    meta, u8 = read_json(f"{stem}.json"), f"{stem}.u8"
    return meta if meta and os.path.exists(u8) and os.path.getsize(u8) == nbytes else None

def cached_images(part: str, paths: list, root: str, size: int, cache_dir: str, n_stats: int, squash: bool,
                  only: list | None) -> tuple:
    """(images [N, 3, size, size] mapped from cache_dir, meta: grayscale?, mean and std of the first n_stats). Keyed by
    names, sizes, mtimes: a changed file is never read from an old cache. Where the lock works, a node decodes once."""
    listing = [(os.path.relpath(p, root), st.st_size, st.st_mtime_ns) for p in paths for st in [os.stat(p)]]
    key = hashlib.sha256(json.dumps([size, squash, n_stats, listing]).encode()).hexdigest()[:16]
    folder = hashlib.sha256("\n".join([root, *(only or [])]).encode()).hexdigest()[:8]  # and the class subset
    family = os.path.join(cache_dir, f"{os.path.basename(root)}-{folder}-{part}-{size}px{'-squashed' * squash}-")
    stem, shape = family + key, (len(paths), 3, size, size)
    meta = cache_meta(stem, math.prod(shape))
    try:
        if meta is None:
            os.makedirs(cache_dir, exist_ok=True)
            with cache_lock(f"{family}lock") as locked:
                meta = cache_meta(stem, math.prod(shape)) or write_cache(paths, shape, stem, n_stats, squash, locked)
    except OSError as e:
        raise UserError(f"cannot write the image cache file '{e.filename or cache_dir}' ({e.strerror or e}); free "
                        "space there or pass --cache-dir DIR on a disk with hard links") from None
    if meta is None:  # a published cache is never replaced, and this one was not written by this program
        raise UserError(f"the image cache '{stem}.u8' or its .json is cut off or corrupt: delete both and run again")
    return torch.from_file(f"{stem}.u8", size=math.prod(shape), dtype=torch.uint8).view(shape), meta

def write_cache(paths, shape, stem, n_stats, squash, locked) -> dict | None:
    """Decode into a file of this process's own, publish it as stem.u8, then its meta as stem.json (the mark of a whole
    cache): any processes on any nodes may write one at once; the first to publish a file wins, none is replaced."""
    host, start, nbytes = socket.gethostname(), time.time(), math.prod(shape)
    tmp, any_key = f"{stem}.{os.getpid()}-{threading.get_ident()}@{host}.tmp", glob.escape(stem[:-16]) + "[0-9a-f]" * 16
    try:
        for old in glob.glob(f"{any_key}.*@{glob.escape(host)}.tmp") if locked else []:
            with contextlib.suppress(FileNotFoundError):  # this host's killed writes (another writer may clean too)
                os.remove(old)
        decode_into(tmp, paths, shape[-1], squash)
        x = torch.from_file(tmp, size=nbytes, dtype=torch.uint8).view(shape)
        gray = all(torch.equal(c[:, 0], c[:, 1]) and torch.equal(c[:, 0], c[:, 2]) for c in x.split(256))
        mean, std = channel_mean_std(x[:n_stats]) if n_stats else (torch.zeros(3), torch.zeros(3))
        del x  # unmapped: every byte is in the file
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())  # on the disk before any run maps it
        meta = dict(gray=gray, images=len(paths), size=shape[-1], mean=mean.tolist(), std=std.tolist())
        for name, text in ((f"{stem}.u8", None), (f"{stem}.json", json.dumps(meta))):  # the .json last
            if text:
                write_text(tmp, text, tmp)  # (a new file: the .u8's name is gone)
            with contextlib.suppress(FileExistsError):  # another writer's, of the same pixels, stays: runs may map it
                os.link(tmp, name)  # atomic where rename is (NFS too), and never replaces: NFS drops a replaced file
            os.remove(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    others = []
    with contextlib.suppress(OSError):  # (one deleted meanwhile: no count)
        others = [os.path.getsize(f) for f in glob.glob(f"{any_key}.u8") if f != f"{stem}.u8"]  # other dates or files
    print(f"note: decoded {len(paths)} images in {time.time() - start:.1f} s into '{stem}.u8' ({nbytes / 1e9:.3g} GB); "
          "later runs map it" + f"; {len(others)} other cache(s) of this folder ({sum(others) / 1e9:.3g} GB) stay "
          "beside it: delete them when no run uses them" * bool(others), file=sys.stderr)
    return cache_meta(stem, nbytes)

def load_folder(root: str, size: int, cache_dir: str, only: list | None = None, squash: bool = False) -> dict:
    """ImageFolder layout: root/train/<class>/*, root/test/<class>/* (or val/, as ImageNet's), optional root/unlabeled/
    (any depth); 1 channel if every image has R = G = B. only: those classes (ImageNet-100). Train and unlabeled share
    one cache, so the pool is a view. squash (TorchSSL): train images int(size / 0.875) squared, test size squared."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset
    root = os.path.realpath(root)  # any spelling of a folder finds its cache

    def labeled(split, class_to_idx=None):  # (class names, [(path, label)]); test takes train's labels
        path = os.path.join(root, split)
        try:
            classes, own = find_classes(path)
            if only:
                missing = sorted(set(only) - set(classes))
                if missing:
                    raise UserError(f"'{path}' lacks {len(missing)} of the {len(only)} classes, e.g. '{missing[0]}'")
                classes, own = sorted(only), {c: i for i, c in enumerate(sorted(only))}
            class_to_idx = class_to_idx or own
            unknown = sorted(set(classes) - set(class_to_idx))
            if unknown:
                raise UserError(f"the test class '{unknown[0]}' in '{path}' is not a folder of '{root}/train'")
            return classes, make_dataset(path, class_to_idx, IMG_EXTENSIONS)
        except FileNotFoundError as e:  # no folder, no class folders, a class without images
            raise UserError(f"--dataset folder: {e} (expected '{path}/<class>/<image>')") from None
    classes, train = labeled("train")
    has_classes = lambda split: os.path.isdir(p := os.path.join(root, split)) and any(e.is_dir() for e in os.scandir(p))
    split = "test" if has_classes("test") or not has_classes("val") else "val"
    if split == "val" and os.path.isdir(os.path.join(root, "test")):
        print(f"note: '{root}/test' holds no class folders (ImageNet's unlabeled test images?): testing on "
              f"'{root}/val'", file=sys.stderr)
    _, test = labeled(split, {c: i for i, c in enumerate(classes)})
    extra = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(root, "unlabeled")) for f in files
                   if has_file_allowed_extension(f, IMG_EXTENSIONS))
    if os.path.isdir(os.path.join(root, "unlabeled")) and not extra:
        raise UserError(f"--dataset folder: no images in '{os.path.join(root, 'unlabeled')}'")
    home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    cache_dir, n = cache_dir or os.path.join(home, "layermatch"), len(train)
    x, meta = cached_images("train", [p for p, _ in train] + extra, root, int(size / 0.875) if squash else size,
                            cache_dir, n, squash, only)
    t, test_meta = cached_images("test", [p for p, _ in test], root, size, cache_dir, 0, squash, only)
    c = 1 if meta["gray"] and test_meta["gray"] else 3  # 1: every image has R = G = B
    label = lambda samples: torch.tensor([k for _, k in samples])
    return dict(train_x=x[:n, :c], train_y=label(train), test_x=t[:, :c], test_y=label(test),
                unlabeled_x=x[n:, :c] if extra else None, classes=classes,
                mean_std=tuple(torch.tensor(v[:c], dtype=torch.float64) for v in (meta["mean"], meta["std"])))

IMAGENET_MEAN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what torchvision's ImageNet weights expect

def load_pretrained(net: ResNet, arch: str, source: str):
    """--pretrained FILE or 'imagenet': torchvision ResNet weights for net.features (their head classifies others)."""
    import torchvision.models
    try:
        state = torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=True) \
            if source == "imagenet" else torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # no internet, no such file, not a tensor file
        what = f"torchvision's ImageNet weights for {arch} (offline? pass a saved state dict FILE)" \
            if source == "imagenet" else f"'{source}'"
        raise UserError(f"--pretrained: cannot load {what}: {type(e).__name__}: {' '.join(str(e).split())[:120]}") \
            from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--pretrained: '{source}' is not a state dict (names -> tensors) of a torchvision {arch}")
    state, own = {k: v for k, v in state.items() if not k.startswith("fc.")}, net.features.state_dict()
    bad = next((k for k in [*own, *state] if k not in own or k not in state or own[k].shape != state[k].shape), None)
    if bad:
        problem = "missing" if bad not in state else f"not part of a {arch}" if bad not in own else \
            f"shape {list(state[bad].shape)} where this network has {list(own[bad].shape)}"
        raise UserError(f"--pretrained: '{source}' does not fit this {arch} (its stem depends on the image size and "
                        f"channels) at '{bad}': {problem}")
    net.features.load_state_dict(state)

# ---------------------------------------------------------------------------------------------
# Where the images are kept (--data-on) and each step's batch

def channel_mean_std(x: torch.Tensor, values: int = 2**24) -> tuple:
    """Per-channel mean and unbiased std of uint8 [N, C, H, W], exact, from histograms of chunks: bounded memory."""
    hist = torch.zeros(x.shape[1], 256, dtype=torch.int64)
    for part in x.split(max(1, values // x[0].numel())):
        for c in range(x.shape[1]):
            hist[c] += torch.bincount(part[:, c].reshape(-1), minlength=256)
    stats = []
    for h in hist.tolist():  # Python's integers: the sums are exact, and each division rounds once
        n, s1, s2 = sum(h), sum(v * k for v, k in enumerate(h)), sum(v * v * k for v, k in enumerate(h))
        stats.append((s1 / n, math.sqrt((n * s2 - s1 * s1) / (n * (n - 1)))))
    return tuple(torch.tensor(v, dtype=torch.float64) for v in zip(*stats))

def training_memory(net: nn.Module, shape, images_per_step: int, dtype) -> int:
    """Device bytes of a step besides the data: fp32 weights, gradients, momentum, EMA, and the activations saved for
    backward on 8 images on the CPU (bf16 for fp16, the same size), scaled; data_placement keeps 10% for the rest."""
    net, saved = copy.deepcopy(net).cpu(), {}  # a copy: a forward pass changes the BatchNorm buffers

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # several ops save the same tensor
        return t
    channels = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels  # 3 for gray + pretrained
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=dtype is not None):
        net(torch.randn(8, channels, *shape[1:]))
    return 16 * sum(p.numel() for p in net.parameters()) + sum(saved.values()) * images_per_step // 8

def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None where the device works in the host's memory (CPU, MPS)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None

def data_placement(choice: str, data_bytes: int, need_bytes: int, free_bytes: int) -> tuple:
    """--data-on auto | device | host on a GPU: (keep the images in host memory?, why)."""
    fits = data_bytes + need_bytes <= 0.9 * free_bytes
    why = f"{data_bytes / 1e9:.3g} GB of images + ~{need_bytes / 1e9:.3g} GB for training " \
          f"{'fit' if fits else 'do not fit'} in 90% of the {free_bytes / 1e9:.3g} GB free"
    if choice == "device" and not fits:
        raise UserError(f"--data-on device: {why}; pass --data-on host to keep the images in host memory")
    return choice == "host" or not fits, why

def joined(parts: list, where: torch.device) -> torch.Tensor:
    """parts as one tensor on where, no second copy: a view if they are adjacent (one cache), else a buffer."""
    a, n = parts[0], sum(map(len, parts))
    starts = itertools.accumulate([len(p) * a.stride(0) for p in parts], initial=a.storage_offset())
    if where.type == "cpu" and all(p.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() and
                                   p.stride() == a.stride() and p.storage_offset() == start
                                   for p, start in zip(parts, starts)):
        return a.as_strided((n, *a.shape[1:]), a.stride())
    out = torch.empty((n, *a.shape[1:]), dtype=torch.uint8, device=where)
    pieces = [q for p in parts for q in p.split(4096)]  # bounded temporaries for strided (grayscale) views
    for piece, start in zip(pieces, itertools.accumulate(map(len, pieces), initial=0)):
        out[start:start + len(piece)] = piece
    return out

def to_device(data: dict, labeled: torch.Tensor, cfg: Config, device, fmt, on_host=False) -> dict:
    """Images (uint8, on the device or on_host), labels, labeled subset, normalisation: what Batches draws from."""
    where = torch.device("cpu") if on_host else device
    train_x, extra = data["train_x"], data.get("unlabeled_x")
    x_u = joined([train_x] + ([] if extra is None else [extra]), where)  # the unlabeled pool: train + unlabeled
    y = data["train_y"].to(where)
    num_classes = int(data["train_y"].max()) + 1
    mean, std = (255 * torch.tensor(v) for v in IMAGENET_MEAN_STD) if cfg.pretrained else \
        data.get("mean_std") or channel_mean_std(train_x)  # a folder's are stored with its cache
    # pretrained: as its weights were trained, and grayscale images become three equal channels by broadcasting
    mean, std = (v.float().view(1, -1, 1, 1).to(device) for v in (mean, std))
    names, shape = list(data.get("classes") or map(str, range(num_classes))), tuple(data["test_x"].shape[1:])
    crop = shape[1:] if shape != train_x.shape[1:] else None  # training images stored larger: random crops of this
    return dict(x=x_u[:len(y)], y=y, x_u=x_u, crop=crop, y_u=torch.cat([y, y.new_full((len(x_u) - len(y),), -1)]),
                labeled=labeled, on_host=on_host, test_x=data["test_x"].to(where), test_y=data["test_y"].to(device),
                num_classes=num_classes, normalize=lambda x: ((x.float() - mean) / std).contiguous(memory_format=fmt),
                inputs=dict(mean=mean.cpu(), std=std.cpu(), shape=shape, classes=names))

SAMPLER_SEED = 0x5A3D1E5F  # mixed into the sampler's seed: its stream must not repeat the augmentation's

class Batches:
    """Each step's images on the device, drawn i.i.d. by a CPU generator (checkpointed): prefetch() gathers the next
    batch (--data-on host: into pinned buffers) while the GPU works. Both placements give the same batches."""

    def __init__(self, D: dict, B: int, uB: int, device, seed: int):
        self.D, self.B, self.uB, self.device = D, B, uB, device
        self.sampler = torch.Generator().manual_seed(seed ^ SAMPLER_SEED)
        self.pin = device.type == "cuda"  # pinned host memory makes the copies asynchronous; CUDA-only
        self.next, self.state = None, None

    def gather(self, x, i):  # rows i of x, on the device; index_select copies rows (on a CPU 5-40x faster than x[i])
        out = torch.empty((len(i), *x.shape[1:]), dtype=x.dtype, pin_memory=self.pin) if self.D["on_host"] else None
        return torch.index_select(x, 0, i, out=out).to(self.device, non_blocking=True)

    def draw(self) -> dict:
        D, g = self.D, self.sampler
        i_l = D["labeled"][torch.randint(len(D["labeled"]), (self.B,), generator=g)]
        i_u = torch.randint(len(D["x_u"]), (self.uB,), generator=g)  # uB = 0: supervised
        if not D["on_host"]:
            i_l, i_u = ((i.pin_memory() if self.pin else i).to(self.device, non_blocking=True) for i in (i_l, i_u))
        return dict(x_l=self.gather(D["x"], i_l), y=self.gather(D["y"], i_l), u=self.gather(D["x_u"], i_u),
                    y_u=self.gather(D["y_u"], i_u), crop=D["crop"])

    def take(self) -> dict:
        batch, self.next = self.next if self.next is not None else self.draw(), None
        return batch

    def prefetch(self):
        self.state = self.sampler.get_state()  # until this batch is taken, a checkpoint holds the sampler before it
        self.next = self.draw()

    def sampler_state(self) -> torch.Tensor:
        return self.state if self.next is not None else self.sampler.get_state()

# ---------------------------------------------------------------------------------------------
# EMA, schedule, evaluation

def ema_decay(d: float, step: int) -> float:
    """Warmed up as TensorFlow's num_updates: early evaluations average recent weights, not the initialisation."""
    return min(d, (1 + step) / (10 + step))

def running_stats(model: nn.Module) -> list:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var)]

@torch.no_grad()
def average_running_stats(stats: list, before: list, step: int):
    """BatchNorm statistics with momentum max(m, 9/(10+k)) at step k: the EMA's warm-up, so that they describe the
    weights the EMA holds (README, "Averages")."""
    torch._foreach_lerp_(stats, before, ema_decay(1 - BN_MOMENTUM, step))

@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float):
    """Parameters averaged, BatchNorm buffers copied (forgetting the copy breaks EMA evaluation)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    torch._foreach_copy_(list(ema.buffers()), list(model.buffers()))

def zero_momentum(opt: torch.optim.SGD):
    """Zero momentum buffers (step 1 = SGD's buf = g): fused SGD leaves its empty_like ones unwritten when a GradScaler
    skips step 1 (usual with fp16), and the garbage diverges the run."""
    for p in (p for group in opt.param_groups for p in group["params"]):
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)

def learning_rate(cfg, step):
    return cfg.lr * math.cos(7 * math.pi * step / (16 * cfg.steps))

@torch.no_grad()
def evaluate(model, live, x, y, normalize, centres, seen, batch=1024) -> tuple:
    """Test accuracy of model's head (the EMA copy: every reported accuracy), and of the nearest centre (cosine) on the
    live network's features, which the centres average: the feature extractor alone."""
    training = live.training  # the live network goes back to this mode below; the EMA copy stays in eval mode
    model.eval()
    live.eval()
    hits = torch.zeros(2, device=y.device)  # (x may be in host memory: --data-on host)
    for i in range(0, len(x), batch):
        inputs = normalize(x[i:i + batch].to(y.device))  # --data-on host: the test images are there too
        z, f = model(inputs)[0], live(inputs)[1]
        cos = (F.normalize(f.float(), dim=1) @ centres.t()).masked_fill(~seen, -2)  # classes without a centre lose
        hits += torch.stack([(z.argmax(1) == y[i:i + batch]).sum(), (cos.argmax(1) == y[i:i + batch]).sum()])
    live.train(training)
    return tuple(h / len(x) for h in hits.tolist())  # (head, nearest centre)

# ---------------------------------------------------------------------------------------------
# Checkpoints: one dict, written atomically so that a kill at any moment leaves the last one loadable

def atomic_write(path, write, tmp=None):
    tmp = tmp or f"{path}.tmp"
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

def write_text(path, text, tmp=None):
    atomic_write(path, lambda fh: fh.write(text.encode()), tmp)

def job_id() -> dict:
    """This job as config.json records it: torchrun's run (--rdzv-id, new per --standalone launch; for "none", rank 0's
    torchrun launch, which its restarts share) and Slurm's job and requeue count; None (0): not under one."""
    run, slurm, requeue = (os.getenv(k, "") for k in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"))
    launch = os.getenv("TORCHELASTIC_ERROR_FILE", "").rsplit(os.sep, 3)[0] or os.getppid()  # <launch>/attempt_N/..
    return dict(job=f"launch {socket.gethostname()}:{launch}" if run == "none" else run or None,
                slurm_job=slurm or None, requeue=int(requeue) if requeue.isdecimal() else 0)

RUN_FILES = ("checkpoint.pt", "metrics.csv", "summary.json")  # a run's results: only --overwrite removes them
OWN = {"config.json", "tb", "log.txt", "sweep.lock", *(f"{n}.tmp" for n in ("config.json", *RUN_FILES))}  # (sweeps)
REPORTED = dict(finished=bool, steps=int, test_acc_median_last20=float, test_acc_best=float, test_acc_final=float)
RUN_CONFIG = dict(dataset=str, labels=int, seed=int, algorithm=str, data_dir=str)  # what --table reads

def prepare_out(cfg: Config):
    """The output folder: never silently reused or clobbered."""
    if not cfg.resume and os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
        raise UserError(f"output folder '{cfg.out}' exists: add --resume to continue it or --overwrite to replace it")
    try:
        if cfg.overwrite:
            for name in set(RUN_FILES) & set(os.listdir(cfg.out) if os.path.isdir(cfg.out) else []):
                os.remove(os.path.join(cfg.out, name))
            shutil.rmtree(os.path.join(cfg.out, "tb"), ignore_errors=True)  # the old run's curves
        os.makedirs(cfg.out, exist_ok=True)
        write_text(os.path.join(cfg.out, "config.json"), json.dumps(dataclasses.asdict(cfg) | job_id(), indent=2))
    except OSError as e:
        raise UserError(f"cannot write to output folder '{cfg.out}' ({e.strerror or e})") from None

BOOKKEEPING = ("out", "resume", "overwrite", "stop_at", "checkpoint_minutes", "tensorboard")  # a resume may change them

def check_resumable(cfg: Config, saved: dict):
    """A resume is the same experiment, network and images (SAME_RUN); other changes are reported."""
    for k in SAME_RUN:
        if k in saved and saved[k] != getattr(cfg, k):  # (a key not in the checkpoint: older code, no such flag)
            flag, show = k.replace("_", "-"), lambda v: "(none)" if v == "" else v
            raise UserError(f"cannot resume: the run has --{flag} {show(saved[k])}, this command --{flag} "
                            f"{show(getattr(cfg, k))}")
    changed = [f"{k} {saved[k]} -> {v}" for k, v in dataclasses.asdict(cfg).items()
               if k in saved and saved[k] != v and k not in BOOKKEEPING]
    if changed:
        print(f"note: resuming with changed settings: {', '.join(changed)}", file=sys.stderr)

# ---------------------------------------------------------------------------------------------
# Devices and processes

def pick_device(name: str, local_rank: int) -> torch.device:
    available = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    name = next(k for k, ok in available.items() if ok) if name == "auto" else name
    if name not in available:
        raise UserError(f"unknown device '{name}' (choose auto, cuda, cpu or mps)")
    if not available[name]:
        raise UserError(f"--device {name} is not available on this machine (try --device cpu)")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)

def pick_precision(device: torch.device) -> str:
    """bf16 on GPUs of compute capability >= 8.0; fp16 (GradScaler) on older ones, which emulate bf16; else fp32."""
    return "fp32" if device.type != "cuda" else "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"

def setup_processes(cfg: Config):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one process. Also a gloo group for host work."""
    world, rank, local_rank = (int(os.environ.get(k, 0)) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    world, device = max(world, 1), pick_device(cfg.device, local_rank)
    if world == 1:
        return rank, world, device, None
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is global and must divide by the {world} processes")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **group_store(world, rank))
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))  # NCCL's 10 minutes: too short a wait
    return rank, world, device, group

def group_store(world: int, rank: int) -> dict:
    """torchrun's agent lends the workers its store and keeps the dead group's addresses in it (pytorch/pytorch#135712):
    one node's agent counts every restart, so a prefix per restart; several nodes' count apart, so a store per round."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # a store of the workers' own (plain env://), new at every rendezvous round
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) < world and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)):
        raise UserError("torchrun --max-restarts on several nodes needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
                        "torchrun's environment and --rdzv-backend c10d (README: Multi-GPU and multi-node)")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    prefix = f"layermatch/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    return dict(store=dist.PrefixStore(prefix, store), rank=rank, world_size=world)

def rank_zero_first(group, rank: int, work):
    """work(True) on rank 0 (download, output folder), then work(False) on the others at once; they wait on the gloo
    group, whose timeout is a day (longer than a first download). An error stops every rank."""
    if group is None:
        return work(True)
    result = None
    for first in (True, False):
        error = None
        if (rank == 0) == first:
            try:
                result = work(first)
            except Exception as e:
                error = e
        errors = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error and (str(error) or type(error).__name__), group=group)
        if error:
            raise error
        failed = next(((r, e) for r, e in enumerate(errors) if e), None)
        if failed:
            raise UserError(f"stopped because rank {failed[0]} failed: {failed[1]}")
    return result

def tensors_as(o, leaf):
    """o with each tensor t in it replaced by leaf(t), in one fixed order (through dicts, lists and tuples)."""
    if isinstance(o, dict):
        return {k: tensors_as(v, leaf) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(tensors_as(v, leaf) for v in o)
    return leaf(o) if isinstance(o, torch.Tensor) else o

def from_rank_zero(group, rank: int, work):
    """work() on rank 0 alone (another node may have no output folder), its result on every rank: pickled with tensors
    as shapes, then the tensors one by one into place (one copy of a checkpoint per process). Errors as above."""
    result = rank_zero_first(group, rank, lambda first: work() if first else None)
    if group is None:
        return result
    box = [tensors_as(result, lambda t: t.to("meta"))]
    dist.broadcast_object_list(box, src=0, group=group)

    def send(t):  # as bytes: gloo takes any dtype so; reshape copies only a non-contiguous tensor of rank 0's
        t = t if rank == 0 else torch.empty(t.shape, dtype=t.dtype)
        dist.broadcast(t.reshape(-1).view(torch.uint8), src=0, group=group)
        return t
    return tensors_as(result if rank == 0 else box[0], send)

def rank_mean(t: torch.Tensor) -> torch.Tensor:
    all_reduce(t := t.clone())
    return t / (dist.get_world_size() if dist.is_initialized() else 1)

# ---------------------------------------------------------------------------------------------
# Training

@dataclass
class State:
    """Everything a checkpoint carries; save_checkpoint and restore_checkpoint are its only readers."""
    model: nn.Module  # the plain module (not DDP, not compiled), so that checkpoints load anywhere
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gen: torch.Generator  # augmentation of this process
    batches: "Batches"  # this process's sampling, whose generator is checkpointed
    centres: torch.Tensor  # Avg-Clustering c_k [K, d] and which classes have one
    seen: torch.Tensor
    stats: torch.Tensor  # running sums of STATS since the last evaluation, on the device
    inputs: dict  # what the model needs for inference (normalisation, image shape, class names): from the data
    step: int = 0
    history: list = field(default_factory=list)  # one row per evaluation, as in metrics.csv
    seconds: float = 0.0  # training time before this process started
    started: float = field(default_factory=time.time)
    saved_step: int | None = None  # the step of the checkpoint on disk, and when this process last wrote or found it
    saved_at: float = field(default_factory=time.monotonic)
    world_sizes: list = field(default_factory=list)  # the process counts the run has had, in order

def save_checkpoint(s: State, cfg: Config, world: int, rank: int):
    mine = (s.gen.get_state(), s.stats.cpu(), s.batches.sampler_state())
    ranks = [mine] * world
    if world > 1:
        dist.all_gather_object(ranks, mine)  # every process's stream and sums, for an exact resume
    if rank == 0:
        state = dict(model=s.model.state_dict(), ema=s.ema.state_dict(), optimizer=s.optimizer.state_dict(),
                     scaler=s.scaler.state_dict(), generators=[r[0] for r in ranks], stats=[r[1] for r in ranks],
                     samplers=[r[2] for r in ranks], centres=s.centres, seen=s.seen, step=s.step, history=s.history,
                     seconds=s.seconds + time.time() - s.started, config=dataclasses.asdict(cfg), inputs=s.inputs,
                     world_sizes=s.world_sizes)
        atomic_write(os.path.join(cfg.out, "checkpoint.pt"), lambda fh: torch.save(state, fh))
        rows = [list(s.history[0]) if s.history else ["step"]] + [list(map(str, h.values())) for h in s.history]
        write_text(os.path.join(cfg.out, "metrics.csv"), "".join(",".join(row) + "\n" for row in rows))  # numbers
    s.saved_step, s.saved_at = s.step, time.monotonic()

def read_checkpoint(out: str) -> dict:
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.exists(path):
        raise UserError(f"there is no checkpoint.pt in '{out}'")
    try:  # weights_only: tensors and plain data only, so that loading someone else's checkpoint cannot run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e):  # torch refused an object
            raise UserError(f"checkpoint '{path}' holds Python objects besides tensors and plain data, which could "
                            "run code when unpickled; not loaded (our checkpoints hold none)") from None
        raise UserError(f"checkpoint '{path}' is truncated or corrupt ({type(e).__name__}); "
                        "it was left untouched: move it away or start again with --overwrite") from None

def restore_checkpoint(s: State, ck: dict, cfg: Config, world: int, rank: int):
    """ck into s, then emptied (one copy in memory). On the process count that wrote it every stream continues; on
    another the global batch and schedule stay, and each process's augmentation and sampling are seeded again."""
    for k in ("model", "ema", "optimizer"):
        getattr(s, k).load_state_dict(ck[k])
    if s.scaler.is_enabled() and ck["scaler"]:
        s.scaler.load_state_dict(ck["scaler"])
    n = len(ck["generators"])
    s.world_sizes = ck.get("world_sizes", [n]) + [world] * (n != world)  # recorded since v5
    if n == world and "samplers" in ck and ck["generators"][rank].shape == s.gen.get_state().shape:
        s.batches.sampler.set_state(ck["samplers"][rank])
        s.gen.set_state(ck["generators"][rank])
    else:  # another count (other shares of the batch), device type (CUDA and CPU generators differ), older file
        s.gen.manual_seed(cfg.seed + 1_000_003 * rank + ck["step"])
        s.batches.sampler.manual_seed((cfg.seed + 1_000_003 * rank + ck["step"]) ^ SAMPLER_SEED)
        why = f"is from {n} processes, this run has {world}" if n != world else "was written on another device " \
            "type or by an older layermatch.py"
        if rank == 0:
            print(f"note: the checkpoint {why}; augmentation and sampling continue from new seeds, so this run will "
                  "not match an uninterrupted one bit for bit", file=sys.stderr)
    s.centres.copy_(ck["centres"])
    s.seen.copy_(ck["seen"])
    stats = torch.stack(ck["stats"]) if isinstance(ck["stats"], list) else ck["stats"][None]  # a list since v3
    s.stats.copy_(stats[rank] if n == world else stats.mean(0))  # another count: the mean that the log shows
    s.step, s.history, s.seconds, s.saved_step = ck["step"], ck["history"], ck["seconds"], ck["step"]
    ck.clear()

def resume_point(cfg: Config) -> tuple:
    """What this start does with --out, decided by rank 0: (--resume and --overwrite as applied, checkpoint, finished
    run's summary). It continues if asked (--resume) or if this job wrote it, deleting nothing; else a first start."""
    file = lambda name: os.path.join(cfg.out, name)
    now, mine = job_id(), read_json(file("config.json"))  # lenient: a file that is not this job's is not ours
    restarted = now["job"] is not None and mine.get("job") == now["job"]  # torchrun: a restart, a node that joins
    requeued = now["slurm_job"] is not None and mine.get("slurm_job", mine.get("job")) == now["slurm_job"] and \
        isinstance(mine.get("requeue"), int) and mine["requeue"] < now["requeue"]  # (another launch: the same count)
    ours = now["job"] if restarted else now["slurm_job"] if requeued else None  # (no slurm_job: Slurm's id was job)
    if not (cfg.resume or ours):
        return {}, None, None
    found, done = os.path.exists(file("checkpoint.pt")), read_json(file("summary.json"), needs=REPORTED)
    saved = read_json(file("config.json"), needs={})
    if done.get("finished") and done.get("steps") == cfg.steps:  # a finished run is left as it is
        check_resumable(cfg, saved)  # the same experiment, or an error naming the difference
        print(f"'{cfg.out}' has finished its {cfg.steps} steps; nothing to do, no file changed", file=sys.stderr)
        report(done, cfg.out)
        return {}, None, done
    others = set(os.listdir(cfg.out) if os.path.isdir(cfg.out) else []) - OWN  # OWN: what a start writes first
    others = others & set(RUN_FILES) if ours else others  # this job's own folder keeps what its first start accepted
    if not found and (others or os.path.exists(file("config.json")) and not set(IDENTITY) <= saved.keys()):
        raise UserError(f"there is no checkpoint.pt in '{cfg.out}' to continue, and it holds other files "
                        f"({', '.join(sorted(others) or ['config.json'])}); nothing was changed: choose another --out")
    ck = read_checkpoint(cfg.out) if found else None
    check_resumable(cfg, ck["config"] if found else saved)  # before anything is loaded or written
    if ours or not found:
        print(f"continuing job {ours}'s run in '{cfg.out}' at step {ck['step'] if found else 0}" if ours else
              f"note: '{cfg.out}' holds no run yet: --resume starts it", file=sys.stderr)
    return dict(resume=True, overwrite=False), ck, None

STOP_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)]
ECHO_SECONDS = 2.0  # a repeat this soon is another sender of the same stop: torchrun, Slurm, timeout, run_cifar.sh

@contextlib.contextmanager
def signals_to_flag():
    """Yields [signal, when], [0, 0] until a stop signal (USR1/2: Slurm's --signal); the loop then saves and exits. A
    repeat within ECHO_SECONDS (launchers pass a stop on) changes nothing; a later one kills at once (Ctrl-C twice)."""
    stop = [0, 0.0]

    def on_signal(signum, _):
        if not stop[0]:
            stop[:] = [signum, time.monotonic()]
        elif time.monotonic() - stop[1] > ECHO_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS} if main else {}
    try:
        yield stop
    finally:
        if stop[0]:  # a launcher's copy of the stop may still come: on_signal takes it, then the caller's handlers
            time.sleep(max(0.0, stop[1] + ECHO_SECONDS - time.monotonic()))
        for sig, handler in saved.items():
            signal.signal(sig, handler)

@contextlib.contextmanager
def lost_contact_in_one_line(s: State, cfg: Config, world: int):
    """Another process died (killed, out of memory): the collective that waits for it fails here. One line instead
    of the backend's traceback; torchrun then restarts the group (--max-restarts) or stops."""
    try:
        yield
    except RuntimeError as e:
        if world == 1 or not (isinstance(e, dist.DistError) or "Connection" in str(e)):  # gloo: "Connection reset"
            raise
        raise UserError(f"lost contact with another process at step {s.step} (killed?); the last checkpoint in "
                        f"'{cfg.out}' (step {'none' if s.saved_step is None else s.saved_step}) is intact") from None

STATS = ("loss", "L_s", "L_u", "L_ac", "mask", "pl_correct", "pl_known", "steps")  # summed on the device
LOG_EVERY = 16  # steps between host reads of those sums: the only synchronisation in the loop

def accumulate(stats: torch.Tensor, loss, terms):
    zero = torch.zeros((), device=stats.device)
    stats += torch.stack([loss.detach().float()] + [terms.get(k, zero).detach().float() for k in STATS[1:-1]]
                         + [torch.ones((), device=stats.device)])

def stats_row(sums: list, cfg: Config, step: int) -> dict:
    """Averages of the STATS sums (read from the device: one host sync) over the steps they cover."""
    s, n = dict(zip(STATS, sums)), max(sums[STATS.index("steps")], 1)
    return dict(step=step, lr=learning_rate(cfg, step - 1), **{k: s[k] / n for k in STATS[:4]},
                mask_rate=s["mask"] / n, pl_acc=s["pl_correct"] / max(s["pl_known"], 1))

LONG_RUN = 86400  # seconds: a run projected to take longer gets a note on how to shorten it
PROJECT_AFTER = 3  # timed steps before that projection

def projection_note(seconds: float, steps: int, device: torch.device) -> str:
    ways = "--dataset digits (the CPU demo), fewer --steps, --precision bf16 on CPUs with native bf16 (AVX512-BF16 " \
           "or AMX), or a CUDA GPU" if device.type == "cpu" else "fewer --steps, or --stop-at to split it into jobs"
    return f"note: at the speed of the first steps, this run's {steps} steps take about {seconds / 86400:.1f} days; " \
           f"for a shorter run: {ways}"

def tensorboard_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None

class Progress(contextlib.AbstractContextManager):
    """The loop's figures to the progress bar, TensorBoard (rank 0) and a long run's projection; the steady clock."""

    def __init__(self, cfg: Config, s: State, rank: int, device, images_per_step: int, writer):
        self.cfg, self.rank, self.device, self.images_per_step = cfg, rank, device, images_per_step
        self.bar = tqdm(total=cfg.steps, initial=s.step, disable=rank != 0, dynamic_ncols=True, desc=cfg.algorithm)
        # rank 0's curves; a resumed run continues them, TensorBoard dropping the points logged after the checkpoint
        self.tb = writer(os.path.join(cfg.out, "tb"), purge_step=s.step + 1) if writer and not rank else None
        self.logged = s.stats.tolist()  # the sums at the last log: each TensorBoard point covers its own steps
        self.t0, self.k0, self.busy = None, s.step, 0.0

    def tick(self, loss, step):
        """The clock starts after step 1 (compilation, autotuning); PROJECT_AFTER steps later, the projection."""
        if self.t0 is None:
            loss.item()
            self.t0, self.k0 = time.time(), step
        elif step == self.k0 + PROJECT_AFTER:  # once: step grows by one per call
            loss.item()
            seconds = (self.cfg.steps - step) / (self.steps_per_second(step) or math.inf)
            if self.rank == 0 and seconds > LONG_RUN:
                self.bar.write(projection_note(seconds, self.cfg.steps, self.device))

    def steps_per_second(self, step) -> float | None:
        steady = time.time() - self.t0 - self.busy if self.t0 else 0
        return (step - self.k0) / steady if steady > 0 else None  # None: no steady-state step was timed

    def log(self, sums: list, step: int) -> dict:
        """Show the averages since the last evaluation (metrics.csv's row); TensorBoard those since the last log."""
        row = stats_row(sums, self.cfg, step)
        self.bar.update(step - self.bar.n)
        images = (self.bar.format_dict["rate"] or 0) * self.images_per_step
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k != "step"} | {"img/s": f"{images:.0f}"})
        if self.tb:
            window = stats_row([a - b for a, b in zip(sums, self.logged)], self.cfg, step) | dict(images_per_s=images)
            for k in sorted(window.keys() - {"step"}):
                self.tb.add_scalar(f"train/{k}", window[k], step)
        self.logged = sums
        return row

    def evaluated(self, history: list, seconds: float):  # seconds: evaluating and saving, off the steady clock
        self.logged, self.busy = [0.0] * len(STATS), self.busy + seconds  # the sums restart at every evaluation
        last = history[-1]
        if self.tb:
            self.tb.add_scalar("test/acc", last["test_acc"], last["step"])  # the EMA model's, as metrics.csv
            self.tb.add_scalar("test/nearest_centre_acc", last["centre_acc"], last["step"])
        if self.rank == 0:
            accs = [h["test_acc"] for h in history]
            self.bar.write(f"step {last['step']:>7} | test acc {accs[-1]:.2%} | median(last 20) "
                           f"{statistics.median(accs[-20:]):.2%} | best {max(accs):.2%} | nearest-centre acc "
                           f"{last['centre_acc']:.2%} | mask {last['mask_rate']:.2f}")

    def __exit__(self, *exc):
        self.bar.close()
        if self.tb:
            self.tb.close()

def make_optimizer(net: nn.Module, cfg: Config, device) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on conv and linear weights only (not BatchNorm, biases)."""
    params = list(net.parameters())
    opt = torch.optim.SGD([dict(params=[p for p in params if p.ndim > 1], weight_decay=cfg.weight_decay),
                           dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)],
                          lr=cfg.lr, momentum=0.9, nesterov=True,
                          **(dict(fused=True) if accelerator_paths(device) else dict(foreach=True)))
    zero_momentum(opt)
    return opt

def train(cfg: Config, data: dict | None = None) -> dict:
    """Train, evaluate and checkpoint one run; returns the summary (also written to summary.json)."""
    default_recipe = cfg.steps is None
    cfg = resolve(cfg, data is not None)
    SummaryWriter = tensorboard_writer() if cfg.tensorboard else None
    rank, world, device, gloo = setup_processes(cfg)
    cfg = dataclasses.replace(cfg, precision=cfg.precision or pick_precision(device))
    changes, ck, done = from_rank_zero(gloo, rank, lambda: resume_point(cfg))
    cfg = dataclasses.replace(cfg, **changes)  # each rank keeps its own paths (nodes may differ)
    if done:
        return done
    if rank == 0 and default_recipe and cfg.dataset == "folder":
        print(f"note: --dataset folder trains with the CIFAR-10 recipe, {cfg.steps} steps of B={cfg.batch_size}, "
              f"mu={cfg.uratio}; for a shorter run pass e.g. --steps 20000 --eval-every 500", file=sys.stderr)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def load_and_check(first):  # rank 0 first: it downloads; the output folder only once data, labels, net are fine
        d = load_data(cfg) if data is None else data
        check_data(d)
        num_classes = int(d["train_y"].max()) + 1
        labeled = labeled_subset(d["train_y"], cfg.labels, num_classes, cfg.seed, d.get("classes"))
        torch.manual_seed(cfg.seed)  # the same initialisation on every process
        net = make_network(dataclasses.asdict(cfg), num_classes, d["train_x"].shape[1:])
        if cfg.pretrained and ck is None:  # a checkpoint holds the weights
            load_pretrained(net, cfg.arch, cfg.pretrained)
        on_host, free = cfg.data_on == "host", free_memory(device)
        if free is not None and cfg.data_on != "host":  # a GPU: do the images fit beside the training?
            images = sum(t.numel() for k, t in d.items() if k.endswith("_x") and t is not None)
            need = training_memory(net, d["train_x"].shape[1:], images_per_step, dtype)
            on_host, why = data_placement(cfg.data_on, images, need, free)
            if first:
                print(f"note: the images are kept in {'host' if on_host else 'device'} memory: {why}", file=sys.stderr)
        if first:
            prepare_out(cfg)
        return d, labeled, net, on_host
    B, uB = cfg.batch_size // world, cfg.uratio * cfg.batch_size // world * (cfg.algorithm != "supervised")
    images_per_step = B + 2 * uB  # this process's share
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(cfg.precision)  # None: fp32
    d, labeled, net, on_host = rank_zero_first(gloo, rank, load_and_check)
    D = to_device(d, labeled, cfg, device, fmt, on_host)
    if world > 1 and device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # BatchNorm statistics over the global batch
    net = net.to(device, memory_format=fmt)
    centres = torch.zeros(D["num_classes"], net.fc.in_features, device=device)
    s = State(net, copy.deepcopy(net).requires_grad_(False), make_optimizer(net, cfg, device),
              torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),  # fp16 gradients underflow unscaled
              torch.Generator(device).manual_seed(cfg.seed + 1_000_003 * rank),
              Batches(D, B, uB, device, cfg.seed + 1_000_003 * rank), centres,
              torch.zeros(D["num_classes"], dtype=torch.bool, device=device), torch.zeros(len(STATS), device=device),
              D["inputs"], world_sizes=[world])
    if ck:
        restore_checkpoint(s, ck, cfg, world, rank)
    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    model = torch.compile(model) if cfg.compile else model

    bn_stats = running_stats(net)
    bad_step = torch.full((), -1, device=device)  # first step whose loss was not finite
    progress = Progress(cfg, s, rank, device, images_per_step * world, SummaryWriter)
    with signals_to_flag() as stop, progress, lost_contact_in_one_line(s, cfg, world):
        while s.step < cfg.steps:
            for group in s.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, s.step)
            before = [b.clone() for b in bn_stats]
            loss, terms, s.centres, s.seen = layermatch_step(model, net.fc, s.batches.take(), D["normalize"], s.gen,
                                                             s.centres, s.seen, cfg, dtype)
            s.optimizer.zero_grad(set_to_none=True)
            s.scaler.scale(loss).backward()
            s.scaler.step(s.optimizer)  # with fp16, skips the update if a gradient overflowed: normal, not an error
            s.scaler.update()
            average_running_stats(bn_stats, before, s.step)
            ema_update(s.ema, net, ema_decay(cfg.ema, s.step))
            s.step += 1
            if s.step < cfg.steps:
                s.batches.prefetch()  # on a GPU the next batch's host-side gather overlaps this step
            bad_step = torch.where((bad_step < 0) & ~loss.isfinite(), s.step, bad_step)
            accumulate(s.stats, loss, terms)
            progress.tick(loss, s.step)

            evaluating = s.step % cfg.eval_every == 0 or s.step == cfg.steps
            if s.step % LOG_EVERY and not evaluating and s.step != cfg.stop_at and not (stop[0] and world == 1):
                continue
            due = rank == 0 and 0 < cfg.checkpoint_minutes * 60 <= time.monotonic() - s.saved_at  # rank 0's clock
            flags = torch.cat([bad_step.float().view(1), torch.tensor([stop[0], due], device=device).float()])
            if world > 1:
                dist.all_reduce(flags, dist.ReduceOp.MAX)  # every process stops, and checkpoints, at the same step
            bad, stopping, due = flags.tolist()  # stopping: the signal (any rank's), or 0
            if bad >= 0:
                raise UserError(f"non-finite loss at step {int(bad)}; stopped. The last checkpoint in '{cfg.out}' "
                                f"(step {'none' if s.saved_step is None else s.saved_step}) is intact")
            row = progress.log(rank_mean(s.stats).tolist(), s.step)  # the figures of the whole global batch
            if evaluating:
                began = time.time()  # rank 0 alone evaluates: every process holds the same EMA weights
                test = (s.ema, net, D["test_x"], D["test_y"], D["normalize"], s.centres, s.seen)
                row["test_acc"], row["centre_acc"] = evaluate(*test) if rank == 0 else (math.nan, math.nan)
                s.history.append(row)
                s.stats.zero_()
                save_checkpoint(s, cfg, world, rank)
                progress.evaluated(s.history, time.time() - began)
            elif stopping or due or s.step == cfg.stop_at:
                save_checkpoint(s, cfg, world, rank)
            if stopping and s.step < cfg.steps:  # at the last step the run is complete: its summary is written
                raise Interrupted(int(stopping), s.saved_step, cfg.out)
            if s.step == cfg.stop_at:
                break
    return summarise(s, cfg, world, rank, device, progress.steps_per_second(s.step))

def summarise(s: State, cfg: Config, world, rank, device, steps_per_second) -> dict:
    """summary.json: the FixMatch paper's median of the last 20 evaluations, the best and the final one."""
    summary = dict(steps=s.step, finished=s.step == cfg.steps, device=str(device), world_sizes=s.world_sizes,
                   train_seconds=round(s.seconds + time.time() - s.started, 1), steps_per_second=steps_per_second)
    if summary["finished"]:
        accs, centre = [h["test_acc"] for h in s.history], [h["centre_acc"] for h in s.history]
        summary |= dict(test_acc_median_last20=statistics.median(accs[-20:]), test_acc_best=max(accs),
                        test_acc_final=accs[-1], evaluations=len(accs),
                        centre_acc_median_last20=statistics.median(centre[-20:]), centre_acc_final=centre[-1])
    if world > 1:  # rank_spread: the largest difference of weights, EMA and centres between processes (0.0: none)
        flat = torch.cat([t.detach().float().ravel() for t in [*s.model.parameters(), *s.ema.parameters(), s.centres]])
        both = torch.cat([flat, -flat])  # the largest value and, negated, the smallest: one all-reduce
        dist.all_reduce(both, dist.ReduceOp.MAX)
        summary["rank_spread"] = (both[:len(flat)] + both[len(flat):]).max().item()
        dist.destroy_process_group()
    if rank == 0 and summary["finished"]:
        write_text(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=2, allow_nan=False))
        report(summary, cfg.out)
    return summary

def report(summary: dict, out: str):
    print(f"done: test accuracy median of last 20 evals {summary['test_acc_median_last20']:.2%}, "
          f"best {summary['test_acc_best']:.2%}, final {summary['test_acc_final']:.2%} -> {out}")

# ---------------------------------------------------------------------------------------------
# Using a trained model; results of many runs

class Classifier(nn.Module):
    """A trained network with its input normalisation: uint8 images [N, C, H, W] in, logits out."""

    def __init__(self, net: WideResNet, inputs: dict, step: int):
        super().__init__()
        self.net, self.classes, self.shape, self.step = net, inputs["classes"], inputs["shape"], step  # weights' step
        self.register_buffer("mean", inputs["mean"])
        self.register_buffer("std", inputs["std"])

    def forward(self, x):
        return self.net((x.float() - self.mean) / self.std)[0]

def classifier(ck: dict, which: str) -> Classifier:
    net = make_network(ck["config"], len(ck["inputs"]["classes"]), ck["inputs"]["shape"])
    net.load_state_dict(ck[which])
    return Classifier(net, ck["inputs"], ck["step"]).eval().requires_grad_(False)

def load(out: str, which: str = "ema", device: str = "cpu") -> Classifier:
    """A run's model for inference: which="ema" (every reported accuracy's) or "model" (the live weights)."""
    return classifier(read_checkpoint(out), which).to(device)

@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch: int = 1024):
    """(classes [N], probabilities [N, K]) for uint8 images of model.shape; files: read_images(paths, size)."""
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.shape[1:] == model.shape):
        raise UserError(f"predict needs uint8 images [N, {', '.join(map(str, model.shape))}] as in training (got "
                        f"{getattr(images, 'dtype', type(images).__name__)} {list(getattr(images, 'shape', []))})")
    device = model.mean.device
    probs = torch.cat([model(images[i:i + batch].to(device)).float().softmax(1) for i in range(0, len(images), batch)])
    return probs.argmax(1), probs

def evaluate_run(cfg: Config):
    """--evaluate: test accuracy of the EMA and the live model of the run in --out (data from --data-dir if given)."""
    ck, device = read_checkpoint(cfg.out), pick_device(cfg.device, 0)
    ema, live = classifier(ck, "ema").to(device), classifier(ck, "model").to(device)
    saved = Config(**{k: v for k, v in ck["config"].items() if k in {f.name for f in dataclasses.fields(Config)}})
    if saved.dataset not in DATASET_DEFAULTS:
        raise UserError(f"'{cfg.out}' was trained on tensors given to train(): evaluate it from Python with "
                        f"predict(load('{cfg.out}'), test_x)")
    data = load_data(dataclasses.replace(saved, data_dir=cfg.data_dir) if cfg.data_dir != Config.data_dir else saved)
    n = len(data["test_y"])
    accs = [(predict(m, data["test_x"])[0].cpu() == data["test_y"]).sum().item() / n for m in (ema, live)]
    print(f"{cfg.out}: step {ema.step} of {saved.steps}, {n} test images: "
          f"test accuracy {accs[0]:.2%} (EMA model, as reported in training), {accs[1]:.2%} (live model)")
    return accs

# What a row's settings leave out: the experiment (its own columns), the speed, the bookkeeping (torchrun_job: v5's job)
NOT_IN_TABLE = BOOKKEEPING + IDENTITY + ("job", "slurm_job", "requeue", "torchrun_job", "data_dir", "device",
                                         "precision", "channels_last", "compile", "evaluate", "table", "baseline",
                                         "markdown", "data_on", "cache_dir")
OWN_DATA = ("folder", "imagenet100")  # datasets whose identity is their --data-dir

def short_names(paths: set) -> dict:
    """Each path's shortest tail of folder names that no other path in the set shares (all of them if none is)."""
    parts = {p: os.path.normpath(p).split(os.sep) for p in paths}
    unique = lambda p, k: k == len(parts[p]) or all(o[-k:] != parts[p][-k:] for q, o in parts.items() if q != p)
    return {p: "/".join(parts[p][-next(k for k in range(1, len(parts[p]) + 1) if unique(p, k)):]) for p in parts}

def t95(df: int) -> float:
    """Student's t two-sided 95% quantile, bisected on P(|T| < t), exact for integer df (Abramowitz-Stegun 26.7.3-4)."""
    def inside(a):  # P(|T| < sqrt(df) tan(a)); the series' ratios 1/2, 3/4, ... (even df) or 2/3, 4/5, ... (odd df)
        ratios = [k / (k + 1) for k in range(1 + df % 2, df - 1, 2)]
        s = sum(itertools.accumulate(ratios, lambda term, r: term * r * math.cos(a) ** 2, initial=1.0))
        return math.sin(a) * s if df % 2 == 0 else 2 / math.pi * (a + math.sin(a) * math.cos(a) * s * (df > 1))
    lo, hi = 0.0, math.pi / 2
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if inside((lo + hi) / 2) < 0.95 else (lo, (lo + hi) / 2)
    return math.sqrt(df) * math.tan(lo)

def mean_sd(v: list, sign: str = "", interval: bool = False) -> str:
    """'mean ± sd' of v; with interval, the mean's 95% t-interval [low, high] (from 3 values on)."""
    mean, sd, n = statistics.mean(v), statistics.stdev(v) if v[1:] else 0.0, len(v)
    ci = f" [{mean - (h := t95(n - 1) * sd / n ** 0.5):{sign}.2f}, {mean + h:{sign}.2f}]" if interval and n > 2 else ""
    return f"{round(mean, 2) + 0.0:{sign}.2f}" + (f" ± {sd:.2f}" if n > 1 else "") + ci  # (+ 0.0: no "-0.00" mean)

def paired(a: dict, b: dict) -> str:
    """Seed by seed, over the seeds both have, a - b: mean ± sd [95% t-interval]; how many, if not all."""
    d = [a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())]
    return mean_sd(d, "+", True) + (f" (seeds in common: {len(d)})" if a.keys() != b.keys() else "") if d else "-"

def results_table(root: str, baseline: str = "fixmatch", markdown: bool = False) -> str:
    """--table: every summary.json below root, a row per experiment (dataset@labels, settings) and algorithm."""
    runs = [(folder, read_json(os.path.join(folder, "config.json"), needs=RUN_CONFIG),
             read_json(os.path.join(folder, "summary.json"), needs=REPORTED))
            for folder, _, files in sorted(os.walk(root)) if {"summary.json", "config.json"} <= set(files)]
    if not runs:
        raise UserError(f"no finished runs (summary.json with its config.json) below '{root}'")
    data_names = short_names({cfg["data_dir"] for _, cfg, _ in runs if cfg["dataset"] in OWN_DATA})
    cells = {}  # (dataset, labels, settings ((k, v), ...), algorithm) -> {seed: [its runs' summary.json and folder]}
    for folder, cfg, summary in runs:
        default = dataclasses.asdict(resolve(Config(dataset=cfg["dataset"], algorithm=cfg["algorithm"]), True))
        settings = tuple((k, str(cfg[k])) for k in default  # Config's fields in its order: one name per experiment
                         if cfg.get(k, default[k]) != default[k] and k not in NOT_IN_TABLE)
        data = f"{cfg['dataset']}:{data_names[cfg['data_dir']]}" if cfg["dataset"] in OWN_DATA else cfg["dataset"]
        cells.setdefault((data, cfg["labels"], settings, cfg["algorithm"]), {}).setdefault(cfg["seed"], []).append(
            summary | dict(dir=os.path.relpath(folder, root)))

    def over(seeds, k="test_acc_median_last20"):  # {seed: the mean of its runs' figure in %} where all its runs have it
        return {s: 100 * statistics.mean(x[k] for x in r) for s, r in seeds.items()
                if all(isinstance(x.get(k), float) for x in r)}  # (older runs have no centre_acc)
    seeds = sorted({seed for one in cells.values() for seed in one}) if markdown else []
    row = lambda algorithm, settings: " ".join([algorithm, *(f"{k}={v}" for k, v in settings)])  # its name
    parts = ("grad_relu", "lambda_ac", "ac_momentum") + ("threshold", "lambda_u", "uratio", "augment") * (
        baseline == "supervised")  # the baseline at the row's settings, else without these (a variant: plain)
    table = [["data", "algorithm", *(f"seed {s}" for s in seeds), "n", "mean ± sd", "min–max", "best",
              f"− {baseline}, paired", "centre − head"]]
    for key in sorted(cells, key=lambda k: (*k[:2], row("", k[2]), list(ALGORITHM_DEFAULTS).index(k[3]))):
        acc, centre = over(cells[key]), over(cells[key], "centre_acc_median_last20")
        exact, plain = (*key[:3], baseline), (*key[:2], tuple(kv for kv in key[2] if kv[0] not in parts), baseline)
        base = exact if exact in cells and (key[3] != baseline or plain not in cells) else plain  # (a variant: plain)
        table.append([f"{key[0]}@{key[1]}", row(key[3], key[2]), *(f"{acc[i]:.2f}" if i in acc else "-" for i in seeds),
                      str(len(acc)), mean_sd(list(acc.values())), f"{min(acc.values()):.2f}–{max(acc.values()):.2f}",
                      f"{statistics.mean(over(cells[key], 'test_acc_best').values()):.2f}",
                      "baseline" if base == key else paired(acc, over(cells.get(base, {}))), paired(centre, acc)])
    widths = [max(map(len, column)) for column in zip(*table)]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    twice = [f"{row(key[3], key[2])} {key[0]}@{key[1]} seed {s}: {len(r)} runs ({', '.join(x['dir'] for x in r)})"
             for key, one in sorted(cells.items()) for s, r in one.items() if len(r) > 1]
    notes = [f"note: runs with the same seed count as one seed, averaged: {'; '.join(twice)}"] * bool(twice)
    notes += [f"note: no {baseline} run to pair with (--baseline ALGORITHM)"] * all(k[3] != baseline for k in cells)
    caption = f"Test accuracy %, a seed's median of its last 20 evaluations (best: its best); paired by seed: minus"
    return "\n".join([caption + f" {baseline} in the same experiment; mean ± sd [95% t-interval]", "", *lines, *notes])

# ---------------------------------------------------------------------------------------------
# main

def main(argv=None):
    try:
        cfg = parse_args(argv)
        if cfg.table:
            print(results_table(cfg.table, cfg.baseline, cfg.markdown))
        elif cfg.evaluate:
            evaluate_run(resolve(cfg, False))
        else:
            train(cfg)
    except UserError as e:
        sys.exit(f"layermatch.py: error: {e}")
    except Interrupted as e:
        print(f"layermatch.py: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    finally:  # gloo's group left to the interpreter's exit can abort it ("terminate called..."); NCCL's shutdown
        if dist.is_initialized() and dist.get_backend() == "gloo":  # may wait for ranks that stopped elsewhere
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
