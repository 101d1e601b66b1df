"""The core readers of untrusted input: images (pixel and text caps), JSON (size, depth), file names."""

from __future__ import annotations

import pytest

from app.core import paths
from app.core.images import ImageRefused, open_image, png_text_chunks, verify_image
from app.core.jsonlimits import JSONRefused, parse
from tests.fixtures.hostile import png, png_chunk


def test_open_image_refuses_a_pixel_bomb_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png(16000, 11000))  # 1 KB on disk, 176 M pixels declared
    with pytest.raises(ImageRefused) as caught:
        open_image(bomb)
    assert caught.value.too_large and "16000x11000" in str(caught.value)
    small = tmp_path / "small.png"
    small.write_bytes(png(4, 3))
    assert open_image(small).size == (4, 3)


def test_the_pixel_limit_is_40_million():
    with pytest.raises(ImageRefused) as over:
        verify_image(png(8000, 5001))
    assert over.value.too_large
    try:
        verify_image(png(8000, 5000))  # at the limit: not refused for its size
    except ImageRefused as exc:
        assert not exc.too_large, exc


def test_png_text_total_is_capped():
    import zlib

    chunk = zlib.compress(b"a" * 1000)
    data = png(chunks=tuple(png_chunk(b"zTXt", f"k{i}".encode() + b"\0\0" + chunk) for i in range(3)))
    assert set(png_text_chunks(data, max_text=3000)) == {"k0", "k1", "k2"}
    with pytest.raises(ImageRefused):
        png_text_chunks(data, max_text=2500)


def test_parse_caps_depth_and_size():
    assert parse('{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    for depth in (65, 700, 5000):
        with pytest.raises(JSONRefused, match="nested deeper"):
            parse("[" * depth + "]" * depth)
    with pytest.raises(JSONRefused) as caught:
        parse(b"[" + b"1," * 100 + b"1]", max_bytes=50)
    assert caught.value.too_large


@pytest.mark.parametrize("name", ["", " ", ".", "./", "a/..", "x" * 256, "\u00e9" * 128, "a\x00b", "/etc/passwd",
                                  "../x", "a/" * 2100 + "b"])
def test_confine_refuses_every_hostile_name_with_path_refused(tmp_path, name):
    with pytest.raises(paths.PathRefused):
        paths.confine(tmp_path, name)


def test_confine_accepts_names_inside(tmp_path):
    assert paths.confine(tmp_path, "a/b.png") == tmp_path.resolve() / "a" / "b.png"
    assert paths.confine(tmp_path, "x" * 255) == tmp_path.resolve() / ("x" * 255)
