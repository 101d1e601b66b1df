"""Workflows embedded in files (PNG, WEBP, MP4/WebM), the CLI commands, and export round trips."""

from __future__ import annotations

import json
import subprocess
import zlib

import pytest
from PIL import Image, PngImagePlugin

from app.fronts.cli import main, make_registry
from app.fronts.comfy import (
    ComfyImportError,
    EmbeddedWorkflowError,
    convert,
    import_file,
    read_embedded_workflow,
    to_api,
)
from app.fronts.comfy.export import ComfyExportError, export_comfy
from app.fronts.comfy.metadata import png_texts
from tests.fixtures.comfy_graphs import flux_custom_sampler


@pytest.fixture(scope="module")
def registry():
    return make_registry()


def _png(texts: dict[str, str]) -> bytes:
    import io

    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value, zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_png_carries_both_formats_and_the_editor_one_wins(registry):
    ui = flux_custom_sampler()
    api, _, _ = to_api(ui)
    data = _png({"workflow": json.dumps(ui), "prompt": json.dumps(api)})
    found = read_embedded_workflow(data)
    assert found["workflow"] == ui and found["prompt"] == api
    document = import_file(data, registry)
    assert document["layout"]["groups"][0]["title"] == "Load models"  # from the editor format
    broken = _png({"workflow": json.dumps({"nodes": [{"id": 1, "type": "NoSuchNode"}], "links": []}),
                   "prompt": json.dumps(api)})
    assert import_file(broken, registry)["nodes"].keys() == document["nodes"].keys()  # the API format as fallback


def _ztxt(key: str, payload: bytes) -> bytes:
    body = key.encode() + b"\0\0" + zlib.compress(payload, 9)
    return len(body).to_bytes(4, "big") + b"zTXt" + body + zlib.crc32(b"zTXt" + body).to_bytes(4, "big")


def test_png_decompressed_text_is_capped_in_total_not_per_chunk():
    plain = _png({})
    head, tail = plain[:-12], plain[-12:]  # before IEND
    chunks = b"".join(_ztxt(f"k{i}", b"x" * (3 * 1024 * 1024)) for i in range(4))  # 4 x 3 MB, each under a 10 MB cap
    assert len(png_texts(head + chunks + tail, budget_bytes=13 * 1024 * 1024)) == 4
    with pytest.raises(EmbeddedWorkflowError, match="inflates past"):
        png_texts(head + chunks + tail, budget_bytes=10 * 1024 * 1024)


def test_webp_exif_workflow_as_comfyui_writes_it(tmp_path, registry):
    ui = flux_custom_sampler()
    exif = Image.Exif()
    exif[0x010F] = "workflow:" + json.dumps(ui)  # ComfyUI's SaveAnimatedWEBP: Make = workflow, Model = prompt
    exif[0x0110] = "prompt:" + json.dumps(to_api(ui)[0])
    Image.new("RGB", (4, 4)).save(tmp_path / "a.webp", exif=exif.tobytes())
    assert read_embedded_workflow(tmp_path / "a.webp")["workflow"] == ui
    assert "11" in import_file(tmp_path / "a.webp", registry)["nodes"]
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.webp")
    with pytest.raises(EmbeddedWorkflowError, match="WEBP file carries no workflow"):
        read_embedded_workflow(tmp_path / "plain.webp")


@pytest.mark.parametrize("suffix,codec", [("mp4", "mpeg4"), ("webm", "libvpx")])
def test_video_container_metadata(tmp_path, suffix, codec, registry):
    import imageio_ffmpeg

    ui = flux_custom_sampler()
    ui["nodes"][3]["widgets_values"] = ["quotes ' = ; # \\ and\na newline"]
    target = tmp_path / f"a.{suffix}"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=16x16:d=0.1",
                    "-metadata", "workflow=" + json.dumps(ui), "-movflags", "use_metadata_tags", "-c:v", codec, str(target)],
                   check=True, capture_output=True)
    assert read_embedded_workflow(target)["workflow"] == ui
    assert import_file(target, registry)["nodes"]["4"]["inputs"]["text"] == "quotes ' = ; # \\ and\na newline"


@pytest.mark.parametrize("magic,what", [(b"fLaC\0\0\0\x22", "FLAC audio"), (b"glTF\x02\0\0\0", "GLB 3D model"),
                                        (b"GIF89a", "not a workflow file")])
def test_other_files_are_refused_in_one_line(magic, what):
    with pytest.raises(EmbeddedWorkflowError, match=what):
        read_embedded_workflow(magic + b"\0" * 32)


def strip(document: dict) -> dict:
    return {k: {"type": v["type"], "inputs": v["inputs"]} for k, v in document["nodes"].items()}


def test_round_trip_import_export_import_is_stable(registry):
    first = convert(flux_custom_sampler(), registry)
    exported = export_comfy(first)
    assert exported["11"]["class_type"] == "SamplerCustomAdvanced" and exported["11.guider"]["class_type"] == "BasicGuider"
    assert exported["2"] == {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                                         "clip_name2": "t5xxl_fp16.safetensors"}}
    second = convert(exported, registry)
    assert strip(second) == strip(first)
    assert strip(convert(export_comfy(second), registry)) == strip(first)


def test_round_trip_of_ksampler_shift_and_controlnet(registry):
    api, _, _ = to_api(flux_custom_sampler())
    for key in ("6", "7", "8", "9", "11"):
        del api[key]
    api["20"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 2.5}}
    api["40"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny"}}
    api["41"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    api["42"] = {"class_type": "ControlNetApplySD3", "inputs": {
        "positive": ["5", 0], "negative": ["4", 0], "control_net": ["40", 0], "image": ["41", 0], "vae": ["3", 0],
        "strength": 0.7, "start_percent": 0.0, "end_percent": 0.8}}
    api["11"] = {"class_type": "KSampler", "inputs": {"seed": 3, "steps": 8, "cfg": 2.0, "sampler_name": "heun",
                                                      "scheduler": "karras", "denoise": 1.0, "model": ["20", 0],
                                                      "positive": ["42", 0], "negative": ["42", 1], "latent_image": ["10", 0]}}
    first = convert(api, registry)
    assert first["nodes"]["11"]["inputs"]["shift"] == 2.5 and first["nodes"]["11"]["inputs"]["model"] == {"from": ["42", "model"]}
    exported = export_comfy(first)
    assert exported["11.shift"] == {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 2.5}}
    assert exported["11"]["inputs"]["positive"] == ["42", 0] and exported["42"]["inputs"]["positive"] == ["5", 0]
    assert strip(convert(exported, registry)) == strip(first)


def test_export_lists_types_without_a_comfyui_counterpart(registry):
    document = convert(flux_custom_sampler(), registry)
    document["nodes"]["90"] = {"type": "TeaCache", "inputs": {"model": {"from": ["1", "model"]}}}
    with pytest.raises(ComfyExportError, match="TeaCache"):
        export_comfy(document)


def test_cli_import_and_export(tmp_path, capsys):
    source = tmp_path / "flux.json"
    source.write_text(json.dumps(flux_custom_sampler()))
    assert main(["import-comfy", str(source), "-o", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert ours["nodes"]["11"]["type"] == "SamplerCustom" and ours["meta"]["name"] == "flux"
    assert main(["export-comfy", str(tmp_path / "ours.json"), "-o", str(tmp_path / "api.json")]) == 0
    assert json.loads((tmp_path / "api.json").read_text())["11"]["class_type"] == "SamplerCustomAdvanced"
    capsys.readouterr()
    (tmp_path / "sd15.json").write_text(json.dumps({"4": {"class_type": "CheckpointLoaderSimple",
                                                           "inputs": {"ckpt_name": "v1-5-pruned.safetensors"}}}))
    assert main(["import-comfy", str(tmp_path / "sd15.json")]) == 2
    err = capsys.readouterr().err
    assert "Stable Diffusion 1.x" in err and len(err.strip().splitlines()) == 1


def test_convert_refuses_what_is_not_a_comfyui_workflow(registry):
    with pytest.raises(ComfyImportError, match="not a ComfyUI workflow"):
        convert({"hello": 1}, registry)


def test_server_reads_editor_format_from_png_and_webp(tmp_path):
    from tests.fixtures._server_helpers import shared_server, wait_idle

    server = shared_server()
    wait_idle(server)
    ui = flux_custom_sampler()
    exif = Image.Exif()
    exif[0x010F] = "workflow:" + json.dumps(ui)
    Image.new("RGB", (4, 4)).save(tmp_path / "a.webp", exif=exif.tobytes())
    with server.client() as client:
        for name, data in (("a.png", _png({"workflow": json.dumps(ui)})), ("a.webp", (tmp_path / "a.webp").read_bytes())):
            answer = client.post("/api/workflow-from-png", files={"file": (name, data, "application/octet-stream")})
            assert answer.status_code == 200, answer.text
            assert answer.json()["source"] == "comfyui" and answer.json()["workflow"]["nodes"]["11"]["type"] == "SamplerCustom"
        ui["nodes"][0]["widgets_values"] = ["hidream_e1_full_bf16.safetensors", "default"]  # an editing model not run here
        refused = client.post("/api/workflow-from-png", files={"file": ("b.png", _png({"workflow": json.dumps(ui)}), "image/png")})
        assert refused.status_code == 422 and "HiDream" in refused.text
