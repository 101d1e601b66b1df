"""The :class:`Family` base class: one model architecture's facts and behaviours.

A family module subclasses :class:`Family`, sets the facts (class attributes) and overrides
the behaviours that differ from the defaults, then exposes one instance as ``FAMILY``.
Nothing outside ``app/models/families/`` branches on a family's name: callers ask the
family object (``families.get(name)`` or ``handle.info``).

Time conventions (``prediction``), all mapped to the engine's flow-matching convention
x_s = (1 - s) x0 + s noise, velocity v = noise - x0:
  "flow"          the transformer predicts v (timestep from :meth:`Family.timestep`)
  "flow_reversed" Lumina 2: timestep 1 - s, predicts x0 - noise (= -v)
  "eps"           PixArt: a discrete-time epsilon model (VP); s is mapped to the VE sigma
                  s/(1-s), then to its (fractional) training timestep.
  "v"             HunyuanDiT: the same discrete-time VP model predicting v = alpha eps - sigma x0.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch


class Family:
    """Facts and behaviours of one model family (subclass per family; see the module docstring)."""

    # -- identity and classes -----------------------------------------------------------------
    name: ClassVar[str] = ""
    transformer_class: ClassVar[str] = ""
    pipeline_class: ClassVar[str | None] = None
    pipeline_aliases: ClassVar[tuple[str, ...]] = ()  # other pipeline class names detected as this family
    vae_class: ClassVar[str] = "AutoencoderKL"
    # -- latent layout -------------------------------------------------------------------------
    prediction: ClassVar[str] = "flow"  # "flow" | "flow_reversed" | "eps" | "v"
    latent_channels: ClassVar[int] = 16
    vae_factor: ClassVar[int] = 8  # VAE spatial downsampling
    temporal_factor: ClassVar[int] = 1  # VAE temporal downsampling (video families; 1 = images)
    video: ClassVar[bool] = False  # latents are (B, C, F, H, W): frames = (F - 1) * temporal_factor + 1
    pack: ClassVar[int] = 1  # Flux: pack x pack latent patches become tokens outside the transformer
    # -- text ------------------------------------------------------------------------------------
    text_slots: ClassVar[tuple[str, ...]] = ()  # text encoders the conditioning uses, in order
    guessed_from_text: ClassVar[bool] = True  # may "auto" pick this family from the text encoders alone?
    optional_text_slots: ClassVar[tuple[str, ...]] = ()  # slots the pipeline can do without
    pipeline_text_slots: ClassVar[dict[str, str]] = {}  # slot -> diffusers pipeline component
    manifest_text_encoder: ClassVar[bool] = False  # the text encoder is named by ditgraph.json
    negative_differs: ClassVar[bool] = False  # negatives are encoded differently (no batched pair)
    # each prompt is encoded to its own length, without a mask when all its tokens count (Qwen-Image):
    # a batched pair would pad the shorter prompt and force masked, slower attention
    own_length_prompts: ClassVar[bool] = False
    # -- sampling defaults -----------------------------------------------------------------------
    default_scheduler: ClassVar[str] = "shifted"
    default_shift: ClassVar[float] = 3.0
    default_steps: ClassVar[int] = 28
    default_cfg: ClassVar[float] = 4.5
    default_size: ClassVar[int] = 1024
    default_frames: ClassVar[int] = 1  # video families: pixel frames (a multiple of temporal_factor, plus 1)
    default_fps: ClassVar[float] = 16.0
    batch_cfg: ClassVar[bool] = True  # evaluate cond+uncond as one batch (as the pipeline does)
    cfg_renorm: ClassVar[bool] = False  # Lumina 2: rescale the guided prediction to the conditional norm
    distilled_guidance: ClassVar[float | None] = None  # Flux-dev's guidance embedding default
    # -- patches -----------------------------------------------------------------------------------
    controlnet_class: ClassVar[str | None] = None  # the diffusers ControlNet class that can steer this family
    # how many input images' latents it takes as extra tokens (Kontext 1, Flux.2 10, Qwen-Image-Edit
    # ANY_NUMBER); the ReferenceLatent node and the model call refuse more (:meth:`references`)
    reference_latents: ClassVar[int] = 0
    edit_modes: ClassVar[tuple[str, ...]] = ()  # image-conditioned text recipes (encode_text_with_images)
    joint_attention: ClassVar[bool] = False  # SD3-type joint text+image blocks (condition tokens attach there)
    cache_refused: ClassVar[tuple[str, ...]] = ()  # cache methods (accelerators' names) that cannot hook it
    # -- detection -------------------------------------------------------------------------------
    detect_priority: ClassVar[int] = 0  # higher is asked first (a specific family before its base)
    state_dict_aliases: ClassVar[tuple[str, ...]] = ()  # state-dict guesses that also fit this family

    def __repr__(self) -> str:
        return f"Family({self.name})"

    @property
    def discrete_time(self) -> bool:
        """A discrete-time VP model (eps or v prediction): training timesteps, a top sigma below 1."""
        return self.prediction in ("eps", "v")

    # -- detection -------------------------------------------------------------------------------
    def matches_config(self, config: dict) -> bool:
        """Whether a transformer ``config.json`` belongs to this family."""
        return config.get("_class_name") == self.transformer_class

    def matches_pipeline(self, class_name: str) -> bool:
        """Whether a pipeline's ``model_index.json`` ``_class_name`` belongs to this family."""
        return bool(class_name) and class_name in (self.pipeline_class, *self.pipeline_aliases)

    def matches_state_dict(self, joined_keys: str) -> bool:
        """Whether single-file tensor names (newline-joined) look like this family."""
        return False

    def original_to_diffusers(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """A single file's tensors (prefixes stripped) renamed to diffusers' names, for families whose
        original layout diffusers has no single-file converter for (HunyuanDiT); None: not such a file."""
        return None

    def converter_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A single file's tensors as diffusers' single-file converter for this family expects them
        (e.g. without a ComfyUI prefix the converter does not strip)."""
        return tensors

    def accepts_state_dict_of(self, guessed: str) -> bool:
        """Whether weights guessed as ``guessed`` may load into this family's transformer."""
        return guessed in (self.name, *self.state_dict_aliases)

    # -- latent layout ---------------------------------------------------------------------------
    def model_latent_channels(self, config: Any) -> int:
        """Latent channels of a transformer config (packed families see pack² times more)."""
        return int(config.in_channels) // (self.pack * self.pack)

    def patch_size(self, config: Any) -> int:
        """Spatial patch size (tokens per latent pixel side)."""
        return self.pack if self.pack > 1 else int(getattr(config, "patch_size", 1) or 1)

    def temporal_patch_size(self, config: Any) -> int:
        return 1

    def seq_len(self, config: Any, dims: tuple[int, ...]) -> int:
        """Image/video tokens of a latent with spatial (or frames, height, width) ``dims``."""
        p = self.patch_size(config)
        tokens = (dims[-2] // p) * (dims[-1] // p)
        return tokens * (dims[-3] // self.temporal_patch_size(config) if len(dims) >= 3 else 1)

    def latent_shape(self, config: Any, batch: int, width: int, height: int, frames: int = 1) -> tuple[int, ...]:
        """The zero latent's shape for a ``width`` x ``height`` (x ``frames``) output."""
        channels, f = self.model_latent_channels(config), self.vae_factor
        if not self.video:
            return batch, channels, height // f, width // f
        return batch, channels, (frames - 1) // self.temporal_factor + 1, height // f, width // f

    def size_problem(self, config: Any, width: int, height: int, frames: int = 1) -> str | None:
        """Why this output size does not fit the VAE and patch grid (None when it does)."""
        multiple = self.vae_factor * self.patch_size(config)
        if width % multiple or height % multiple:
            return f"width and height must be multiples of {multiple} for {self.name} (got {width}x{height})"
        if self.video and (frames - 1) % self.temporal_factor:
            return (f"frames must be a multiple of {self.temporal_factor} plus 1 for {self.name} "
                    f"(e.g. {self.default_frames}; got {frames})")
        return None

    # -- VAE latent normalisation ----------------------------------------------------------------
    def normalise_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        """VAE posterior latents -> the model's normalised latent space (SD3/Flux: (z - shift) * scale)."""
        return (z - _config_float(vae, "shift_factor", 0.0)) * _config_float(vae, "scaling_factor", 1.0)

    def denormalise_latents(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        return z / _config_float(vae, "scaling_factor", 1.0) + _config_float(vae, "shift_factor", 0.0)

    def vae_patch(self, vae: Any) -> int:
        """Side of the VAE-latent patches :meth:`normalise_latents` folds into channels (Flux.2: 2):
        normalised latents have p*p times the VAE's channels at 1/p of its resolution."""
        return 1

    def decode_kwargs(self, vae: torch.nn.Module, z: torch.Tensor) -> dict:
        """Extra arguments of ``vae.decode`` (LTX's timestep-conditioned decoder)."""
        return {}

    def image_to_video_condition(self, vae: Any, image: torch.Tensor, frames: int) -> dict:
        """Conditioning extras that make a text-to-video call image-to-video (first frame ``image``
        (B, H, W, 3) in [0, 1], already at the output size)."""
        raise ValueError(f"{self.name} has no image-to-video conditioning")

    def pick_transformer(self, handle: Any, sigma_host: torch.Tensor) -> torch.nn.Module:
        """Which transformer evaluates this call (Wan 2.2: a high- and a low-noise expert)."""
        return handle.transformer

    # -- schedule --------------------------------------------------------------------------------
    def dynamic_shift_mu(self, image_seq_len: int, steps: int, scheduler_config: dict) -> float:
        """mu of the "dynamic" schedule (exponential time shift): Flux.1/SD3.5's linear rule in the
        token count, with the scheduler config's base/max shift and sequence lengths."""
        from app.models.families import dynamic_mu

        return dynamic_mu(image_seq_len, scheduler_config)

    # -- model call ------------------------------------------------------------------------------
    def model_input(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Engine latents -> the transformer's input space (eps/v: VE sample, scaled)."""
        if not self.discrete_time:
            return x
        shape = (-1,) + (1,) * (x.dim() - 1)
        ve = (sigma / (1 - sigma).clamp(min=1e-12)).view(shape)
        x_in = x / (1 - sigma).clamp(min=1e-12).view(shape)  # VE-space sample
        return x_in / (ve**2 + 1).sqrt()  # diffusers' scale_model_input

    def timestep(self, handle: Any, sigma: torch.Tensor, sigma_host: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input for engine sigmas (flow default: s * 1000)."""
        if self.discrete_time:
            return handle.timesteps_for(sigma_host)
        return sigma * 1000

    def native_kwargs(self, handle: Any, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> dict:
        """Exactly what is passed to ``transformer(**kwargs, return_dict=False)``."""
        raise NotImplementedError(f"no model call for family {self.name!r}")

    def unpack_output(self, out: torch.Tensor, x: torch.Tensor, config: Any) -> torch.Tensor:
        """The transformer's output in the latent layout of ``x`` (packed families unpack)."""
        return out

    def to_velocity(self, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, config: Any = None) -> torch.Tensor:
        """Native output -> flow velocity v = noise - x0 (float32)."""
        out = self.unpack_output(out.float(), x, config)
        if out.shape[1] == 2 * x.shape[1]:  # learned sigma (PixArt, Sana variants): keep the mean
            out = out[:, : x.shape[1]]
        if self.prediction == "flow":
            return out
        if self.prediction == "flow_reversed":
            return -out
        s = sigma.view((-1,) + (1,) * (x.dim() - 1))
        ve = s / (1 - s).clamp(min=1e-12)
        if self.prediction == "v":  # VP sample c x_ve (c = 1/sqrt(ve² + 1)): x0 = c² x_ve - ve c v, eps = ve c² x_ve + c v
            x_ve, c2 = x / (1 - s).clamp(min=1e-12), 1 / (ve**2 + 1)
            return (ve * c2 * x_ve + c2.sqrt() * out) - (c2 * x_ve - ve * c2.sqrt() * out)
        # eps: x0 = x_ve - ve * eps; v = eps - x0
        x0 = x / (1 - s).clamp(min=1e-12) - ve * out
        return out - x0

    def constrain_velocity(self, v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """The velocity under what ``cond`` holds fixed (Wan 2.2 TI2V: the given first latent frame,
        whose velocity then points at it); default: unchanged."""
        return v

    def renorm_guided(self, guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``cfg_renorm`` families: the guided velocity rescaled to the conditional one's norm
        (Lumina 2's pipeline: over the last axis; packed families override per token)."""
        return guided * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))

    # -- text --------------------------------------------------------------------------------------
    def text_pipeline(self, encoders: Any, pipeline: str | None = None, **components: Any) -> Any:
        """A diffusers pipeline object (``pipeline``, default the family's) holding only the text
        components plus ``components`` (e.g. a processor); no weights are copied."""
        import diffusers

        cls = getattr(diffusers, pipeline or self.pipeline_class)
        kwargs: dict[str, Any] = {n: None for n in inspect.signature(cls.__init__).parameters if n != "self"}
        kwargs.update(components)
        for slot, component in self.pipeline_text_slots.items():
            if slot in encoders.slots:
                tokenizer, model = encoders.slots[slot]
                kwargs[component] = model
                kwargs[component.replace("text_encoder", "tokenizer")] = tokenizer
        missing = [s for s in self.text_slots if s not in encoders.slots and s not in self.optional_text_slots]
        if missing:
            raise ValueError(f"{self.name} needs text encoder(s) {', '.join(missing)}; this TEXT_ENCODER has "
                             f"{', '.join(encoders.slots) or 'none'} (load them with TextEncoderLoader)")
        return cls(**kwargs)

    def encode_text(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        """(embeds, pooled | None, mask | None) for ``prompts``, as the family's pipeline encodes them."""
        raise NotImplementedError(f"no text encoding for family {self.name!r}")

    def encode_negative(self, encoders: Any, prompts: list[str], max_length: int = 0) -> tuple:
        """The negative side; differs from :meth:`encode_text` only when ``negative_differs``."""
        return self.encode_text(encoders, prompts, max_length)

    def encode_text_with_images(self, encoders: Any, prompts: list[str], images: list[torch.Tensor],
                                mode: str = "auto") -> tuple:
        """(embeds, pooled | None, mask | None) of an edit instruction that sees ``images`` (each
        (1, H, W, 3) in [0, 1]) through the text encoder; ``mode`` is one of ``edit_modes``."""
        raise ValueError(f"{self.name} has no image-conditioned text encoding (Qwen-Image-Edit has)")

    def references(self, cond: Any) -> tuple[torch.Tensor, ...]:
        """The input images' latents ``cond`` carries, refused beyond the ``reference_latents`` it takes."""
        found = references_of(cond)
        if len(found) > self.reference_latents:
            limit = f"at most {self.reference_latents}" if self.reference_latents else "no"
            raise ValueError(f"{self.name} models take {limit} reference image(s) (one per ReferenceLatent); "
                             f"this conditioning has {len(found)}")
        return found

    def reference_images(self, images: list[torch.Tensor], mode: str = "auto") -> list[torch.Tensor]:
        """The images as the family's edit pipeline VAE-encodes them into reference latents."""
        return images

    def text_options(self, transformer: torch.nn.Module) -> dict:
        """Options the text encoders need from the transformer (SD3 without T5: the pad width)."""
        return {}

    # -- patches -------------------------------------------------------------------------------------
    def lora_name_table(self, transformer: torch.nn.Module) -> dict:
        """Original (non-diffusers) LoRA module names -> [(module, chunk index, chunks, swap)]."""
        return {}

    def convert_lora(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A LoRA state dict in diffusers/peft naming (diffusers' converters where they exist)."""
        return tensors

    def magcache_ratios(self) -> list[float] | None:
        """Published MagCache ratios for this family, if any."""
        return None


def _config_float(module: torch.nn.Module, name: str, default: float) -> float:
    return float(getattr(module.config, name, default) or default)


def channel_view(values: Any, like: torch.Tensor) -> torch.Tensor:
    """Per-channel statistics shaped to broadcast over (B, C, ...) latents like ``like``."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, *([1] * (like.dim() - 2)))


def convert_lora_with(mixin: Any, tensors: dict[str, torch.Tensor], return_alphas: bool) -> dict[str, torch.Tensor]:
    """Run one of diffusers' LoRA format converters (``mixin.lora_state_dict``); unchanged when
    already in diffusers/peft naming or when the converter does not know the format."""
    keys = list(tensors)
    if all((".lora_A." in k or ".lora_B." in k or k.endswith(".alpha")) and not k.startswith("diffusion_model.")
           for k in keys):
        return tensors  # already diffusers/peft naming
    try:
        if return_alphas:
            converted, alphas = mixin.lora_state_dict(dict(tensors), return_alphas=True)
        else:
            converted, alphas = mixin.lora_state_dict(dict(tensors)), None
    except Exception:
        return tensors  # not a format the converter knows: matched generically (and reported)
    out = dict(converted)
    for key, value in (alphas or {}).items():
        out[key if key.endswith(".alpha") else key + ".alpha"] = torch.as_tensor(value)
    return out


def masked_text(family: Family, encoders: Any, prompts: list[str], max_length: int, **extra: Any) -> tuple:
    """PixArt/Sana/Lumina 2 style: ``encode_prompt`` returning (embeds, mask, neg, neg_mask)."""
    pipe = family.text_pipeline(encoders)
    kw: dict[str, Any] = {"max_sequence_length": max_length} if max_length else {}
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=encoders.device,
                                            **kw, **extra)
    return embeds, None, mask


ANY_NUMBER = 1 << 20  # ``reference_latents`` of a family with no limit of its own (Qwen-Image-Edit-Plus)


def references_of(cond: Any) -> tuple[torch.Tensor, ...]:
    """The input images' latents a conditioning carries (ReferenceLatent, TextEncodeImageEdit)."""
    return tuple((getattr(cond, "extras", None) or {}).get("reference_latents") or ())


def call_default(pipe: Any, name: str) -> Any:
    """The default of a pipeline ``__call__`` argument."""
    return inspect.signature(type(pipe).__call__).parameters[name].default
