"""Train mmkern's tiny text-to-image model on coloured shapes it draws itself, on a CPU, in a few minutes.

    python examples/train_tiny_text2image.py                      # ~5 minutes, writes ./tiny_text2image_out/
    python examples/train_tiny_text2image.py --minutes 10 --out /tmp/t2i
    python examples/train_tiny_text2image.py --steps 3 --sample-steps 2 --samples-per-caption 1   # smoke test

Data: 16x16 RGB images of one shape (square, circle, triangle) in one colour (red, green, blue,
yellow) on a black canvas, with jittered position and size, captioned "a red square", ... (12
captions). The model (mmkern.models.TinyText2Image: BERT-style text encoder, DiT denoiser with
adaLN and cross-attention) runs every attention and norm on mmkern's ops, trains with
mmkern.diffusion.add_noise / diffusion_loss and samples with DDIM (mmkern.diffusion.ddim_step) and
classifier-free guidance. Writes samples.png (a row per caption) and loss.png (the loss curve), and prints
the colour accuracy of the samples (mmkern.models.text2image.colour_accuracy: each sample's foreground colour,
classified to the nearest of the four, against its caption's; chance is 1/4).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import mmkern
from mmkern.models import TinyText2Image
from mmkern.models.text2image import colour_accuracy

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("square", "circle", "triangle")
CAPTIONS = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]


def draw_shapes(n: int, size: int = 16, generator: torch.Generator | None = None):
    """n random captioned images: (n, 3, size, size) in [-1, 1] (black background = -1) and their captions."""
    which = torch.randint(0, len(CAPTIONS), (n,), generator=generator)
    centre = size / 2 - 0.5 + (torch.rand(n, 2, generator=generator) - 0.5) * size * 0.25   # jitter +-1/8
    radius = size * (0.22 + 0.1 * torch.rand(n, generator=generator))                       # half-size 3.5..5 px
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    dy, dx = ys[None] - centre[:, 0, None, None], xs[None] - centre[:, 1, None, None]
    r = radius[:, None, None]
    masks = {"square": (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85),
             "circle": dx ** 2 + dy ** 2 <= r ** 2,
             # apex up: the half-width grows from 0 at the top (dy = -r) to r at the base (dy = r)
             "triangle": (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2)}
    images = torch.full((n, 3, size, size), -1.0)
    captions = []
    for i, c in enumerate(which.tolist()):
        caption = CAPTIONS[c]
        _, colour, shape = caption.split()
        rgb = torch.tensor(COLOURS[colour])[:, None, None] * 2 - 1
        images[i] = torch.where(masks[shape][i], rgb, images[i])
        captions.append(caption)
    return images, captions


def to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    """(3, H, W) in [-1, 1] -> an RGB image enlarged `scale` times (nearest: the pixels stay visible)."""
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    pil = Image.fromarray(array, "RGB")
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def save_grid(rows: list[tuple[str, torch.Tensor]], path: str, scale: int = 4) -> None:
    """One row per caption: the caption, then its images (k, 3, H, W)."""
    label_w, pad = 110, 4
    k, _, h, w = rows[0][1].shape
    cell_h, cell_w = h * scale + pad, w * scale + pad
    grid = Image.new("RGB", (label_w + k * cell_w, len(rows) * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (caption, images) in enumerate(rows):
        y = pad + r * cell_h
        draw.text((4, y + h * scale // 2 - 5), caption, fill=(0, 0, 0))
        for c in range(k):
            grid.paste(to_pil(images[c], scale), (label_w + c * cell_w, y))
    grid.save(path)


def save_loss_curve(losses: list[float], path: str, width: int = 640, height: int = 360) -> None:
    """Loss per step (light) and its moving average (dark), log-scaled y axis, drawn with Pillow."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 15, 25, height - 35
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    draw.text((left, 6), "training loss (log scale) per step; dark: moving average", fill=(0, 0, 0))
    if losses:
        window = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        lo, hi = math.log10(max(min(losses), 1e-6)), math.log10(max(max(losses), 1e-6))
        hi = hi if hi > lo else lo + 1

        def point(i, value):
            x = left + (right - left) * (i / max(len(losses) - 1, 1))
            y = bottom - (bottom - top) * (math.log10(max(value, 1e-6)) - lo) / (hi - lo)
            return x, y
        for series, colour in ((losses, (170, 190, 230)), (smooth, (20, 50, 150))):
            pts = [point(i, v) for i, v in enumerate(series)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=1 if series is losses else 2)
            else:
                draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=colour)
        for frac in (0.0, 0.5, 1.0):
            value = 10 ** (lo + frac * (hi - lo))
            y = bottom - (bottom - top) * frac
            draw.text((4, y - 5), f"{value:.3g}", fill=(0, 0, 0))
        draw.text((left, bottom + 8), "step 0", fill=(0, 0, 0))
        draw.text((right - 60, bottom + 8), f"step {len(losses)}", fill=(0, 0, 0))
    img.save(path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100_000, help="training steps at most (default: until --minutes)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time at most (default 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps when sampling")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    parser.add_argument("--samples-per-caption", type=int, default=6)
    parser.add_argument("--patch", type=int, default=4, help="DiT patch size (2: 64 tokens, finer, ~4x slower)")
    parser.add_argument("--dim", type=int, default=96, help="DiT width")
    parser.add_argument("--depth", type=int, default=3, help="DiT blocks")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model's ops are too small to share out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="tiny_text2image_out", help="output directory")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.minutes <= 0:
        parser.error("--steps must be >= 1 and --minutes > 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    model = TinyText2Image(CAPTIONS, patch=args.patch, dim=args.dim, depth=args.depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    print(f"TinyText2Image: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; mmkern backends "
          f"here: {', '.join(mmkern.available_backends())}")

    losses, start = [], time.monotonic()
    budget = args.minutes * 60
    bar = tqdm(total=args.steps if args.steps < 100_000 else None, unit="step", desc="training", dynamic_ncols=True)
    model.train()
    while len(losses) < args.steps and time.monotonic() - start < budget:
        step = len(losses)
        lr = args.lr * min(1.0, (step + 1) / 100)                      # linear warm-up over 100 steps
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, captions = draw_shapes(args.batch_size)
        loss = model.loss(images, captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}",
                            left=f"{max(0.0, budget - (time.monotonic() - start)):.0f}s")
    bar.close()

    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for caption in tqdm(CAPTIONS, desc="sampling", unit="caption", dynamic_ncols=True):
        rows.append((caption, model.sample([caption] * args.samples_per_caption, steps=args.sample_steps,
                                           guidance=args.guidance, generator=generator)))
    samples_path = os.path.join(args.out, "samples.png")
    loss_path = os.path.join(args.out, "loss.png")
    data_path = os.path.join(args.out, "training_data.png")
    save_grid(rows, samples_path)
    sampled_captions = [caption for caption, images in rows for _ in range(images.shape[0])]
    accuracy = colour_accuracy(torch.cat([images for _, images in rows]), sampled_captions, COLOURS)
    save_loss_curve(losses, loss_path)
    examples = []
    for caption in CAPTIONS:                       # what the model was shown: the same grid layout
        images, captions = draw_shapes(64)
        picked = [images[i] for i, c in enumerate(captions) if c == caption][:args.samples_per_caption]
        while len(picked) < args.samples_per_caption:
            picked.append(torch.full_like(images[0], -1.0))
        examples.append((caption, torch.stack(picked)))
    save_grid(examples, data_path)
    print(f"trained {len(losses)} steps in {time.monotonic() - start:.0f} s; final loss (mean of last 50) "
          f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    print(f"colour accuracy of the samples: {round(accuracy * len(sampled_captions))}/{len(sampled_captions)} = "
          f"{accuracy:.2f} (chance 1/{len(COLOURS)} = {1 / len(COLOURS):.2f})")
    print(f"wrote {samples_path} (samples, a row per caption), {loss_path} (loss curve), "
          f"{data_path} (training examples)")
    return {"samples": samples_path, "loss": loss_path, "data": data_path, "steps": len(losses),
            "colour_accuracy": accuracy, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


if __name__ == "__main__":
    main()
