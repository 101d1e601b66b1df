"""training/text.py's trimmed MiniLM (the copy carried to the GPU machine): it must encode every
caption of both grammars as the full model does."""

import torch
from transformers import AutoTokenizer

from training import text, world
from training import video_world as vw


def _captions():
    return world.captions(world.sample_scenes(300, seed=2)) + vw.captions(vw.sample_clips(300, seed=2))


def test_grammar_ids_cover_every_token_of_image_and_video_captions():
    tok = AutoTokenizer.from_pretrained(text.default_path(), local_files_only=True)
    kept = set(text.grammar_token_ids(tok))
    used = {i for c in _captions() for i in tok(c)["input_ids"]}
    assert used - kept == set(), tok.convert_ids_to_tokens(sorted(used - kept))


def test_trimmed_copy_encodes_video_captions_as_the_full_model(tmp_path):
    text.write_trimmed(text.default_path(), str(tmp_path / "minilm"))
    rebuilt = text.materialise_trimmed(str(tmp_path / "minilm"), str(tmp_path / "rebuilt"))  # as on the GPU machine
    caps = vw.captions(vw.sample_clips(6, seed=4)) + [""]
    full = text.encode_prompts(*text.load_text_encoder(None), caps)
    trimmed = text.encode_prompts(*text.load_text_encoder(rebuilt), caps)
    for a, b in zip(full, trimmed, strict=True):
        assert torch.allclose(a, b, atol=0.02), (a - b).abs().max()
