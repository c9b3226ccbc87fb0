"""Codecs behind one interface: the pixel codec is exact; diffusers VAEs load from a local directory
(tiny random configs here: no weights can be downloaded) with measured factors and consistent shapes."""

import pytest
import torch

from sora_train.codecs import PixelCodec, build_codec, codec_from_manifest_name


def test_pixel_codec_is_an_exact_inverse():
    c = PixelCodec((2, 4, 4))
    x = torch.rand(2, 3, 8, 32, 16) * 2 - 1
    z = c.encode(x)
    assert z.shape == (2, 96, 4, 8, 4) and torch.equal(c.decode(z), x)
    assert codec_from_manifest_name(c.info.name).info == c.info


def test_image_vae_per_frame_from_a_local_dir(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    codec = build_codec("image_vae", str(tmp_path / "vae"))
    assert codec.info.factors == (1, 2, 2) and codec.info.latent_channels == 4 and not codec.info.causal_time
    assert codec.info.scaling_factor == 0.5
    video = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (1, 4, 5, 8, 12)
    with torch.no_grad():  # frame by frame == the raw VAE on each frame, scaled
        ref = vae.encode(video[:, :, 2]).latent_dist.mode() * 0.5
    torch.testing.assert_close(z[:, :, 2], ref, rtol=1e-4, atol=1e-5)
    assert codec.decode(z).shape == video.shape
    assert codec_from_manifest_name(codec.info.name).info == codec.info


def test_video_vae_from_a_local_dir_measures_causal_time_compression(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[2.0] * 4)
    vae.save_pretrained(tmp_path / "wan")
    codec = build_codec("video_vae", str(tmp_path / "wan"), class_name="AutoencoderKLWan")
    assert codec.info.causal_time and codec.info.factors == (2, 4, 4) and codec.info.latent_channels == 4
    assert codec.info.latent_frames(9) == 5 and codec.info.snap_frames(10) == 9
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (1, 4, 5, 8, 8)
    with torch.no_grad():
        ref = vae.encode(video).latent_dist.mode() / 2.0  # (z - mean) / std
    torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-5)
    assert codec.decode(z).shape == video.shape
    with pytest.raises(ValueError, match="no VAE class"):
        build_codec("video_vae", str(tmp_path / "wan"), class_name="AutoencoderKLNope")
