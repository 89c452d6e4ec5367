"""End to end in a real browser: `srcsm web` driven by Playwright in Debian's Chromium.

A person's path through the page, on a real MR case (CHAOS T2, ../shared/data) and the bundled
CT-trained model: pick the volume, preview source matching, segment (progress, page responsive),
paint a correction with a real mouse drag on the axial view, save — then the saved files are checked:
segment names, geometry equal to the input's (world coordinates), the painted voxels present, and
that saving under a taken name asks before replacing anything.

Chromium is Debian's (/usr/bin/chromium; ./Testing/run-tests installs it when it may); Playwright
never downloads a browser. The network is closed, so Chromium runs with everything that phones home
switched off and a fresh profile. Screenshots land in the test's folder; with SRCSM_WEB_FIGURES=1 they
are also written to docs/figures/web_*.png (the README's pictures).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures"
VIEWS_READY = "[...document.querySelectorAll('img')].filter(i => i.naturalWidth > 0).length >= 3"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="Debian's Chromium (/usr/bin/chromium) is not installed and could not be: run ./Testing/run-tests as "
           "root (it installs it), or apt-get install chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def web_server(mr_data_dir, tmp_path):
    """`srcsm web` on a free loopback port, serving the data folder; stopped by its process id."""
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    env = dict(os.environ, VTK_DEFAULT_OPENGL_WINDOW="vtkEGLRenderWindow")
    proc = subprocess.Popen([sys.executable, "-m", "SRCSMSegmenterLib.cli", "web", "--data", str(mr_data_dir),
                             "--port", str(port), "--max-upload-mb", "3"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"srcsm web did not start: {(tmp_path / 'server.log').read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and any segmentation it started
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get("SRCSM_WEB_FIGURES") == "1":
        FIGURES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, FIGURES / f"{name}.png")


def _text(page, selector: str) -> str:
    return page.locator(selector).inner_text() if page.locator(selector).count() else ""


def test_browser_preview_segment_paint_save(web_server, mr_data_dir, mr_relative, tmp_path):
    from playwright.sync_api import sync_playwright
    from SRCSMSegmenterLib.catalog import Catalog
    from SRCSMSegmenterLib.image import read_volume
    from SRCSMSegmenterLib.segio import read_seg_nrrd

    source = read_volume(mr_data_dir / mr_relative)
    labels = Catalog().resolve("abdomen-ct-srcsm").card.labels
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1600, "height": 1000})
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(web_server)
            page.wait_for_function(VIEWS_READY, timeout=60_000)

            # 1. Pick the volume from the data folder list.
            page.locator("#srcsm-files").get_by_text(mr_relative).click()
            page.wait_for_function("document.querySelector('#srcsm-info')?.innerText.includes('Loaded')",
                                   timeout=60_000)

            # 2. The model card of the chosen model is on the page.
            page.get_by_text("Model card").click()
            page.wait_for_selector("#srcsm-model-card >> text=liver", timeout=10_000)
            page.get_by_text("Model card").click()  # fold it again, to see the charts

            # 3. Preview source matching: three charts, drawn from the module's plot tables.
            page.click("#srcsm-preview")
            page.wait_for_function("document.querySelectorAll('#srcsm-charts svg').length === 3", timeout=60_000)
            assert page.locator("#srcsm-charts polyline.srcsm-series").count() == 4
            page.locator("#srcsm-charts").scroll_into_view_if_needed()
            time.sleep(2)  # let the matched view's new frame arrive
            _shot(page, tmp_path, "web_preview")

            # 4. Segment: the button turns into Cancel, progress arrives, the page keeps answering.
            page.click("#srcsm-segment")
            page.wait_for_selector("#srcsm-cancel", timeout=20_000)
            messages, answered = set(), False
            deadline = time.monotonic() + 240
            while "Segmented" not in _text(page, "#srcsm-info"):
                assert time.monotonic() < deadline, f"no result: {_text(page, '#srcsm-error')}"
                assert not _text(page, "#srcsm-error"), _text(page, "#srcsm-error")
                messages.add(_text(page, "#srcsm-job-message"))
                if not answered and page.locator("#srcsm-cancel").count():
                    page.locator("button[title='Refresh the list']").click()  # a server round trip mid-job
                    answered = page.locator("#srcsm-files").get_by_text(mr_relative).count() == 1
                time.sleep(0.3)
            assert answered and len(messages - {""}) >= 1, messages
            time.sleep(2)
            _shot(page, tmp_path, "web_segmented")

            # 5. Save the result as it came, then paint a correction with a real mouse drag.
            page.click("#srcsm-save")
            page.wait_for_function("document.querySelector('#srcsm-saved')?.innerText.includes('srcsm.seg.nrrd')",
                                   timeout=30_000)
            page.locator("button:has(i.mdi-brush)").first.click()  # Paint
            time.sleep(1)
            boxes = page.eval_on_selector_all(
                "img", "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })")
            x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])  # the axial view of the input, the largest
            page.mouse.move(x + 0.3 * w, y + 0.5 * h)
            page.mouse.down()
            page.mouse.move(x + 0.7 * w, y + 0.5 * h, steps=25)
            page.mouse.up()
            time.sleep(2)
            _shot(page, tmp_path, "web_painted")
            assert page.locator("#srcsm-save-name").input_value() == "chaos_01_0000_srcsm-2"
            page.click("#srcsm-save")
            page.wait_for_function("document.querySelector('#srcsm-saved')?.innerText.includes('srcsm-2.seg.nrrd')",
                                   timeout=30_000)

            # 6. A taken name: the page asks, and "Keep them" changes nothing.
            first = mr_data_dir / "chaos_01_0000_srcsm.seg.nrrd"
            content = first.read_bytes()
            page.locator("#srcsm-save-name").fill("chaos_01_0000_srcsm")
            page.click("#srcsm-save")
            page.wait_for_selector("#srcsm-overwrite-dialog", timeout=10_000)
            page.click("#srcsm-overwrite-no")
            page.wait_for_selector("#srcsm-overwrite-dialog", state="detached", timeout=10_000)
            assert first.read_bytes() == content

            # 7. Upload: a file over the limit (3 MiB here) is refused in the page; the case is stored
            #    under uploads/ and loaded.
            big = tmp_path / "big.nii.gz"
            big.write_bytes(b"\0" * (4 * 2**20))
            page.locator("#srcsm-upload").set_input_files(str(big))
            page.wait_for_function("document.querySelector('#srcsm-error')?.innerText.includes('upload limit')",
                                   timeout=20_000)
            page.locator("#srcsm-upload").set_input_files(str(mr_data_dir / mr_relative))
            page.wait_for_function("document.querySelector('#srcsm-files')?.innerText.includes('uploads/')",
                                   timeout=60_000)
            page.wait_for_function("document.querySelector('#srcsm-info')?.innerText.includes('Loaded')",
                                   timeout=60_000)
            assert not errors, errors
        finally:
            browser.close()

    before, _ = read_seg_nrrd(first)
    after, segments = read_seg_nrrd(mr_data_dir / "chaos_01_0000_srcsm-2.seg.nrrd")
    assert [s["name"] for s in segments] == labels.names()
    for volume in (before, after, read_volume(mr_data_dir / "chaos_01_0000_srcsm-2_labels.nii.gz")):
        assert volume.geometry.almost_equal(source.geometry) and volume.shape == source.shape
    assert (before.array == 1).sum() > 10_000  # the model did segment a liver
    # The stroke: liver voxels that were not liver, on the axial plane shown, across the body.
    new = (after.array == 1) & (before.array != 1)
    assert new.sum() > 50, "the painted voxels are missing from the saved file"
    kji = np.argwhere(new)
    world = after.geometry.index_to_physical(kji[:, ::-1].astype(float))  # LPS mm
    corners = source.geometry.corners(source.shape)
    middle_s = 0.5 * (corners[:, 2].min() + corners[:, 2].max())  # the view opens on the middle slice
    assert np.abs(world[:, 2] - middle_s).min() <= source.geometry.spacing[2]
    assert np.ptp(world[:, 0]) > 60  # a stroke across 40 % of the view, several centimetres wide
    changed = after.array != before.array
    assert np.all(after.array[changed] == 1)  # painting liver only ever adds liver
    assert not [p.name for p in mr_data_dir.iterdir() if p.name.startswith(".")]  # no partial files
    uploaded = mr_data_dir / "uploads" / Path(mr_relative).name
    assert uploaded.read_bytes() == (mr_data_dir / mr_relative).read_bytes()
    assert [p.name for p in (mr_data_dir / "uploads").iterdir()] == [uploaded.name]  # nothing of big.nii.gz
