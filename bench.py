"""
bench.py: throughput of layermatch.py next to a classic per-image PIL pipeline, measured side by side.

    python bench.py                                   # CIFAR-sized defaults on the best device
    python bench.py --dataset digits --device cpu     # any layermatch.py flag selects the config

Prints, for this device and config, on synthetic uint8 images of the dataset's shape: augmentation
throughput ((weak, strong) pairs per second) against the same recipe run per image on PIL with
torchvision transforms (what the classic implementations do in DataLoader workers), with one thread
each and with all threads; then the full training step in our configuration against the same model in
plain NCHW fp32. Every ratio ends its line as N.Nx. It also estimates the run's device memory.
"""
import contextlib
import dataclasses
import io
import random
import sys
import tempfile
import time

import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

import layermatch as lm


def pil_pipeline(side, channels, hflip):
    """The reference: our recipe per image on PIL (flip, reflect-pad crop, 2-of-14 RandAugment at p = 0.5,
    Cutout, ToTensor, Normalize), the strong view from its own weak draw."""
    gray, pm = (128,) * channels if channels > 1 else 128, lambda L: L * random.choice((-1, 1))
    enhance = lambda cls: lambda im, L: cls(im).enhance(0.1 + 1.8 * L / 10)
    warp = lambda m: lambda im, L: im.transform(im.size, Image.AFFINE, m(L), fillcolor=gray)
    ops = [lambda im, L: im, lambda im, L: ImageOps.autocontrast(im), lambda im, L: ImageOps.equalize(im),
           enhance(ImageEnhance.Brightness), enhance(ImageEnhance.Color), enhance(ImageEnhance.Contrast),
           enhance(ImageEnhance.Sharpness), lambda im, L: im.rotate(3 * pm(L), fillcolor=gray),
           warp(lambda L: (1, 0.03 * pm(L), 0, 0, 1, 0)), warp(lambda L: (1, 0, 0, 0.03 * pm(L), 1, 0)),
           warp(lambda L: (1, 0, pm(L) * side / 32, 0, 1, 0)), warp(lambda L: (1, 0, 0, 0, 1, pm(L) * side / 32)),
           lambda im, L: ImageOps.posterize(im, 4 - int(0.4 * L)),
           lambda im, L: ImageOps.solarize(im, 256 - int(25.6 * L))]

    def strong(im):
        for op in random.choices(ops, k=2):
            im = op(im, random.randint(1, 9)) if random.random() < 0.5 else im
        cy, cx, h = random.randrange(side), random.randrange(side), side // 4
        ImageDraw.Draw(im).rectangle((cx - h, cy - h, cx + h - 1, cy + h - 1), fill=gray)  # Cutout
        return im
    weak = T.Compose([T.RandomHorizontalFlip(0.5 * hflip), T.RandomCrop(side, round(side / 8), padding_mode="reflect")])
    tensor = T.Compose([T.ToTensor(), T.Normalize([0.5] * channels, [0.25] * channels)])
    return lambda im: (tensor(weak(im)), tensor(strong(weak(im))))


def seconds_per_call(fn, device, min_seconds=2.0):
    fn()  # warm-up
    calls, start = 0, time.time()
    while time.time() - start < min_seconds:
        fn()
        calls += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.time() - start) / calls


DATASET_SIZES = {"cifar10": (60000, 10), "cifar100": (60000, 100), "svhn": (99289, 10), "stl10": (113000, 10)}  # images


def memory_estimate(cfg: lm.Config, C: int, S: int) -> str:
    """Device memory of a training run, measured on the CPU: the dataset as uint8, fp32 weights + gradients
    + momentum + EMA, and the activations one step saves for backward (saved-tensor hooks, bf16 autocast,
    8 images scaled to the step's batch). A GPU adds allocator slack, workspaces and its context."""
    n_images, classes = DATASET_SIZES.get(cfg.dataset, (0, 10))
    net = lm.WideResNet(classes, cfg.depth, cfg.widen, C, cfg.stages).to(memory_format=torch.channels_last)
    storages = {}  # each saved storage once: several ops save the same tensor

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        net(torch.randn(8, C, S, S).contiguous(memory_format=torch.channels_last))
    data = n_images * C * S * S / 1e9
    state = 4 * 4 * sum(p.numel() for p in net.parameters()) / 1e9
    activations = sum(storages.values()) / 8 * cfg.batch_size * (1 + 2 * cfg.uratio) / 1e9
    total = data + state + activations
    return (f"device memory estimate (measured on this CPU, bf16/fp16 activations): data {data:.2f} GB + weights, "
            f"grads, momentum, EMA {state:.2f} GB + activations {activations:.2f} GB = {total:.1f} GB")


def bench(cfg: lm.Config):
    device, threads = lm.pick_device(cfg.device, 0), torch.get_num_threads()
    C, S = {"digits": (1, 8), "stl10": (3, 96)}.get(cfg.dataset, (3, 32))
    B, uB = cfg.batch_size, cfg.uratio * cfg.batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (max(1024, B + uB), C, S, S), dtype=torch.uint8, generator=g)
    y = torch.arange(len(x)) % 10
    print(f"device {device}, torch {torch.__version__}, {threads} threads, dataset shape {C}x{S}x{S}, B={B}, muB={uB}")
    print(memory_estimate(cfg, C, S))

    gen, x_l, x_u = torch.Generator(device).manual_seed(0), x[:B].to(device), x[:uB].to(device)
    weak = lambda v: lm.weak_augment(v, gen, cfg.hflip)
    ours = lambda: (weak(x_l), weak(x_u), lm.strong_augment(weak(x_u), gen))
    pipe = pil_pipeline(S, C, cfg.hflip)
    pil = [Image.fromarray(im.squeeze(0).numpy() if C == 1 else im.permute(1, 2, 0).numpy()) for im in x[:256]]
    reference = lambda: [pipe(im) for im in pil]
    torch.set_num_threads(1)  # per core: one of our threads against one DataLoader worker
    ours_1, ref_1 = uB / seconds_per_call(ours, device), len(pil) / seconds_per_call(reference, device)
    torch.set_num_threads(threads)
    ours_n = uB / seconds_per_call(ours, device)
    print(f"augmentation, 1 thread each: ours {ours_1:,.0f} (weak, strong) pairs/s (+ {B} labeled weak per {uB}), "
          f"PIL reference {ref_1:,.0f} pairs/s   {ours_1 / ref_1:.1f}x")
    print(f"augmentation, {threads} threads: ours {ours_n:,.0f} pairs/s; reference with {threads} perfectly scaling "
          f"workers {ref_1 * threads:,.0f} pairs/s   {ours_n / (ref_1 * threads):.1f}x")

    data = dict(train_x=x, train_y=y, test_x=x[:256], test_y=y[:256])
    k = 3 if device.type == "cpu" and S >= 32 else 50  # timed steps after one warm-up step (seconds each on a CPU)
    speed = {}
    plain = dict(precision="fp32", channels_last=False, compile=False)
    for name, overrides in (("ours", {}), ("plain NCHW fp32", plain)):
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):  # the runs' own progress bars
            run = dataclasses.replace(cfg, dataset="bench", labels=10, steps=k + 1, eval_every=k + 1, out=out,
                                      overwrite=True, resume=False, **overrides)
            speed[name] = lm.train(run, data)["steps_per_second"]
    for name, sps in speed.items():
        print(f"training step ({name}): {sps:.3f} steps/s, {sps * (B + 2 * uB):,.0f} images/s")
    print(f"training step, ours vs plain NCHW fp32: {speed['ours'] / speed['plain NCHW fp32']:.2f}x")


if __name__ == "__main__":
    try:
        bench(lm.resolve(lm.parse_args(sys.argv[1:]), False))
    except lm.UserError as e:
        sys.exit(f"bench.py: error: {e}")
