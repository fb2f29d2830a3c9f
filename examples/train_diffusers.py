"""Train a tiny unconditional diffusers model with anisotropic noise, then sample, save and reload it.

This is the core of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``
(UNet2DModel + DDPMScheduler + MSE on the noise + DDPMPipeline) with anisodiff dropped in. Against
the diffusers script, the changes are:

* the scheduler: ``AnisoDDPMScheduler(..., noise_spec=spec)`` instead of ``DDPMScheduler(...)``;
* the two lines that draw the noise and noise the images::

      noise = torch.randn(clean_images.shape, device=clean_images.device)             # diffusers
      noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)        # diffusers

      noisy_images, noise = ad.add_noise(clean_images, timesteps, spec, noise_scheduler)  # anisodiff

  (the loss ``mse(model_output, noise)`` is unchanged: ``noise`` is now the shaped noise, the
  target both papers train on). Equivalently, keep the white draw and the scheduler call
  (``AnisoDDPMScheduler.add_noise`` shapes the white noise) and set the target with
  ``noise = noise_scheduler.shape_noise(noise, timesteps)``;
* sampling: ``AnisoDDPMPipeline`` instead of ``DDPMPipeline`` (it starts from the shaped prior).
  ``save_pretrained`` stores the spec in ``scheduler/scheduler_config.json``.

The data is anisodiff's procedural dataset (natural-image colour and 1/f statistics, no download);
the spec is fitted on it: the SDM antisqueeze ``s = -0.4`` on the principal colour axis.

    python examples/train_diffusers.py --steps 300 --output runs/aniso_ddpm
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import anisodiff as ad
from anisodiff.datasets import ProceduralImages

try:
    from diffusers import UNet2DModel

    from anisodiff.integrations.diffusers import AnisoDDPMPipeline, AnisoDDPMScheduler
except ImportError as exc:
    raise SystemExit(f"this example needs diffusers: pip install diffusers ({exc})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100, ~20 s on a laptop CPU)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=16, help="image side")
    p.add_argument("--strength", type=float, default=-0.4, help="SDM squeeze strength s (-0.4: the papers' best)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--inference-steps", type=int, default=50)
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="train_diffusers_out", help="folder for the saved pipeline")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    dataset = ProceduralImages(n=max(512, args.batch_size), size=args.size, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)

    # The noise spec, fitted on the data: the principal colour axis, mild antisqueeze.
    pca = ad.fit_channel_pca(loader, k=1, progress=False)
    spec = ad.NoiseSpec(squeeze=pca.squeeze(args.strength))
    print(f"principal colour axis {pca.axes[:, 0].tolist()}, spec {spec}")

    noise_scheduler = AnisoDDPMScheduler(num_train_timesteps=1000, noise_spec=spec)   # changed
    model = UNet2DModel(
        sample_size=args.size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    batches = itertools.cycle(loader)
    start = time.perf_counter()
    for step in range(args.steps):
        clean_images = next(batches).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                                  device=device, dtype=torch.int64)
        # was: noise = torch.randn(clean_images.shape, device=device)
        #      noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        noisy_images, noise = ad.add_noise(clean_images, timesteps, spec, noise_scheduler)   # changed
        model_output = model(noisy_images, timesteps).sample
        loss = F.mse_loss(model_output.float(), noise.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")

    # Sampling: the pipeline starts from the shaped prior and draws shaped step noise.
    pipeline = AnisoDDPMPipeline(unet=model, scheduler=noise_scheduler)                 # changed
    pipeline.save_pretrained(args.output)
    pipeline = AnisoDDPMPipeline.from_pretrained(args.output).to(device)
    pipeline.set_progress_bar_config(disable=True)
    if pipeline.scheduler.noise_spec != spec:
        raise SystemExit("the reloaded pipeline lost its noise spec")
    images = pipeline(batch_size=args.num_images, generator=torch.Generator().manual_seed(args.seed),
                      num_inference_steps=args.inference_steps, output_type="np").images
    print(f"saved the pipeline to {args.output}/ (noise spec in scheduler/scheduler_config.json); "
          f"sampled {images.shape[0]} images of {images.shape[1]}x{images.shape[2]}, "
          f"mean {images.mean():.3f}, std {images.std():.3f}")
    try:
        from PIL import Image
        grid = (images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1, 3) * 255).round().astype("uint8")
        Image.fromarray(grid).save(f"{args.output}/samples.png")
        print(f"wrote {args.output}/samples.png")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
