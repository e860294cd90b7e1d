"""A screenshot of TensorBoard showing a run's curves, for the docs.

    python docs/tensorboard_screenshot.py runs/synthetic/logs [--out docs/tensorboard.png] [--filter REGEX]

Serves the log folder with TensorBoard on 127.0.0.1 (a free port), opens its scalars dashboard in
headless Chromium (Debian's ``chromium`` and ``chromium-driver`` packages, driven by Selenium; no
browser is downloaded), waits until every chart has drawn, saves the PNG and stops both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_runs(url: str, seconds: float = 120) -> list[str]:
    """TensorBoard's list of runs once it has read the log folder (it loads in the background)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as response:
                runs = sorted(json.load(response))
            if runs:
                return runs
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"TensorBoard at {url} listed no runs with scalars within {seconds:.0f} s")


TAG_FILTER = "^(train|val|perf)/"


def screenshot(logdir: Path, out: Path, tag_filter: str = TAG_FILTER, size: tuple[int, int] = (1600, 1300)) -> Path:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                               "127.0.0.1", "--port", str(port), "--reload_interval", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    profile = tempfile.mkdtemp(prefix="nps-chromium-")
    browser = None
    try:
        runs = wait_for_runs(url)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"]:
            options.add_argument(flag)
        browser = webdriver.Chrome(options=options,
                                   service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
        browser.set_window_size(*size)
        browser.get(f"{url}/#timeseries")
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "scalar-card"))
        browser.find_element(By.CSS_SELECTOR, "metrics-tag-filter input").send_keys(tag_filter, Keys.ENTER, Keys.ESCAPE)
        for button in browser.find_elements(By.CSS_SELECTOR, "button"):
            if (button.get_attribute("aria-label") or "") == "Close side pane":
                button.click()  # the settings pane, open by default, hides a column of charts
                break
        # With a tag filter, TensorBoard shows every matching card in one grid, no groups to expand.
        # Every visible card has drawn its lines (an SVG path or a canvas) once no spinner is left.
        WebDriverWait(browser, 60).until(lambda b: not b.find_elements(By.CSS_SELECTOR, "mat-spinner"))
        time.sleep(3)
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(out))
        print(f"{out}: TensorBoard at {url} with runs {runs}")
        return out
    finally:
        if browser is not None:
            browser.quit()
        os.killpg(server.pid, signal.SIGTERM)  # the server and its data-server child, which it started
        server.wait()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("logdir", type=Path, help="a run's logs folder, e.g. runs/synthetic/logs")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tensorboard.png"))
    parser.add_argument("--filter", default=TAG_FILTER, help="TensorBoard's tag filter (a regular expression)")
    args = parser.parse_args()
    screenshot(args.logdir, args.out, args.filter)


if __name__ == "__main__":
    main()
