"""Test fixtures: diffusers state dicts written back in their models' original formats.

Checkpoints people download are often in the format of the model's own code base (Stability's
MMDiT for SD3/3.5, Black Forest Labs' for Flux.1), not diffusers'. To test that such files
load offline (diffusers' single-file converters plus a local config folder), models are
written out in those formats here: the inverses of diffusers'
``convert_sd3_transformer_checkpoint_to_diffusers`` and ``convert_flux_transformer_checkpoint_to_diffusers``.
"""

from __future__ import annotations

import torch


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): the original final norms order them the other way."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def _mover(s: dict[str, torch.Tensor], out: dict[str, torch.Tensor]):
    """move(src, dst[, fn]): pop src(.weight/.bias) from ``s`` into ``out`` as dst(.weight/.bias)."""

    def move(src: str, dst: str, fn=lambda t: t) -> None:
        for suffix in (".weight", ".bias", ""):
            if src + suffix in s:
                out[dst + suffix] = fn(s.pop(src + suffix)).contiguous()

    return move


def _final_layer(move, s: dict, out: dict) -> dict[str, torch.Tensor]:
    """The output layer (same in both formats), then a check that every tensor found a name."""
    move("proj_out", "final_layer.linear")
    move("norm_out.linear", "final_layer.adaLN_modulation.1", _swap_halves)
    if s:
        raise KeyError(f"no original-format name for {sorted(s)[:5]}")
    return out


def sd3_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel state dict in Stability's MMDiT key layout."""
    s = dict(state)
    out: dict[str, torch.Tensor] = {}
    move = _mover(s, out)

    move("pos_embed.pos_embed", "pos_embed")
    move("pos_embed.proj", "x_embedder.proj")
    move("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    move("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    move("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    move("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    move("context_embedder", "context_embedder")
    layers = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks."))
    for i in range(layers):
        b, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == layers - 1  # the last block's context stream stops after attention
        for attn, block in (("attn", "x_block.attn"), ("attn2", "x_block.attn2")):
            for suffix in (".weight", ".bias"):
                names = [f"{b}.{attn}.to_{c}{suffix}" for c in "qkv"]
                if all(n in s for n in names):
                    out[f"{o}.{block}.qkv{suffix}"] = torch.cat([s.pop(n) for n in names])
            move(f"{b}.{attn}.norm_q", f"{o}.{block}.ln_q")
            move(f"{b}.{attn}.norm_k", f"{o}.{block}.ln_k")
            move(f"{b}.{attn}.to_out.0", f"{o}.{block}.proj")
        for suffix in (".weight", ".bias"):
            out[f"{o}.context_block.attn.qkv{suffix}"] = torch.cat([s.pop(f"{b}.attn.add_{c}_proj{suffix}") for c in "qkv"])
        move(f"{b}.attn.norm_added_q", f"{o}.context_block.attn.ln_q")
        move(f"{b}.attn.norm_added_k", f"{o}.context_block.attn.ln_k")
        move(f"{b}.attn.to_add_out", f"{o}.context_block.attn.proj")
        move(f"{b}.norm1.linear", f"{o}.x_block.adaLN_modulation.1")
        move(f"{b}.norm1_context.linear", f"{o}.context_block.adaLN_modulation.1", _swap_halves if last else (lambda t: t))
        move(f"{b}.ff.net.0.proj", f"{o}.x_block.mlp.fc1")
        move(f"{b}.ff.net.2", f"{o}.x_block.mlp.fc2")
        move(f"{b}.ff_context.net.0.proj", f"{o}.context_block.mlp.fc1")
        move(f"{b}.ff_context.net.2", f"{o}.context_block.mlp.fc2")
    return _final_layer(move, s, out)


def flux_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in Black Forest Labs' key layout (flux1-dev.safetensors).
    diffusers' converter assumes Flux.1's width (3072), so only models of that width round-trip."""
    s = dict(state)
    out: dict[str, torch.Tensor] = {}
    move = _mover(s, out)
    for ours, theirs in (("timestep", "time_in"), ("text", "vector_in"), ("guidance", "guidance_in")):
        move(f"time_text_embed.{ours}_embedder.linear_1", f"{theirs}.in_layer")
        move(f"time_text_embed.{ours}_embedder.linear_2", f"{theirs}.out_layer")
    move("context_embedder", "txt_in")
    move("x_embedder", "img_in")
    double = {int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks.")}
    for i in sorted(double):
        b, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for suffix in (".weight", ".bias"):
            out[f"{o}.img_attn.qkv{suffix}"] = torch.cat([s.pop(f"{b}.attn.to_{c}{suffix}") for c in "qkv"])
            out[f"{o}.txt_attn.qkv{suffix}"] = torch.cat([s.pop(f"{b}.attn.add_{c}_proj{suffix}") for c in "qkv"])
        out[f"{o}.img_attn.norm.query_norm.scale"] = s.pop(f"{b}.attn.norm_q.weight")
        out[f"{o}.img_attn.norm.key_norm.scale"] = s.pop(f"{b}.attn.norm_k.weight")
        out[f"{o}.txt_attn.norm.query_norm.scale"] = s.pop(f"{b}.attn.norm_added_q.weight")
        out[f"{o}.txt_attn.norm.key_norm.scale"] = s.pop(f"{b}.attn.norm_added_k.weight")
        move(f"{b}.norm1.linear", f"{o}.img_mod.lin")
        move(f"{b}.norm1_context.linear", f"{o}.txt_mod.lin")
        move(f"{b}.attn.to_out.0", f"{o}.img_attn.proj")
        move(f"{b}.attn.to_add_out", f"{o}.txt_attn.proj")
        move(f"{b}.ff.net.0.proj", f"{o}.img_mlp.0")
        move(f"{b}.ff.net.2", f"{o}.img_mlp.2")
        move(f"{b}.ff_context.net.0.proj", f"{o}.txt_mlp.0")
        move(f"{b}.ff_context.net.2", f"{o}.txt_mlp.2")
    single = {int(k.split(".")[1]) for k in s if k.startswith("single_transformer_blocks.")}
    for i in sorted(single):
        b, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for suffix in (".weight", ".bias"):  # q, k, v and the MLP input share one matrix
            out[f"{o}.linear1{suffix}"] = torch.cat([s.pop(f"{b}.attn.to_{c}{suffix}") for c in "qkv"] + [s.pop(f"{b}.proj_mlp{suffix}")])
        out[f"{o}.norm.query_norm.scale"] = s.pop(f"{b}.attn.norm_q.weight")
        out[f"{o}.norm.key_norm.scale"] = s.pop(f"{b}.attn.norm_k.weight")
        move(f"{b}.norm.linear", f"{o}.modulation.lin")
        move(f"{b}.proj_out", f"{o}.linear2")
    return _final_layer(move, s, out)
