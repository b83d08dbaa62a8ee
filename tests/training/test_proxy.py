"""The font-rendered proxy test set: reproducible, balanced, both polarities, MNIST-shaped.

Skipped (not failed) only when the fonts are not installed; the skip says how to install them.
With MNIST_EDGE_REQUIRE_PROXY=1 (set it in CI once .ci/fonts.txt is installed) missing fonts fail instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_edge.imaging.idx import read_idx
from mnist_edge.training import proxy

REPO = Path(__file__).resolve().parents[2]
N = 30  # per digit, for the shared set: 300 images, every font used at least 3 times


@pytest.fixture(scope="module")
def fonts() -> list[Path]:
    try:
        return proxy.find_fonts()
    except proxy.ProxyUnavailable as exc:
        if os.environ.get("MNIST_EDGE_REQUIRE_PROXY") == "1":  # CI sets this after installing the fonts
            pytest.fail(f"MNIST_EDGE_REQUIRE_PROXY=1 but {exc}")
        pytest.skip(f"proxy fonts not installed: {exc}")


@pytest.fixture(scope="module")
def built(fonts):
    return proxy.build_proxy_set(N, seed=7, workers=1)


def test_fonts_txt_lists_exactly_the_packages_the_table_uses():
    listed = [line.strip() for line in (REPO / ".ci" / "fonts.txt").read_text().splitlines() if line.strip()]
    assert sorted(listed) == list(proxy.PACKAGES)
    assert len(set(listed)) == len(listed)


def test_font_table_is_sorted_unique_and_split_by_family():
    paths = [s.path for s in proxy.FONTS]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    tune, holdout = proxy.font_specs("tune"), proxy.font_specs("holdout")
    assert len(tune) + len(holdout) == len(proxy.FONTS)
    assert not {s.package for s in tune} & {s.package for s in holdout}, "a family is in both splits"
    for split in (tune, holdout):
        styles = {s.style for s in split}
        assert {"hand", "script"} <= styles and styles & {"sans", "serif", "mono"}, styles
    with pytest.raises(ValueError):
        proxy.font_specs("test")


def test_missing_fonts_name_the_packages_and_the_install_line(tmp_path):
    with pytest.raises(proxy.ProxyUnavailable) as info:
        proxy.find_fonts(root=tmp_path)
    message = str(info.value)
    assert "apt-get install" in message and ".ci/fonts.txt" in message
    assert set(info.value.missing_packages) == set(proxy.PACKAGES)
    assert "fonts-dkg-handwriting" in message
    with pytest.raises(proxy.ProxyUnavailable):
        proxy.build_proxy_set(1, fonts=[tmp_path / "absent.ttf"])


def test_every_font_has_ten_distinct_digit_glyphs(fonts):
    # Guards against a package update that maps digits to boxes or to one shared glyph.
    for path in fonts:
        glyphs = [proxy._glyph(str(path), d) for d in range(10)]
        keys = {(g.shape, g.tobytes()) for g in glyphs}
        assert len(keys) == 10, f"{path}: digits do not render as ten different glyphs"


def test_shapes_dtypes_and_names(built, fonts):
    images, labels, names = built
    assert images.shape == (10 * N, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10 * N,) and labels.dtype == np.uint8
    assert len(names) == 10 * N
    known = {proxy.font_name(p) for p in fonts}
    assert set(names) <= known
    assert len(set(names)) > len(known) // 2, "fonts should be spread across the set"


def test_labels_are_balanced_and_index_major(built):
    _, labels, _ = built
    assert np.bincount(labels, minlength=10).tolist() == [N] * 10
    assert labels[:20].tolist() == list(range(10)) * 2


def test_fonts_are_used_in_whole_passes():
    for n_fonts, n in ((80, 170), (21, 300), (5, 5), (7, 3)):
        for digit in (0, 9):
            order = proxy._font_order(n_fonts, n, seed=1, digit=digit)
            counts = np.bincount(order, minlength=n_fonts)
            assert len(order) == n and counts.max() - counts.min() <= 1
    assert not np.array_equal(proxy._font_order(80, 80, 1, 0), proxy._font_order(80, 80, 1, 1))


def test_same_seed_same_bytes_other_seed_other_bytes(fonts):
    a = proxy.build_proxy_set(4, seed=11, workers=1)
    b = proxy.build_proxy_set(4, seed=11, workers=1)
    c = proxy.build_proxy_set(4, seed=12, workers=1)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes() and a[2] == b[2]
    assert a[0].tobytes() != c[0].tobytes()


def test_result_does_not_depend_on_worker_count(fonts):
    one = proxy.build_proxy_set(20, seed=5, subset="holdout", workers=1)
    two = proxy.build_proxy_set(20, seed=5, subset="holdout", workers=2)
    assert one[0].tobytes() == two[0].tobytes() and one[2] == two[2]


def test_prefix_is_stable_when_more_images_are_asked_for(fonts):
    small = proxy.build_proxy_set(3, seed=2, workers=1)
    large = proxy.build_proxy_set(6, seed=2, workers=1)
    assert small[0].tobytes() == large[0][:30].tobytes() and small[2] == large[2][:30]


def test_subsets_use_only_their_fonts(fonts):
    for subset in ("tune", "holdout"):
        allowed = {s.path for s in proxy.font_specs(subset)}
        _, _, names = proxy.build_proxy_set(2, seed=0, subset=subset, workers=1)
        assert set(names) <= allowed
    with pytest.raises(ValueError):
        proxy.build_proxy_set(1, fonts=fonts[:1], subset="tune")


def test_explicit_font_list(fonts):
    images, labels, names = proxy.build_proxy_set(3, seed=0, fonts=[fonts[0]], workers=1)
    assert images.shape == (30, 28, 28) and set(names) == {proxy.font_name(fonts[0])}


def test_raw_renders_have_both_polarities_and_canvas_sizes(fonts):
    raw, labels, _ = proxy.build_proxy_set(10, seed=3, raw=True, workers=1)
    dark_background = 0
    for gray in raw:
        assert gray.dtype == np.float32 and gray.ndim == 2
        assert 64 <= gray.shape[0] == gray.shape[1] <= 128
        assert 0.0 <= gray.min() and gray.max() <= 255.0
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        dark_background += bool(np.median(border) < 127.5)
    # 100 fair coin flips: both kinds present, neither rare.
    assert 25 <= dark_background <= 75, dark_background


def test_render_digit_is_a_function_of_the_rng_state(fonts):
    a = proxy.render_digit(4, fonts[0], np.random.default_rng(9))
    b = proxy.render_digit(4, fonts[0], np.random.default_rng(9))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError):
        proxy.render_digit(10, fonts[0], np.random.default_rng(0))


def test_every_image_is_a_visible_centred_mnist_style_digit(built):
    images, _, names = built
    for k, img in enumerate(images):
        ink = img > 0.2 * 255
        assert img.max() >= 128 and ink.sum() >= 15, f"image {k} ({names[k]}) is nearly blank"
        rows, cols = np.flatnonzero(img.any(axis=1)), np.flatnonzero(img.any(axis=0))
        side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
        assert 17 <= side <= 22, f"image {k} ({names[k]}) fills {side}px, expected the ~20px MNIST box"
        ys, xs = np.indices(img.shape)
        w = img.astype(np.float64)
        cy, cx = (ys * w).sum() / w.sum(), (xs * w).sum() / w.sum()
        assert abs(cy - 13.5) <= 1.5 and abs(cx - 13.5) <= 1.5, f"image {k} ({names[k]}) is off centre"
        # MNIST convention: dark background, light ink; the corners are background.
        assert img[0, 0] == 0 and img[-1, -1] == 0


def test_stroke_statistics_are_in_mnist_range(built):
    images, _, _ = built
    # MNIST's test set: ~12% of pixels above 128, mean ~33; the proxy should be near that.
    frac = float((images > 128).mean())
    assert 0.07 <= frac <= 0.18, frac


def test_cli_writes_idx_files_and_contact_sheets(fonts, tmp_path):
    out = tmp_path / "proxy"
    assert proxy.main(["--out", str(out), "--n-per-digit", "3", "--seed", "4", "--sheet-columns", "3"]) == 0
    images = read_idx(out / "proxy-all-images-idx3-ubyte")
    labels = read_idx(out / "proxy-all-labels-idx1-ubyte")
    expected = proxy.build_proxy_set(3, seed=4, workers=1)
    assert np.array_equal(images, expected[0]) and np.array_equal(labels, expected[1])
    assert (out / "proxy-all-fonts.txt").read_text().split("\n")[:-1] == expected[2]
    with Image.open(out / "proxy-all-contact.png") as sheet:
        assert sheet.size[0] > 3 * 28 and sheet.size[1] >= 10 * 28
    assert (out / "proxy-all-raw.png").stat().st_size > 0
    assert (out / "proxy-all.json").stat().st_mode & 0o044, "output files should be readable by others"


def test_module_does_not_import_torch():
    code = "import sys, training.proxy; assert 'torch' not in sys.modules, 'training.proxy imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
