"""tools/web_demo.py in a real browser: headless Chromium uploads a scene, types a vocabulary, reads the result.

Needs chromium and chromedriver (Debian: ``apt-get install chromium chromium-driver``, which
``.ci/run`` does) and the ``web`` extra (gradio, selenium). Without them the browser test is
skipped, unless ``DIFFSEG_D2_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes that a failure.
The page's screenshot is written to ``$DIFFSEG_D2_SCREENSHOT`` when set (docs/web_demo.png is
one, shown in the README).
"""
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import web_demo  # noqa: E402

pytestmark = pytest.mark.slow


def _needs(what: str, missing: bool):
    if missing:
        if os.environ.get("DIFFSEG_D2_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test needs {what}")
        pytest.skip(f"needs {what}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_segment_answers_bad_requests_with_a_message(tmp_path):
    segmenters = web_demo.Segmenters()
    config = str(ROOT / "configs" / "micro" / "diffsegmenter.yaml")
    scene = tmp_path / "scene.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(scene)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cases = [
        (None, "circle", "Upload an image"),
        (str(scene), " , ", "The vocabulary cannot be used"),
        (str(broken), "circle", "cannot be read as an image"),
    ]
    for image, vocab, message in cases:
        overlay, text, label = web_demo.segment(segmenters, config, image, vocab, tmp_path / "labels")
        assert overlay is None and label is None and message in text
    missing = web_demo.Segmenters(["MODEL.DIFFSEG.SD.WEIGHTS", str(tmp_path / "nowhere")])
    overlay, text, label = web_demo.segment(missing, config, str(scene), "circle", tmp_path / "labels")
    assert overlay is None and "nowhere" in text


def test_the_page_segments_an_uploaded_scene_in_a_browser(tmp_path):
    _needs("gradio and selenium (pip install -e '.[web]')",
           any(importlib.util.find_spec(m) is None for m in ("gradio", "selenium")))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    _needs("chromium and chromedriver (apt-get install chromium chromium-driver)", not (chromium and driver_path))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffseg_d2.microworld.scenes import render_scene

    scene = render_scene(1_000_000)
    upload = tmp_path / "scene.png"
    Image.fromarray(scene.image.repeat(4, 0).repeat(4, 1)).save(upload)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "web_demo.py"), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = None
    try:
        deadline = time.time() + 180
        while True:  # the server is up when its port answers
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.time() < deadline, "the web app did not start in 3 minutes"
                time.sleep(1)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        driver.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(driver, 300)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image-file input[type=file]")))
        driver.find_element(By.CSS_SELECTOR, "#image-file input[type=file]").send_keys(str(upload))
        # The picture is shown as soon as it is chosen, before anything is segmented.
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
        assert not driver.find_elements(By.CSS_SELECTOR, "#overlay img")
        box = driver.find_element(By.CSS_SELECTOR, "#vocab textarea, #vocab input")
        box.clear()
        box.send_keys("circle, square, triangle, cross")
        time.sleep(2)  # the upload finishes before the click
        driver.find_element(By.CSS_SELECTOR, "#segment").click()
        wait.until(lambda d: "share of the pixels" in d.find_element(By.CSS_SELECTOR, "#result").text)
        text = driver.find_element(By.CSS_SELECTOR, "#result").text
        assert "background" in text and "0 = background, 1 = circle" in text
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay img"))
        shot = os.environ.get("DIFFSEG_D2_SCREENSHOT")
        if shot:
            Path(shot).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(shot)
        # An empty vocabulary: a message in the page, not an error page.
        box.clear()
        box.send_keys(" , ")
        driver.find_element(By.CSS_SELECTOR, "#segment").click()
        wait.until(lambda d: "cannot be used" in d.find_element(By.CSS_SELECTOR, "#result").text)
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
