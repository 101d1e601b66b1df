"""Qwen-Image: a 60-layer MMDiT with Qwen2.5-VL (7B) text features, the Wan-style 3-D VAE used
on one frame (latents (B, 16, 1, h, w) with per-channel mean/std), 2x2 packed tokens outside the
transformer, timestep = sigma, true CFG renormalised to the conditional norm per token.

Qwen-Image-Edit (QwenImageEditPipeline) and Edit-2509/2511 (QwenImageEditPlusPipeline) are the
same transformer class. An edit conditioning carries the input images twice, as the pipelines do:
- the Qwen2.5-VL encoder sees them through its vision tower, inside the edit prompt template
  (:meth:`QwenImage.encode_text_with_images`, mode "edit": one image at about 1024² pixels;
  "edit-plus": 1-3 images at about 384² pixels, each announced as "Picture N:");
- their VAE latents (each image at about 1024² pixels, sides multiples of 32) ride in
  ``extras["reference_latents"]`` and are appended to the packed image tokens, with their grid
  sizes in ``img_shapes``; only the generated tokens come back. (Edit-2511's ``zero_cond_t``,
  timestep 0 for the reference tokens, is done by the transformer from its config.)
Which edit model a checkpoint is comes from app/models/families/variants.py.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from app.models.families.base import ANY_NUMBER, Family, call_default, convert_lora_with
from app.models.families.flux import pack_latents
from app.models.families.wan import Wan

VAE_AREA = 1024 * 1024  # both edit pipelines: reference images (and Edit's vision input) at about this many pixels
VL_AREA = 384 * 384  # Edit-Plus: each image's vision input (the pipeline's CONDITION_IMAGE_SIZE)
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json (Qwen-Image-Edit's processor/ and ComfyUI use it);
# used when the text encoder came without one
VL_IMAGE_PROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                      "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                      "image_std": [0.26862954, 0.26130258, 0.27577711]}
EDIT_PIPELINES = {"edit": "QwenImageEditPipeline", "edit-plus": "QwenImageEditPlusPipeline"}
VARIANT_MODES = {"qwen-image-edit": "edit", "qwen-image-edit-plus": "edit-plus"}  # variants.py names -> recipe


class QwenImage(Family):
    name = "qwen-image"
    transformer_class = "QwenImageTransformer2DModel"
    pipeline_class = "QwenImagePipeline"
    pipeline_aliases = ("QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
                        "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline")
    vae_class = "AutoencoderKLQwenImage"
    latent_channels = 16
    pack = 2
    video = True  # its VAE is a video VAE: an image is one latent frame (B, C, 1, h, w)
    temporal_factor = 4
    text_slots = ("qwen2vl",)
    pipeline_text_slots = {"qwen2vl": "text_encoder"}
    batch_cfg = False  # cond and uncond prompts have different lengths; the pipeline makes two calls
    own_length_prompts = True  # encode_prompt drops an all-ones mask: unmasked (flash) attention
    cfg_renorm = True
    default_scheduler = "dynamic"
    default_steps = 50  # QwenImagePipeline.__call__ defaults (true_cfg_scale 4)
    default_cfg = 4.0
    default_size = 1024
    controlnet_class = None  # QwenImageControlNetModel exists in diffusers; our ControlNet patch does not drive it yet
    reference_latents = ANY_NUMBER  # the edit pipelines take a list of images (TextEncodeImageEdit: up to 3)
    edit_modes = tuple(EDIT_PIPELINES)
    detect_priority = 45  # its tensor names include Flux/SD3's transformer_blocks

    normalise_latents = Wan.normalise_latents  # the same per-channel latents_mean / latents_std convention
    denormalise_latents = Wan.denormalise_latents

    def matches_state_dict(self, joined_keys: str) -> bool:
        return "txt_norm." in joined_keys and "img_mod." in joined_keys  # original release = ComfyUI names

    def model_latent_channels(self, config: Any) -> int:
        return int(config.out_channels or config.in_channels // 4)

    def timestep(self, handle: Any, sigma: torch.Tensor, sigma_host: torch.Tensor) -> torch.Tensor:
        return sigma.to(handle.dtype)  # the pipeline passes t / 1000

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        embeds, _, mask = handle.cond_tensors(cond)
        b, c, _, h, w = x_in.shape
        tokens, shapes = [pack_latents(x_in[:, :, 0])], [(1, h // 2, w // 2)]
        for reference in self.references(cond):  # edit models: the input images' tokens follow the generated ones
            rh, rw = reference.shape[-2:]
            if reference.dim() != 5 or rh % 2 or rw % 2 or reference.shape[0] not in (1, b):
                raise ValueError(f"a Qwen-Image reference latent must be (1 or {b}, C, 1, h, w) with even h and w "
                                 f"(image sides multiples of 16); got {tuple(reference.shape)}")
            reference = reference[:, :, 0].to(x_in.device, x_in.dtype)
            tokens.append(pack_latents(reference.expand(b, *reference.shape[1:])))
            shapes.append((1, rh // 2, rw // 2))
        guidance = None
        if getattr(handle.config, "guidance_embeds", False):
            guidance = torch.full((b,), float((cond.extras or {}).get("guidance", 1.0)), device=handle.device)
        return {"hidden_states": torch.cat(tokens, dim=1).to(handle.dtype), "timestep": timestep,
                "encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask, "guidance": guidance,
                "img_shapes": [shapes] * b}

    def unpack_output(self, out: torch.Tensor, x: torch.Tensor, config: Any) -> torch.Tensor:
        b, c, f, h, w = x.shape
        out = out[:, : (h // 2) * (w // 2)]  # edit models: drop the reference images' tokens
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, f, h, w)

    def renorm_guided(self, guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """QwenImagePipeline: rescale each packed token (channels x 2 x 2) to the conditional norm."""
        def token_norm(v: torch.Tensor) -> torch.Tensor:
            b, c, f, h, w = v.shape
            blocks = v.reshape(b, c, f, h // 2, 2, w // 2, 2)
            norm = torch.linalg.vector_norm(blocks, dim=(1, 4, 6), keepdim=True)
            return norm.expand_as(blocks).reshape(v.shape)

        return guided * (token_norm(cond) / token_norm(guided))

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        pipe = self.text_pipeline(encoders)
        length = max_length or call_default(pipe, "max_sequence_length")
        embeds, mask = pipe.encode_prompt(prompts, device=encoders.device, max_sequence_length=length)
        return embeds, None, mask

    # -- editing -----------------------------------------------------------------------------------
    def edit_mode(self, encoders: Any, mode: str = "auto") -> str:
        """"edit" or "edit-plus": as asked, else the checkpoint's variant (the loader records it), else
        edit-plus (Edit-2509/2511, the current releases)."""
        if mode in EDIT_PIPELINES:
            return mode
        if mode not in ("auto", "", None):
            raise ValueError(f"unknown Qwen-Image edit mode {mode!r}; expected auto, {', '.join(EDIT_PIPELINES)}")
        return VARIANT_MODES.get(encoders.options.get("variant", ""), "edit-plus")

    def encode_text_with_images(self, encoders: Any, prompts: list[str], images: list[torch.Tensor],
                                mode: str = "auto") -> tuple:
        """The edit pipelines' ``encode_prompt``: their prompt template, the images through the
        Qwen2.5-VL vision tower (resized as the pipeline resizes them)."""
        mode = self.edit_mode(encoders, mode)
        if mode == "edit" and len(images) > 1:
            raise ValueError(f"Qwen-Image-Edit takes one image (got {len(images)}); use mode edit-plus "
                             "(Edit-2509/2511) for up to three")
        if mode == "edit" and not images:
            return self.encode_text(encoders, prompts)  # as ComfyUI: no image, the text-to-image template
        seen = [fit_image(image, VAE_AREA if mode == "edit" else VL_AREA) for image in images]
        pipe = self.text_pipeline(encoders, EDIT_PIPELINES[mode], processor=vl_processor(encoders))
        embeds, mask = pipe.encode_prompt(prompts, image=(seen[0] if mode == "edit" else seen or None),
                                          device=encoders.device)
        return embeds, None, mask

    def reference_images(self, images: list[torch.Tensor], mode: str = "auto") -> list[torch.Tensor]:
        """Each image at about 1024² pixels, sides multiples of 32 (both edit pipelines' VAE input)."""
        import numpy as np

        return [torch.from_numpy(np.asarray(fit_image(image, VAE_AREA), dtype=np.float32) / 255.0)[None]
                for image in images]

    def convert_lora(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import diffusers.loaders.lora_pipeline as lp

        return convert_lora_with(lp.QwenImageLoraLoaderMixin, tensors, return_alphas=False)


def fit_image(image: torch.Tensor, area: int) -> Any:
    """A (1, H, W, 3) IMAGE as the edit pipelines resize it: a PIL image of about ``area`` pixels
    with the same aspect ratio, sides multiples of 32, Lanczos (their VaeImageProcessor)."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
    from PIL import Image

    if image.dim() != 4 or image.shape[0] != 1 or image.shape[-1] < 3:
        raise ValueError(f"expected one image (1, H, W, 3) per input, got shape {tuple(image.shape)}")
    pixels = (image[0, ..., :3].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
    picture = Image.fromarray(pixels)
    width, height = calculate_dimensions(area, picture.width / picture.height)
    return VaeImageProcessor(vae_scale_factor=16).resize(picture, height, width)


@functools.cache
def _processor_class() -> type:
    from transformers import Qwen2VLProcessor

    class ImageOnlyProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without a video processor: transformers 5 cannot check the class of a
        missing one unless torchvision is installed, and the edit prompts carry no video."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor


def vl_processor(encoders: Any) -> Any:
    """The Qwen2VLProcessor of the edit pipelines: the text encoder's tokenizer plus its image
    processor settings (``options["image_processor"]``: a preprocessor_config.json), else Qwen2.5-VL's."""
    from transformers import Qwen2VLImageProcessor

    tokenizer = encoders.slots["qwen2vl"][0]
    config = {k: v for k, v in (encoders.options.get("image_processor") or VL_IMAGE_PROCESSOR).items()
              if k not in ("image_processor_type", "processor_class", "auto_map")}
    return _processor_class()(image_processor=Qwen2VLImageProcessor.from_dict(config), tokenizer=tokenizer)


FAMILY = QwenImage()
