"""scripts/encode_latents.py: real videos -> normalized Wan VAE latents that sparge-train reads.

A tiny random AutoencoderKLWan stands in for the Wan VAE; ffmpeg makes the test videos."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

SRC = os.environ.get("SPARGE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(SRC, "scripts"))
import encode_latents  # noqa: E402


@pytest.fixture()
def tiny_vae(tmp_path):
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    path = tmp_path / "model" / "vae"
    vae.save_pretrained(path)
    return tmp_path / "model"


def make_video(path, size="80x64", rate=24, seconds=1):
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                    f"testsrc=size={size}:rate={rate}:duration={seconds}", "-pix_fmt", "yuv420p",
                    str(path)], check=True)


def test_latents_match_the_vae_and_the_trainer_reads_them(tmp_path, tiny_vae):
    make_video(tmp_path / "a.mp4")
    make_video(tmp_path / "b.mp4", size="64x96")
    (tmp_path / "clips.tsv").write_text(
        "# video\tprompt\na.mp4\ta test  pattern\n\nb.mp4\ta tall\ttest pattern\n")
    out = tmp_path / "data"
    encode_latents.main(["--vae", str(tiny_vae), "--manifest", str(tmp_path / "clips.tsv"),
                         "--out", str(out), "--width", "64", "--height", "64",
                         "--num-frames", "5", "--fps", "16"])
    assert (out / "prompts.txt").read_text() == "a test pattern\na tall test pattern\n"
    latents = load_file(out / "latents" / "0.safetensors")["latents"]
    assert latents.shape == (16, 2, 8, 8) and latents.dtype == torch.float32

    # The same numbers straight from diffusers: mode of the posterior, then (z - mean) / std.
    vae = encode_latents.load_vae(str(tiny_vae), "cpu", torch.float32)
    frames = encode_latents.decode_video(str(tmp_path / "a.mp4"), 64, 64, 5, 16)
    x = frames.float().permute(3, 0, 1, 2).unsqueeze(0) / 127.5 - 1.0
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents, ((z - mean) / std)[0], rtol=0, atol=1e-6)
    # And the normalization is undone by the decoder's latents / (1 / std) + mean.
    torch.testing.assert_close(latents.unsqueeze(0) * std + mean, z, rtol=1e-6, atol=1e-5)

    trainer = os.environ.get("SPARGE_TRAIN_BIN")
    if not trainer:
        pytest.skip("SPARGE_TRAIN_BIN not set: the sparge-train part needs the built binary")
    config = open(os.path.join(SRC, "config", "trainer.yaml")).read()
    for old, new in [('prompts: ""', f"prompts: {out}/prompts.txt"),
                     ('latents_dir: ""', f"latents_dir: {out}/latents"),
                     ("width: 832", "width: 64"), ("height: 480", "height: 64"),
                     ("num_frames: 81", "num_frames: 5"), ("block_q: 128", "block_q: 16"),
                     ("block_k: 128", "block_k: 16"), ("mode: hybrid", "mode: topk"),
                     ("topk: 0.05", "topk: 0.5")]:
        assert old in config, old
        config = config.replace(old, new)
    (tmp_path / "train.yaml").write_text(config)
    run = subprocess.run([trainer, "--config", str(tmp_path / "train.yaml"), "--output-dir",
                          str(tmp_path / "run"), "--max-steps", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "generating" not in run.stderr  # every latent came from the files
    assert os.path.isdir(tmp_path / "run" / "step-0000002" / "transformer")


def test_bad_manifest_lines_are_named(tmp_path):
    (tmp_path / "m.tsv").write_text("a.mp4 no tab here\n")
    with pytest.raises(SystemExit, match="m.tsv:1: expected"):
        encode_latents.read_manifest(str(tmp_path / "m.tsv"))
    (tmp_path / "m.tsv").write_text("a.mp4\t#hashtag\n")
    with pytest.raises(SystemExit, match="must be non-empty and not start with #"):
        encode_latents.read_manifest(str(tmp_path / "m.tsv"))


def test_too_short_video_is_an_error(tmp_path):
    make_video(tmp_path / "short.mp4", rate=4, seconds=1)
    with pytest.raises(RuntimeError, match="4 frames at 16 fps, need 81|frames at 16 fps, need 81"):
        encode_latents.decode_video(str(tmp_path / "short.mp4"), 64, 64, 81, 16)
