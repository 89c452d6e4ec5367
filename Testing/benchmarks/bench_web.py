"""Benchmark: how fast the `srcsm web` page shows its first view (target: within 5 s of the page load).

Run on demand (not part of the test suite; needs the `web` extra, Playwright and Debian's Chromium)::

    python Testing/benchmarks/bench_web.py                 # 5 page loads
    python Testing/benchmarks/bench_web.py --repeats 10

What it measures, with `srcsm web` serving a data folder that holds one real MR case (CHAOS
``chaos_01``, 256×256×36, from ../shared/data, copied to a temporary folder):

* **server ready**: from starting ``srcsm web`` to its first HTTP answer (imports of slicer-core,
  VTK, trame; the scene and the three views), once;
* **first view**: from ``page.goto`` to three slice views showing a rendered frame (the streamed
  ``<img>`` of each has a decoded image) — a fresh Chromium profile each time, so nothing is cached;
* **volume shown**: from clicking the case in the data folder list to the page reporting it loaded
  (the file read with SimpleITK, put into the scene, the views reset).

Chromium runs headless with software rendering (``--disable-gpu``); the views are rendered by VTK on
the server (EGL, Mesa llvmpipe). It prints a Markdown table headed by machine, load and date, and
exits 1 when the median first view is over 5 s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASE = REPO.parent / "shared" / "data" / "Dataset502_AbdomenMRT2" / "imagesTr" / "chaos_01_0000.nii.gz"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWS_READY = "[...document.querySelectorAll('img')].filter(i => i.naturalWidth > 0).length >= 3"
TARGET_S = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="srcsm-bench-web-"))
    (work / "data" / "imagesTr").mkdir(parents=True)
    shutil.copyfile(CASE, work / "data" / "imagesTr" / CASE.name)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "SRCSMSegmenterLib.cli", "web", "--data", str(work / "data"),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env=dict(os.environ, SRCSM_HOME=str(work / "home")))
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("srcsm web exited before serving")
                time.sleep(0.1)
        server_ready = time.perf_counter() - t0
        first_view, volume_shown = [], []
        with sync_playwright() as pw:
            for i in range(args.repeats):
                ctx = pw.chromium.launch_persistent_context(str(work / f"profile-{i}"), executable_path=CHROMIUM,
                                                            args=CHROMIUM_ARGS, headless=True,
                                                            viewport={"width": 1600, "height": 1000})
                page = ctx.new_page()
                t = time.perf_counter()
                page.goto(url)
                page.wait_for_function(VIEWS_READY, timeout=60_000, polling=20)
                first_view.append(time.perf_counter() - t)
                t = time.perf_counter()
                page.locator("#srcsm-files").get_by_text("imagesTr/chaos_01_0000.nii.gz").click()
                page.wait_for_function("document.querySelector('#srcsm-info')?.innerText.includes('Loaded')",
                                       timeout=60_000, polling=20)
                volume_shown.append(time.perf_counter() - t)
                ctx.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()
    print(f"Machine: {_cpu()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; {datetime.date.today().isoformat()}")
    print(f"Chromium {subprocess.run([CHROMIUM, '--version'], capture_output=True, text=True, encoding="utf-8", errors="replace").stdout.strip()}, "
          f"headless, software rendering; views rendered by VTK on the server (EGL, Mesa llvmpipe)\n")
    print("| step | median | min | max | runs |\n|---|---|---|---|---|")
    print(f"| server ready (start → first HTTP answer) | {server_ready:.2f} s | | | 1 |")
    for name, values in (("first view (page load → 3 views drawn)", first_view),
                         ("volume shown (click in list → loaded)", volume_shown)):
        print(f"| {name} | {statistics.median(values):.2f} s | {min(values):.2f} s | {max(values):.2f} s | "
              f"{len(values)} |")
    ok = statistics.median(first_view) <= TARGET_S
    print(f"\nTarget: first view within {TARGET_S:.0f} s of the page load — {'met' if ok else 'NOT met'}.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
