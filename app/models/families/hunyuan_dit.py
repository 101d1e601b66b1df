"""HunyuanDiT (v1.0-1.2): a discrete-time v-prediction DiT (long skip connections, 2x2 patches,
2-D RoPE) cross-attending to a bilingual BERT (77 tokens) and mT5-XL (256 tokens), both masked;
the SDXL VAE (4 channels). v1.0/1.1 also embed the image size and a style id.

A conditioning carries both text sequences as one: BERT's tokens then mT5's, each zero-padded to
the wider of the two widths, with one mask; the model call splits them at the transformer's
``text_len`` (as the pipeline, the encoders always use 77 and 256 tokens)."""

from __future__ import annotations

from typing import Any

import torch

from app.models.families.base import Family

BERT_TOKENS, T5_TOKENS = 77, 256  # HunyuanDiTPipeline's lengths (the transformer's text_len, text_len_t5)
ORIGINAL_SIZE = (1024, 1024)  # HunyuanDiTPipeline's default original_size (v1.0/1.1 image-size embedding)
ROPE_BASE = 512  # the pipeline's RoPE base size in pixels


class HunyuanDiT(Family):
    name = "hunyuan-dit"
    transformer_class = "HunyuanDiT2DModel"
    pipeline_class = "HunyuanDiTPipeline"
    pipeline_aliases = ("HunyuanDiTPAGPipeline",)
    prediction = "v"
    latent_channels = 4
    text_slots = ("bert", "t5")
    pipeline_text_slots = {"bert": "text_encoder", "t5": "text_encoder_2"}
    default_scheduler = "discrete"
    default_steps = 50  # HunyuanDiTPipeline.__call__ defaults
    default_cfg = 5.0
    detect_priority = 10

    def matches_state_dict(self, joined_keys: str) -> bool:
        return "text_embedding_padding" in joined_keys  # original, ComfyUI and diffusers names alike

    def timestep(self, handle: Any, sigma: torch.Tensor, sigma_host: torch.Tensor) -> torch.Tensor:
        # the pipeline passes timesteps in the latents' dtype; the time embedding computes in it
        return handle.timesteps_for(sigma_host).to(handle.dtype)

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, _, mask = handle.cond_tensors(cond)
        config = handle.config
        split = int(config.text_len)
        b, _, h, w = x_in.shape
        p = int(config.patch_size)
        rope = handle.cached(("hunyuan_rope", h // p, w // p), lambda: _rope_table(config, h // p, w // p),
                             torch.float32)
        meta = torch.tensor([[*ORIGINAL_SIZE, h * self.vae_factor, w * self.vae_factor, 0, 0]], device=handle.device,
                            dtype=handle.dtype).repeat(b, 1)
        return {"hidden_states": x_in.to(handle.dtype), "timestep": timestep,
                "encoder_hidden_states": embeds[:, :split, : int(config.cross_attention_dim)].contiguous(),
                "text_embedding_mask": mask[:, :split],
                # contiguous: the transformer views the T5 states flat
                "encoder_hidden_states_t5": embeds[:, split:, : int(config.cross_attention_dim_t5)].contiguous(),
                "text_embedding_mask_t5": mask[:, split:], "image_meta_size": meta,
                "style": torch.zeros(b, dtype=torch.long, device=handle.device),
                "image_rotary_emb": (rope[0], rope[1])}

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        """Both encoders as the pipeline runs them (fixed lengths: ``max_length`` does not apply)."""
        pipe = self.text_pipeline(encoders)
        parts = [pipe.encode_prompt(prompts, device=encoders.device, do_classifier_free_guidance=False,
                                    max_sequence_length=length, text_encoder_index=index)
                 for index, length in enumerate((BERT_TOKENS, T5_TOKENS))]
        width = max(embeds.shape[-1] for embeds, *_ in parts)
        embeds = torch.cat([torch.nn.functional.pad(e, (0, width - e.shape[-1])) for e, *_ in parts], dim=1)
        mask = torch.cat([m for _, _, m, _ in parts], dim=1)
        return embeds, None, mask

    def original_to_diffusers(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Tencent's layout (its releases; ComfyUI's all-in-one files under ``model.diffusion_model.``):
        diffusers' scripts/convert_hunyuandit_to_diffusers.py as a key map; other tensors (the
        all-in-one file's text encoders and VAE) are left out."""
        if "blocks.0.attn1.Wqkv.weight" not in tensors:
            return None
        out: dict[str, torch.Tensor] = {}

        def move(src: str, dst: str, chunks: int = 1, fn=None) -> None:
            for suffix in (".weight", ".bias"):
                if src + suffix in tensors:
                    parts = tensors[src + suffix].chunk(chunks) if chunks > 1 else [tensors[src + suffix]]
                    for name, part in zip(dst.split("|"), parts, strict=True):
                        out[name + suffix] = fn(part) if fn else part

        for i in range(1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))):
            b = f"blocks.{i}"
            move(f"{b}.attn1.Wqkv", f"{b}.attn1.to_q|{b}.attn1.to_k|{b}.attn1.to_v", 3)
            move(f"{b}.attn2.kv_proj", f"{b}.attn2.to_k|{b}.attn2.to_v", 2)
            for attn in ("attn1", "attn2"):
                move(f"{b}.{attn}.q_norm", f"{b}.{attn}.norm_q")
                move(f"{b}.{attn}.k_norm", f"{b}.{attn}.norm_k")
                move(f"{b}.{attn}.out_proj", f"{b}.{attn}.to_out.0")
            move(f"{b}.attn2.q_proj", f"{b}.attn2.to_q")
            move(f"{b}.norm2", f"{b}.norm3")  # the original's norm2/norm3 are diffusers' norm3/norm2
            move(f"{b}.norm3", f"{b}.norm2")
            move(f"{b}.norm1", f"{b}.norm1.norm")
            move(f"{b}.default_modulation.1", f"{b}.norm1.linear")
            move(f"{b}.mlp.fc1", f"{b}.ff.net.0.proj")
            move(f"{b}.mlp.fc2", f"{b}.ff.net.2")
            move(f"{b}.skip_norm", f"{b}.skip_norm")
            move(f"{b}.skip_linear", f"{b}.skip_linear")
        for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
            move(f"pooler.{proj}", f"time_extra_emb.pooler.{proj}")
        for src, dst in (("t_embedder.mlp.0", "time_extra_emb.timestep_embedder.linear_1"),
                         ("t_embedder.mlp.2", "time_extra_emb.timestep_embedder.linear_2"),
                         ("x_embedder.proj", "pos_embed.proj"), ("mlp_t5.0", "text_embedder.linear_1"),
                         ("mlp_t5.2", "text_embedder.linear_2"), ("extra_embedder.0", "time_extra_emb.extra_embedder.linear_1"),
                         ("extra_embedder.2", "time_extra_emb.extra_embedder.linear_2"), ("final_layer.linear", "proj_out")):
            move(src, dst)
        move("final_layer.adaLN_modulation.1", "norm_out.linear", fn=_swap_halves)  # (shift, scale) -> (scale, shift)
        for src, dst in (("pooler.positional_embedding", "time_extra_emb.pooler.positional_embedding"),
                         ("text_embedding_padding", "text_embedding_padding")):
            if src in tensors:
                out[dst] = tensors[src]
        if "style_embedder.weight" in tensors:  # diffusers keeps the one style the release uses
            out["time_extra_emb.style_embedder.weight"] = tensors["style_embedder.weight"][0:1]
        return out

    def lora_name_table(self, transformer: torch.nn.Module) -> dict:
        """Tencent's HunyuanDiT LoRAs name the original fused layers (attn1.Wqkv, attn2.kv_proj, ...)."""
        table: dict[str, list] = {}
        for i in range(len(transformer.blocks)):
            b = f"blocks.{i}"
            table[f"{b}.attn1.Wqkv"] = [(f"{b}.attn1.to_{c}", n, 3, False) for n, c in enumerate("qkv")]
            table[f"{b}.attn1.out_proj"] = [(f"{b}.attn1.to_out.0", 0, 1, False)]
            table[f"{b}.attn2.q_proj"] = [(f"{b}.attn2.to_q", 0, 1, False)]
            table[f"{b}.attn2.kv_proj"] = [(f"{b}.attn2.to_{c}", n, 2, False) for n, c in enumerate("kv")]
            table[f"{b}.attn2.out_proj"] = [(f"{b}.attn2.to_out.0", 0, 1, False)]
            table[f"{b}.mlp.fc1"] = [(f"{b}.ff.net.0.proj", 0, 1, False)]
            table[f"{b}.mlp.fc2"] = [(f"{b}.ff.net.2", 0, 1, False)]
        return table


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2)
    return torch.cat([second, first])


def _rope_table(config: Any, gh: int, gw: int) -> torch.Tensor:
    """(cos, sin) of the pipeline's 2-D RoPE: the grid resized and centre-cropped into the base size."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    base = ROPE_BASE // 8 // int(config.patch_size)
    cos, sin = get_2d_rotary_pos_embed(int(config.attention_head_dim), get_resize_crop_region_for_grid((gh, gw), base),
                                       (gh, gw), output_type="pt")
    return torch.stack([cos, sin])


FAMILY = HunyuanDiT()
