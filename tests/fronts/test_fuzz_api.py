"""Fuzzing a real server: never a 500, always answering.

schemathesis drives every route of the live OpenAPI schema with generated requests (bounded
examples); the hand-written strategies below add what a schema cannot say: workflow-shaped
documents (node types, links, input names) and PNG-shaped uploads (chunk structure)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures._server_helpers import shared_server, wait_idle

schemathesis = pytest.importorskip("schemathesis")

NODE_TYPES = ["PrimitiveInt", "PrimitiveFloat", "PrimitiveString", "PrimitiveBoolean", "Seed", "MathInt", "Reroute",
              "Note", "PreviewAny", "SaveImage", "LoadImage", "Sampler", "EmptyLatent"]
INPUT_NAMES = ["value", "seed", "a", "b", "operation", "text", "images", "image", "model", "steps", "", "from", "__proto__"]
OUTPUT_NAMES = ["value", "seed", "image", "latent", "nope", ""]

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=8)
node_ids = st.sampled_from(["1", "2", "3", "4", "x", ""]) | st.text(max_size=4)
links = st.builds(lambda node, out: {"from": [node, out]}, node_ids, st.sampled_from(OUTPUT_NAMES)) | st.builds(
    lambda value: {"from": value}, json_values)
input_values = scalars | links | json_values
nodes_ = st.fixed_dictionaries(
    {"type": st.sampled_from(NODE_TYPES) | st.text(max_size=10)},
    optional={"inputs": st.dictionaries(st.sampled_from(INPUT_NAMES) | st.text(max_size=6), input_values, max_size=4)
              | json_values, "bypass": st.booleans() | json_values, "title": json_values},
)
workflows = st.fixed_dictionaries(
    {"format": st.just("ditgraph/workflow") | st.text(max_size=5), "version": st.just(1) | json_values,
     "nodes": st.dictionaries(node_ids, nodes_ | json_values, max_size=5) | json_values},
    optional={"layout": json_values, "meta": json_values},
)
bodies = st.fixed_dictionaries(
    {"workflow": workflows | json_values},
    optional={"client_id": st.text(max_size=10) | json_values,
              "targets": st.lists(node_ids | json_values, max_size=3) | json_values},
)


@pytest.fixture(scope="module")
def server():
    proc = shared_server()
    proc.shared_client = proc.client()
    yield proc
    proc.shared_client.close()
    wait_idle(proc)


def test_every_route_of_the_schema_never_500(server):
    """schemathesis cases for every /api operation of the live schema (bounded: CI stays under a minute)."""
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json").include(path_regex="^/api/")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    cases = st.one_of([operation.as_strategy() for operation in operations])

    @settings(max_examples=8 * len(operations), deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def never_500(case) -> None:
        response = case.call(base_url=server.base_url, timeout=30)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

    never_500()


def _encode(body) -> bytes:
    # NaN/Infinity are not JSON, but clients send them (Python's json does): the server must cope
    return json.dumps(body, allow_nan=True).encode()


@settings(max_examples=120, deadline=3000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.data_too_large])
@given(body=bodies, route=st.sampled_from(["/api/runs", "/api/validate", "/api/explain"]))
def test_post_never_500(server, body, route):
    response = server.shared_client.post(route, content=_encode(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (route, body, response.text[:500])
    answer = response.json()
    if route == "/api/runs" and response.status_code == 200:
        assert answer["run_id"]
    elif response.status_code == 400:
        assert answer["problems"]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
chunk = st.builds(lambda kind, body: len(body).to_bytes(4, "big") + kind + body + b"\0\0\0\0",
                  st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"IHDR", b"IDAT", b"IEND"]), st.binary(max_size=64))
png_like = st.builds(lambda chunks, tail: PNG_MAGIC + b"".join(chunks) + tail, st.lists(chunk, max_size=5),
                     st.binary(max_size=16))
uploads = png_like | st.binary(max_size=64) | st.builds(lambda b: b"\xff\xd8\xff" + b, st.binary(max_size=64))


@settings(max_examples=60, deadline=3000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=uploads, route=st.sampled_from(["/api/uploads", "/api/workflow-from-png"]), multipart=st.booleans())
def test_uploads_never_500(server, data, route, multipart):
    if multipart:
        response = server.shared_client.post(route, files={"image": ("x.png", data, "image/png")})
    else:
        response = server.shared_client.post(route, content=data, headers={"content-type": "application/octet-stream"})
    assert response.status_code < 500, (route, data[:80], response.text[:300])


def test_nasty_bodies(server):
    nasty = [b"", b"null", b"[]", b"{", b"\xff\xfe", b'{"workflow": ' + b"[" * 5000 + b"]" * 5000 + b"}",
             b'{"workflow": {"format": "ditgraph/workflow", "version": 1, "nodes": {"1": {"type": "PrimitiveInt", '
             b'"inputs": {"value": ' + b"9" * 5000 + b"}}}}}",
             b'{"workflow": {"format": "ditgraph/workflow", "version": 1e999, "nodes": {}}}']
    with server.client() as client:
        for body in nasty:
            for route in ("/api/runs", "/api/validate"):
                response = client.post(route, content=body, headers={"content-type": "application/json"})
                assert response.status_code < 500, (route, body[:80], response.text[:300])


def test_server_still_answers_after_fuzzing(server):
    with server.client() as client:
        status = client.get("/api/status")
        assert status.status_code == 200
        listing = client.get("/api/runs", params={"limit": 500})
        assert listing.status_code == 200
        for run in listing.json()["history"] + listing.json()["queue"]:
            detail = client.get(f"/api/runs/{run['run_id']}")
            assert detail.status_code == 200
            error = (detail.json().get("error") or {}).get("message", "")
            assert not error.startswith("internal error"), error
    assert server.process.poll() is None
    assert not math.isnan(0.0)
