#!/usr/bin/env python3
"""Encodes real videos into clean latents for sparge-train (data.latents_dir).

sparge-train distills on clean latents x0: by default the dense teacher generates them from the
prompts, but real videos work too. This script decodes each video with the ffmpeg CLI (resampled
to --fps, scaled to cover --width x --height and centre-cropped, the first --num-frames frames),
encodes it with the Wan VAE encoder of diffusers (AutoencoderKLWan, the latent distribution's
mode), normalizes it the way the DiT sees latents ((z - latents_mean) / latents_std, the inverse
of what the decoder undoes), and writes

  OUT/prompts.txt              one prompt per line, in manifest order (data.prompts)
  OUT/latents/<i>.safetensors  "latents" [16, (F-1)/4+1, H/8, W/8] float32 (data.latents_dir)

Manifest: one video per line, "<video path><TAB><prompt>"; blank lines and lines starting with #
are skipped; relative paths are relative to the manifest. Example:

  python3 scripts/encode_latents.py --vae /models/Wan2.1-T2V-1.3B-Diffusers \\
      --manifest clips.tsv --out data/clips --width 832 --height 480 --num-frames 81 --device cuda

then set data.prompts: data/clips/prompts.txt, data.latents_dir: data/clips/latents and the same
width/height/num_frames in the trainer config.
"""
import argparse
import os
import subprocess
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--vae", required=True,
                   help="a diffusers Wan2.1 model directory (its vae/ is used) or a vae/ directory")
    p.add_argument("--manifest", required=True, help="TSV: video path <TAB> prompt, one per line")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--num-frames", type=int, default=81, help="4k+1 frames")
    p.add_argument("--fps", type=float, default=16.0, help="frame rate the video is resampled to")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true", help="re-encode existing outputs")
    args = p.parse_args(argv)
    if args.width <= 0 or args.width % 16 or args.height <= 0 or args.height % 16:
        p.error(f"--width and --height must be positive multiples of 16, got {args.width}x{args.height}")
    if args.num_frames < 1 or (args.num_frames - 1) % 4:
        p.error(f"--num-frames must be 4k+1 (1, 5, 9, ...), got {args.num_frames}")
    if not args.fps > 0:
        p.error(f"--fps must be > 0, got {args.fps}")
    return args


def read_manifest(path):
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "\t" not in line:
                raise SystemExit(f"{path}:{number}: expected '<video path><TAB><prompt>'")
            video, prompt = line.split("\t", 1)
            prompt = " ".join(prompt.split())
            if not prompt or prompt.startswith("#"):
                # sparge-train skips blank and #-lines of its prompts file: indices would shift.
                raise SystemExit(f"{path}:{number}: a prompt must be non-empty and not start with #")
            entries.append((os.path.join(base, video), prompt))
    if not entries:
        raise SystemExit(f"{path}: no videos")
    return entries


def decode_video(path, width, height, num_frames, fps):
    """uint8 [num_frames, height, width, 3] via the ffmpeg CLI."""
    import torch
    vf = (f"fps={fps},scale={width}:{height}:force_original_aspect_ratio=increase,"
          f"crop={width}:{height}")
    cmd = ["ffmpeg", "-v", "error", "-i", path, "-vf", vf, "-frames:v", str(num_frames),
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"{path}: ffmpeg failed: {result.stderr.decode(errors='replace').strip()}")
    frame_bytes = width * height * 3
    got = len(result.stdout) // frame_bytes
    if got < num_frames:
        raise RuntimeError(f"{path}: {got} frames at {fps} fps, need {num_frames}")
    data = torch.frombuffer(bytearray(result.stdout[:num_frames * frame_bytes]), dtype=torch.uint8)
    return data.view(num_frames, height, width, 3)


def load_vae(path, device, dtype):
    from diffusers import AutoencoderKLWan
    sub = os.path.join(path, "vae")
    vae = AutoencoderKLWan.from_pretrained(sub if os.path.isdir(sub) else path, torch_dtype=dtype)
    return vae.to(device).eval()


def encode(vae, frames, device, dtype):
    """Normalized latents [16, T', H', W'] float32 of uint8 frames [F, H, W, 3]."""
    import torch
    x = frames.to(device=device, dtype=torch.float32).permute(3, 0, 1, 2).unsqueeze(0)
    x = (x / 127.5 - 1.0).to(dtype)  # [1, 3, F, H, W] in [-1, 1]
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode().float()
    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    return ((z - mean) / std)[0].cpu().contiguous()


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    import torch
    from safetensors.torch import save_file
    entries = read_manifest(args.manifest)
    os.makedirs(os.path.join(args.out, "latents"), exist_ok=True)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    vae = load_vae(args.vae, args.device, dtype)
    start = time.time()
    for i, (video, prompt) in enumerate(entries):
        out = os.path.join(args.out, "latents", f"{i}.safetensors")
        if os.path.exists(out) and not args.overwrite:
            continue
        latents = encode(vae, decode_video(video, args.width, args.height, args.num_frames,
                                           args.fps), args.device, dtype)
        save_file({"latents": latents}, out + ".tmp", metadata={"prompt": prompt, "video": video})
        os.replace(out + ".tmp", out)
        done = i + 1
        eta = (time.time() - start) / done * (len(entries) - done)
        print(f"[{done}/{len(entries)}] {os.path.basename(video)} -> {out} "
              f"{list(latents.shape)} (ETA {eta:.0f} s)", file=sys.stderr)
    with open(os.path.join(args.out, "prompts.txt"), "w", encoding="utf-8") as f:
        for _, prompt in entries:
            f.write(prompt + "\n")
    print(f"wrote {len(entries)} latents to {args.out}/latents and {args.out}/prompts.txt",
          file=sys.stderr)


if __name__ == "__main__":
    main()
