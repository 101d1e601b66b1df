"""Uploads into the input folder, and the workflow embedded in a PNG, WebP or video."""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, Request

from app.core import paths
from app.core.images import ImageRefused, sniff_image, verify_image
from app.core.jsonlimits import JSONRefused, parse
from app.core.workflow import FORMAT, Workflow, WorkflowError, atomic_write
from app.fronts.comfy.metadata import embedded_texts
from app.fronts.http.bodies import api_router
from app.fronts.http.responses import JSONResponse, error, problems_response
from app.fronts.http.security import BodyTooLarge
from app.fronts.http.settings import MB
from app.fronts.http.state import AppState


async def read_body(request: Request, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds ``limit`` bytes."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    except BodyTooLarge:
        return None
    return b"".join(chunks)


async def uploaded_bytes(request: Request, limit: int) -> tuple[bytes, str] | JSONResponse:
    """(file bytes, original file name) from a multipart form (field ``image`` or ``file``) or a raw body."""
    body = await read_body(request, limit + 64 * 1024)
    if body is None:
        return error(413, f"upload over the {limit // MB} MB limit")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
        except Exception as exc:
            return error(400, f"unreadable multipart form: {exc}")
        upload = form.get("image") or form.get("file")
        if upload is None or isinstance(upload, str):
            return error(400, "send the file in a form field named 'image' (or 'file')")
        data = await upload.read()
        name = upload.filename or "upload"
        await form.close()
    else:
        data, name = body, request.headers.get("x-filename", "upload")
    if len(data) > limit:
        return error(413, f"upload over the {limit // MB} MB limit")
    if not data:
        return error(400, "the upload is empty")
    return data, name


def safe_stem(name: str) -> str:
    stem = Path(name.replace("\\", "/")).name
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:64]
    return stem or "upload"


def _workflow_from_texts(texts: dict[str, str], state: AppState) -> JSONResponse:
    raw = texts.get("workflow")
    if raw is None and texts.get("comment", "").lstrip().startswith("{"):
        raw = texts["comment"]  # ditgraph's SaveVideo: the MP4/WebM comment tag (app.core.media)
    if raw is not None:
        try:
            document = parse(raw)
        except JSONRefused as exc:
            return error(422, f"the file's embedded workflow is refused: {exc}")
        if isinstance(document, dict) and document.get("format") == FORMAT:
            try:
                Workflow.from_dict(document)
            except WorkflowError as exc:
                return problems_response(exc, 422)
            return JSONResponse({"workflow": document, "source": "ditgraph"})
    if "prompt" in texts or raw is not None:  # a ComfyUI file: its editor graph or its API-format 'prompt'
        from app.fronts.comfy import ComfyImportError, import_texts

        try:
            workflow = import_texts(texts, state.registry)
        except ComfyImportError as exc:
            return error(422, str(exc), unmapped=exc.unmapped)
        except ValueError as exc:
            return error(422, f"this file carries a ComfyUI workflow that cannot be imported: {exc}")
        return JSONResponse({"workflow": workflow, "source": "comfyui"})
    return error(422, "this file carries no ditgraph workflow (no 'workflow' text chunk or video tag)")


def routes(state: AppState) -> APIRouter:
    router = api_router(state)
    settings = state.settings

    upload_doc = {"requestBody": {"content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": {"image": {"type": "string", "format": "binary"}}, "required": ["image"]}}}}}

    @router.post("/uploads", summary="Upload a PNG, JPEG or WebP image into the input folder", openapi_extra=upload_doc)
    async def post_upload(request: Request) -> JSONResponse:
        got = await uploaded_bytes(request, settings.max_upload_bytes)
        if isinstance(got, JSONResponse):
            return got
        data, original = got
        kind = sniff_image(data)
        if kind is None:
            return error(415, "only PNG, JPEG and WebP images are accepted")
        try:
            width, height = await asyncio.to_thread(verify_image, data)
        except ImageRefused as exc:
            return error(413 if exc.too_large else 400, f"the {kind.upper()} file is refused: {exc}")
        digest = hashlib.sha256(data).hexdigest()[:12]
        name = f"{safe_stem(original)}-{digest}.{'jpg' if kind == 'jpeg' else kind}"
        root = paths.input_dir()
        target = paths.confine(root, name)
        if not target.exists():  # same content, same name: nothing to write
            await asyncio.to_thread(atomic_write, target, data)
        return JSONResponse({"name": name, "size": len(data), "format": kind, "width": width, "height": height})

    @router.post("/workflow-from-png", summary="The workflow embedded in a ditgraph PNG (text key 'workflow')",
                 openapi_extra=upload_doc)
    async def post_workflow_from_png(request: Request) -> JSONResponse:
        got = await uploaded_bytes(request, settings.max_upload_bytes)
        if isinstance(got, JSONResponse):
            return got
        data, _ = got
        try:
            texts = embedded_texts(data)  # PNG text chunks, WEBP EXIF or video tags
        except ImageRefused as exc:
            return error(413 if exc.too_large else 415, str(exc))
        except ValueError as exc:  # not an image or video we read, or its texts are too large
            return error(413 if getattr(exc, "too_large", False) else 415, str(exc))
        return _workflow_from_texts(texts, state)

    return router
