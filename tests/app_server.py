"""`nps serve` as a person starts it, in a subprocess on a loopback port, and a headless Chromium to drive it:
shared by the app's tests on the steering run (tests/test_serve.py) and on an hh-dpo run (tests/test_hh_dpo_run.py)."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

from steering_fixture import CANDIDATES, ROOT

ADMIN_TOKEN = "tests-admin-token-123"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


# `nps serve` as a person starts it, but a write past a file-size limit (RLIMIT_FSIZE, the tests' full disk)
# fails with EFBIG instead of killing the process with SIGXFSZ.
SERVE = "import signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\nfrom nps.cli import entry\nentry()\n"


class Server:
    """`nps serve` in a subprocess on a loopback port (the same port after a restart)."""

    def __init__(self, run: Path, store: Path, log: Path, candidates: Path = CANDIDATES):
        self.run, self.store, self.log, self.candidates = run, store, log, candidates
        self.port = 0
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> Server:
        command = [sys.executable, "-c", SERVE, "serve", "--run", str(self.run), "--candidates", str(self.candidates),
                   "--store", str(self.store), "--port", str(self.port), "--particles", "32",
                   "--admin-token", ADMIN_TOKEN]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        deadline = time.monotonic() + timeout
        line = self.process.stdout.readline()  # the address, printed once the socket is bound
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, f"nps serve did not start: {line!r}; see {self.log}"
        self.port = int(match.group(1))
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"nps serve did not answer on port {self.port}; see {self.log}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def request(self, method: str, path: str, form: dict | None = None, cookie: str | None = None,
                body: bytes | None = None, headers: dict | None = None, connection=None):
        """(status, headers, text) of one request; a form is sent URL-encoded."""
        conn = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = dict(headers or {})
        if form is not None:
            body = urlencode(form).encode()
            sent.setdefault("content-type", "application/x-www-form-urlencoded")
        if cookie:
            sent["cookie"] = cookie
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
        if connection is None:
            conn.close()
        received = {k.lower(): v for k, v in response.getheaders()}
        cookies = [v for k, v in response.getheaders() if k.lower() == "set-cookie"]
        return response.status, received | ({"set-cookie": "\n".join(cookies)} if cookies else {}), text

    def join(self, name: str, group: str = "default") -> str:
        """A new person; returns their cookie."""
        status, headers, _ = self.request("POST", "/start", {"name": name, "group": group})
        assert status == 303, (status, name)
        return headers["set-cookie"].split(";")[0]

    def admin(self) -> str:
        """An admin's session cookie, from signing in with the token."""
        status, headers, _ = self.request("POST", "/admin/login", {"token": ADMIN_TOKEN})
        assert status == 303, status
        return headers["set-cookie"].split(";")[0]

    def personal_link(self, cookie: str) -> str:
        """The path of the signed-in person's personal link, as the start page shows it."""
        return re.search(r"http://[^/]+(/p/[^<\s]+)", self.request("GET", "/?new=1", cookie=cookie)[2]).group(1)


def headless_chromium(profile_dir: Path):
    """A Selenium-driven headless Chromium (Debian's packages) with its own profile folder."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile_dir}", "--window-size=1200,860",
                 "--force-device-scale-factor=1"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(120)
    browser.implicitly_wait(60)  # a click that submits a form returns before the next page is there
    return browser
