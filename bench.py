"""
bench.py: throughput of layermatch.py next to a classic per-image PIL pipeline, measured side by side.

    python bench.py                                   # CIFAR-sized defaults on the best device
    python bench.py --dataset digits --device cpu     # any layermatch.py flag selects the config

Prints, for this device and config, on synthetic uint8 images of the dataset's shape: augmentation
throughput ((weak, strong) pairs per second) against the same recipe run per image on PIL with
torchvision transforms (what the classic implementations do in DataLoader workers), with one thread
each and with all threads; decoding JPEG files with all cores against one PIL read after another; then the
full training step in our configuration against the same model in plain NCHW fp32, and with the images in
host memory (--data-on host) against on the device (each twice, interleaved, the best kept), and the batch
gather alone on either side. Every ratio ends its line as N.NNx. First it estimates the run's device memory,
with the data on the device and on the host:

    python bench.py --dataset imagenet100 --device cpu --batch-size 2 --uratio 1   # ResNet-50 at 224 px
"""
import contextlib
import dataclasses
import io
import os
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
    while not calls or time.time() - start < min_seconds:
        fn()
        calls += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.time() - start) / calls


DATASET_SIZES = {"cifar10": (50000, 10000, 10), "cifar100": (50000, 10000, 100), "svhn": (73257, 26032, 10),
                 "stl10": (105000, 8000, 10), "imagenet100": (126689, 5000, 100)}  # (train + unlabeled, test, classes)
SHAPES = {"digits": (1, 8), "stl10": (3, 96), "imagenet100": (3, 224)}  # (C, S); the rest (3, 32)


def memory_estimate(cfg: lm.Config, C: int, S: int, B: int, uB: int) -> list:
    """Device memory of a training run, measured on the CPU (lm.training_memory: fp32 weights + gradients + momentum
    + EMA, and the activations one step saves for backward, bf16 autocast and fp32) with the uint8 dataset on the
    device or in host memory; on the host, the device holds two steps' batches (one in use, one prefetched)."""
    n_train, n_test, classes = DATASET_SIZES.get(cfg.dataset, (0, 0, 10))
    net = lm.make_network(dataclasses.asdict(cfg), classes, (C, S, S))
    images, GB, side = B + 2 * uB, 1e9, int(S / 0.875) if cfg.dataset == "imagenet100" else S  # stored as TorchSSL's
    data, state = (n_train * side**2 + n_test * S**2) * C / GB, 16 * sum(p.numel() for p in net.parameters()) / GB
    bf16, fp32 = (lm.training_memory(net, (C, S, S), images, dtype) / GB for dtype in (torch.bfloat16, None))
    batches = 2 * (B + uB) * C * side**2 / GB
    return [f"device memory estimate, data on the device: data {data:.2f} GB + weights, grads, momentum, EMA "
            f"{state:.2f} GB + activations {bf16 - state:.2f} GB (bf16/fp16; fp32 {fp32 - state:.2f} GB) "
            f"= {data + bf16:.1f} GB (fp32 {data + fp32:.1f} GB)",
            f"device memory estimate, data on the host (--data-on host): {bf16 + batches:.1f} GB (fp32 "
            f"{fp32 + batches:.1f} GB), of which {batches:.3g} GB two steps' batches; host memory {data:.2f} GB "
            f"(the memory-mapped cache: one copy for all processes of a machine)"]


def decode_speed(S: int, side: tuple, n: int) -> tuple:
    """(images/s with lm.read_images' processes, images/s of one PIL read after another) on n JPEG photos' stand-ins
    of side (width, height) (smooth colour gradients with noise), each decoded, resized to S and centre-cropped."""
    g, (w, h) = torch.Generator().manual_seed(0), side
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(n):
            ramp = torch.linspace(0, 1, w).view(1, 1, w) * torch.rand(3, 1, 1, generator=g) * 200
            noise = torch.randint(0, 56, (3, h, w), generator=g)
            im = (ramp + noise).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            paths.append(f"{folder}/{i}.jpg")
            Image.fromarray(im).save(paths[-1], quality=90)
        speed = lambda read: n / min(seconds_per_call(read, torch.device("cpu"), 0) for _ in range(2))
        return speed(lambda: lm.read_images(paths, S)), speed(lambda: [lm.read_image(p, S) for p in paths])


def bench(cfg: lm.Config):
    device, threads = lm.pick_device(cfg.device, 0), torch.get_num_threads()
    C, S = SHAPES.get(cfg.dataset, (3, 32))
    B, uB = cfg.batch_size, cfg.uratio * cfg.batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (max(1024, B + uB), C, S, S), dtype=torch.uint8, generator=g)
    y = torch.arange(len(x)) % 10
    print(f"device {device}, torch {torch.__version__}, {threads} threads, dataset shape {C}x{S}x{S}, B={B}, muB={uB}")
    print(*memory_estimate(cfg, C, S, B, uB), sep="\n", flush=True)
    for side, n, size in (((500, 375), 384, S), ((224, 224), 1536, 64)):  # photos; small ones (ImageNet's 224 to 64 px)
        decode, serial = decode_speed(size, side, n)
        print(f"decoding {side[0]}x{side[1]} JPEGs to {size} px: {lm.usable_cpus()} processes {decode:,.0f} images/s, "
              f"serial PIL {serial:,.0f} images/s   {decode / serial:.2f}x")

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
    plain = dict(precision="fp32", channels_last=False, compile=False, data_on="device")
    configs = {"ours": dict(data_on="device"), "plain NCHW fp32": plain, "images in host memory": dict(data_on="host")}
    for _ in range(2):  # each configuration twice, interleaved, its best kept: a busy machine slows single runs
        for name, overrides in configs.items():
            with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()), \
                    contextlib.redirect_stdout(io.StringIO()):  # the runs' own progress bars
                run = dataclasses.replace(cfg, dataset="bench", labels=10, steps=k + 1, eval_every=k + 1, out=out,
                                          overwrite=True, resume=False, **overrides)
                speed[name] = max(speed.get(name, 0), lm.train(run, data)["steps_per_second"])
    for name, sps in speed.items():
        print(f"training step ({name}): {sps:.3f} steps/s, {sps * (B + 2 * uB):,.0f} images/s")
    print(f"training step, ours vs plain NCHW fp32: {speed['ours'] / speed['plain NCHW fp32']:.2f}x")
    print(f"training step, images in host memory (--data-on host) vs on the device: "
          f"{speed['images in host memory'] / speed['ours']:.2f}x")
    gather = {}  # the one thing the two placements do differently on a CPU, timed alone
    for on_host in (False, True):
        feed = lm.Batches(lm.to_device(data, torch.arange(10), cfg, device, torch.channels_last, on_host), B, uB,
                          device, 0)
        gather[on_host] = seconds_per_call(feed.draw, device, 0.5)
    print(f"batch gather per step, images in host memory vs on the device: {1e3 * gather[True]:.3f} ms vs "
          f"{1e3 * gather[False]:.3f} ms; the step itself {1e3 / speed['ours']:,.0f} ms")


if __name__ == "__main__":
    try:
        bench(lm.resolve(lm.parse_args(sys.argv[1:]), False))
    except lm.UserError as e:
        sys.exit(f"bench.py: error: {e}")
