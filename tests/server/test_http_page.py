"""The page at / in a real headless Chromium (Debian's chromium and chromium-driver, driven
by selenium): digits drawn with pointer events, PNG files uploaded, the answer read from
the page's data-testid hooks and compared with the native gRPC API; no console errors or
failing requests; the pad fully visible in a 1000x1000 window. A screenshot is kept in the
test's output directory (its path is printed and recorded as a test property)."""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile

import grpc
import numpy as np
import pytest

from helpers.servers import running_server
from mnist_edge.protos.digits.v1 import digits_pb2, digits_pb2_grpc

pytestmark = pytest.mark.timeout(300)

CHROMIUM = os.environ.get("MNIST_EDGE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MNIST_EDGE_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
SETUP = "apt-get install -y chromium chromium-driver && .venv/bin/pip install selenium"


def _needs(what: str) -> None:
    message = f"{what} not found: run {SETUP}"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _needs("selenium")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        _needs("chromium / chromedriver")
    profile = tempfile.mkdtemp(prefix="mnist-edge-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_window_size(1000, 1000)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def app():
    with running_server(http_address="127.0.0.1:0") as a:
        yield a


def _by(driver, testid: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def _answer(driver, timeout: float = 30) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: _by(d, "digit").text.strip())


def _stroke(driver, pad, points: list[tuple[float, float]], kind: str = "mouse") -> None:
    """One stroke through `points` (pad fractions, 0..1) with W3C pointer actions."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    size = pad.rect["width"]
    builder = ActionBuilder(driver, mouse=PointerInput(getattr(interaction, f"POINTER_{kind.upper()}"), kind), duration=10)
    pointer = builder.pointer_action

    def to(x: float, y: float) -> None:  # offsets from the pad's centre
        pointer.move_to(pad, int((x - 0.5) * size), int((y - 0.5) * size))

    to(*points[0])
    pointer.pointer_down()
    for p in points[1:]:
        to(*p)
    pointer.pointer_up()
    builder.perform()


def _polyline(*corners: tuple[float, float], steps: int = 8) -> list[tuple[float, float]]:
    out = [corners[0]]
    for (x0, y0), (x1, y1) in zip(corners, corners[1:]):
        out += [(x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps) for k in range(1, steps + 1)]
    return out


DRAWINGS = {
    "1": _polyline((0.5, 0.15), (0.5, 0.85)),
    "7": _polyline((0.28, 0.2), (0.72, 0.2), (0.42, 0.85)),
    "0": [(0.5 + 0.22 * math.sin(2 * math.pi * k / 36), 0.5 - 0.33 * math.cos(2 * math.pi * k / 36)) for k in range(38)],
}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(255 - image).resize((112, 112), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_draws_uploads_and_answers(browser, app, mnist, tmp_path, record_property):
    browser.get(f"http://{app.http_address}/")
    pad = _by(browser, "pad")
    # the pad is fully visible in a 1000x1000 window, without scrolling
    box = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom, innerWidth, innerHeight, scrollY];", pad)
    left, top, right, bottom, width, height, scrolled = box
    assert left >= 0 and top >= 0 and right <= width and bottom <= height and scrolled == 0, box
    assert browser.execute_script("return getComputedStyle(arguments[0]).touchAction", pad) == "none"
    assert _by(browser, "digit").text == ""

    for kind, (digit, points) in zip(("mouse", "pen", "mouse"), DRAWINGS.items()):
        _by(browser, "clear").click()
        assert _by(browser, "digit").text == ""
        _stroke(browser, pad, points, kind)
        answer = _answer(browser)
        assert answer.startswith(digit), f"drew a {digit} with a {kind}, the page says {answer!r}"
        assert _by(browser, "rtt").text.endswith("ms")
        browser.save_screenshot(str(tmp_path / f"drawn-{digit}.png"))

    files = []
    for i in range(3):
        path = tmp_path / f"upload-{i}.png"
        path.write_bytes(_png(mnist.test.images[i]))
        files.append(path)
    with grpc.insecure_channel(app.address) as ch:
        native = digits_pb2_grpc.DigitClassifierStub(ch).Classify(
            digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=p.read_bytes()) for p in files]), timeout=30)
    for path, expected in zip(files, native.predictions):
        _by(browser, "clear").click()
        _by(browser, "file").send_keys(str(path))
        assert _answer(browser).startswith(str(expected.digit))
    screenshot = tmp_path / "page.png"
    browser.save_screenshot(str(screenshot))
    record_property("screenshot", str(screenshot))
    print(f"screenshot: {screenshot}")
    # nothing logged as an error, no request failed (Chromium logs a failed fetch as SEVERE)
    assert _severe(browser) == []
    # Clear empties the pad and the answer; a blank pad is never sent
    _by(browser, "clear").click()
    assert _by(browser, "digit").text == ""
    blank = browser.execute_script(
        "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "for (let i = 0; i < d.length; i += 4) if (d[i] !== 255) return false; return true;", pad)
    assert blank


def test_page_asks_for_the_token_when_the_server_requires_one(browser, tmp_path, mnist):
    token = tmp_path / "token"
    token.write_text("page-token-0123456789abcdef\n")
    with running_server(http_address="127.0.0.1:0", token_file=str(token)) as app:
        browser.get(f"http://{app.http_address}/")
        field = _by(browser, "token")
        assert field.is_displayed()
        field.send_keys("page-token-0123456789abcdef")
        pad = _by(browser, "pad")
        _stroke(browser, pad, DRAWINGS["1"])
        assert _answer(browser).startswith("1")
        assert _severe(browser) == []
