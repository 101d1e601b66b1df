"""Where the time of the PixArt-Σ parity run goes, stage by stage, ours vs the pipeline.

The companion of bench/gpu_parity.py (same random full-size models, same prompt): each stage
is timed on its own with the GPU synchronised around it (median of --repeats), so the gap
between the two end-to-end times can be read off. ``--trace`` also records a torch profiler
table and a Chrome trace of one run of each side (kernel time is the same on both sides; the
gap is time the GPU sits idle).

    python bench/gpu_parity_profile.py --out $OUT/gpu_parity_profile.json [--trace]
    python bench/gpu_parity_profile.py --tiny --out /tmp/profile.json      # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu_parity as gp  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_parity_profile.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny random models on CPU")
    parser.add_argument("--trace", action="store_true", help="also write profiler tables and traces next to --out")
    args = parser.parse_args()
    import diffusers

    from app.models.handles import ModelHandle, TextEncoders, VAEHandle
    from nodes.latent import EmptyLatent, VAEDecode
    from app.models.sampling import compute_sigmas, make_noise, sample
    from nodes.text import TextEncode, TextEncodeNegative, TextEncodePair

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = gp.TINY if args.tiny else gp.FULL
    size, steps, cfg = (32, 2, 4.5) if args.tiny else (1024, 28, 4.5)
    factor = 2 ** (len(configs["pixart"]["vae"]["block_out_channels"]) - 1)
    parts = gp.build("pixart", configs, device, dtype)
    noise = make_noise((1, 4, size // factor, size // factor), 0)
    run_pipe = gp.pipeline_runner("pixart", parts, size, steps, cfg, noise)
    run_ours, _, _ = gp.ours_runner("pixart", parts, size, steps, cfg, 0, device, dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def ms(fn) -> float:
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000, 2)

    pipe = diffusers.PixArtSigmaPipeline(**{k: parts[k] for k in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    handle = ModelHandle(parts["transformer"], "pixart", device, dtype, scheduler_config=dict(parts["scheduler"].config))
    encoders = TextEncoders({"t5": (parts["tokenizer"], parts["text_encoder"])}, "pixart", device, dtype)
    vae = VAEHandle(parts["vae"], device, dtype)
    pos, neg = TextEncodePair(encoders, gp.PROMPT, "", "pixart")
    latent = EmptyLatent(handle, vae, size, size, 1)
    sigmas = compute_sigmas(handle, "auto", steps, 0.0, (size // factor, size // factor))
    embeds = pipe.encode_prompt(gp.PROMPT, True, negative_prompt="", device=device, clean_caption=False)
    quiet = dict(progress=lambda *a: None)

    def sample_ours(preview: bool):
        return sample(handle, latent, pos, neg, sigmas, 0, cfg, "cfg", "dpmpp_2m", preview=preview, **quiet)

    denoised = sample_ours(False)
    for _ in range(2):  # warm-up
        run_pipe(), run_ours()
    stages = {
        "end_to_end": {"pipeline": ms(run_pipe), "ours_engine": ms(run_ours)},
        "text_encode": {
            "pipeline_encode_prompt_with_negative": ms(lambda: pipe.encode_prompt(gp.PROMPT, True, negative_prompt="",
                                                                                 device=device, clean_caption=False)),
            "ours_TextEncode": ms(lambda: TextEncode(encoders, gp.PROMPT, "pixart")),
            "ours_TextEncodeNegative": ms(lambda: TextEncodeNegative(encoders, "", "pixart")),
            "ours_TextEncodePair": ms(lambda: TextEncodePair(encoders, gp.PROMPT, "", "pixart")),
        },
        "sampling": {
            "pipeline_latents_out": ms(lambda: pipe(prompt_embeds=embeds[0], prompt_attention_mask=embeds[1],
                                                    negative_prompt_embeds=embeds[2], negative_prompt_attention_mask=embeds[3],
                                                    negative_prompt=None, height=size, width=size, num_inference_steps=steps,
                                                    guidance_scale=cfg, latents=noise.to(device, dtype), output_type="latent",
                                                    use_resolution_binning=False)),
            "ours_with_previews": ms(lambda: sample_ours(True)),
            "ours_without_previews": ms(lambda: sample_ours(False)),
        },
        "decode": {"ours_VAEDecode": ms(lambda: VAEDecode(vae, denoised))},
    }
    report = {"benchmark": "gpu_parity_profile", "family": "pixart", "size": size, "steps": steps,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "repeats": args.repeats, "milliseconds": stages}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.trace and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("pipeline", run_pipe), ("ours", run_ours)):
            sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                sync()
            averages = prof.key_averages()
            report[f"{name}_kernel_ms"] = round(sum(e.self_device_time_total for e in averages) / 1000, 2)
            (out.parent / f"profile_{name}_table.txt").write_text(averages.table(sort_by="self_cuda_time_total", row_limit=40))
            prof.export_chrome_trace(str(out.parent / f"profile_{name}_trace.json"))
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
