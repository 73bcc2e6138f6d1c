"""Headless Debian Chromium through Selenium, for the tests of the web page the API serves.

* ``start_browser()``: Chromium with the system chromedriver, both named by path so that
  Selenium Manager never runs (it would try to download a driver or a browser); skips the
  test with the reason when either binary is absent (under ``CI``, or with
  ``ZHUGE_REQUIRE_BROWSER=1``, that is a failure instead: CI installs them).
* ``wait_ready(driver, view)``: waits for ``#view[data-view=view][data-ready="1"]``; a timeout
  or ``data-ready="error"`` fails with the text of ``#error`` and the browser console.
* ``console_errors(driver)``: SEVERE console entries since the last call.
* ``screenshot(driver, name)``: a full-page PNG under ``$ZHUGE_SCREENSHOT_DIR``
  (default ``artifacts/screenshots`` in the repo, git-ignored).
* ``same_origin_only(driver, base_url)``: the resources the page loaded from another origin.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER_PATHS = ("/usr/bin/chromedriver",)
WINDOW = (1400, 1000)
MAX_SHOT_HEIGHT = 6000  # px: a very long page is cut there rather than making a huge PNG

# Stops Chromium from calling home (updates, sync, field trials): the page must need no network.
QUIET_FLAGS = (
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-extensions", "--disable-features=Translate,MediaRouter,OptimizationHints",
)  # fmt: skip


def _first_executable(env_var: str, candidates: tuple[str, ...], name: str) -> str | None:
    explicit = os.environ.get(env_var)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def browser_paths() -> tuple[str | None, str | None]:
    """(chromium, chromedriver): from $ZHUGE_CHROMIUM / $ZHUGE_CHROMEDRIVER or the Debian paths."""
    return (
        _first_executable("ZHUGE_CHROMIUM", CHROMIUM_PATHS, "chromium"),
        _first_executable("ZHUGE_CHROMEDRIVER", CHROMEDRIVER_PATHS, "chromedriver"),
    )


def missing_browser() -> str | None:
    """Why no browser test can run here, or None when Selenium, Chromium and chromedriver are there."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    chromium, driver = browser_paths()
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get install -y chromium chromium-driver)"
    return None


def skip_without_browser() -> None:
    reason = missing_browser()
    if reason is None:
        return
    if os.environ.get("ZHUGE_REQUIRE_BROWSER") == "1" or os.environ.get("CI"):  # CI installs them: never a skip
        pytest.fail(f"browser tests required but {reason}", pytrace=False)
    pytest.skip(f"browser tests: {reason}")


def start_browser() -> Any:
    """A headless Chromium WebDriver whose console log can be read (``goog:loggingPrefs``)."""
    skip_without_browser()
    # Belt and braces: with both paths given Selenium skips Selenium Manager, and offline it
    # could not download anything even if some code path called it.
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    for flag in QUIET_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(chromedriver)), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver


# ------------------------------------------------------------------ console and state
def console_entries(driver: Any) -> list[dict[str, Any]]:
    """Console entries since the last call (chromedriver hands each entry out once)."""
    try:
        return list(driver.get_log("browser"))
    except Exception:  # noqa: BLE001 - a driver without the log endpoint: nothing to report
        return []


def console_errors(driver: Any, allow: tuple[str, ...] = ()) -> list[str]:
    """SEVERE console messages since the last call, less those containing any ``allow`` substring."""
    return [
        e["message"] for e in console_entries(driver)
        if e.get("level") == "SEVERE" and not any(a in e.get("message", "") for a in allow)
    ]  # fmt: skip


_VIEW_STATE_JS = """
const v = document.querySelector('#view'), e = document.querySelector('#error');
return {view: v && v.dataset.view, ready: v && v.dataset.ready,
        error: e && !e.hidden ? e.textContent : '', url: location.href};
"""


def view_state(driver: Any) -> dict[str, Any]:
    return driver.execute_script(_VIEW_STATE_JS)


def _diagnose(driver: Any, what: str, state: dict[str, Any]) -> str:
    console = "\n  ".join(f"{e.get('level')}: {e.get('message')}" for e in console_entries(driver)) or "(empty)"
    return (
        f"{what}\n  url: {state.get('url')}\n  #view data-view={state.get('view')!r} "
        f"data-ready={state.get('ready')!r}\n  #error: {state.get('error') or '(none)'}\n  console:\n  {console}"
    )


def wait_view(driver: Any, view: str, want: str, timeout: float = 30.0) -> dict[str, Any]:
    """Waits for ``#view`` to show ``view`` with ``data-ready == want`` ("1" or "error")."""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = view_state(driver)
        if state.get("view") == view and state.get("ready") == want:
            return state
        if want == "1" and state.get("view") == view and state.get("ready") == "error":
            raise AssertionError(_diagnose(driver, f"view {view!r} failed to render", state))
        time.sleep(0.1)
    raise AssertionError(_diagnose(driver, f"view {view!r} not data-ready={want!r} after {timeout:.0f} s", state))


def wait_ready(driver: Any, view: str, timeout: float = 30.0) -> dict[str, Any]:
    """Waits for ``#view[data-view=view][data-ready="1"]``: the view's data is rendered."""
    return wait_view(driver, view, "1", timeout)


def wait_until(driver: Any, js: str, what: str, *args: Any, timeout: float = 30.0) -> Any:
    """Polls a JS function body (``return ...``, with ``arguments[i]`` = args) until it is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(js, *args)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(_diagnose(driver, f"timed out waiting for {what}", view_state(driver)))


# ------------------------------------------------------------------ canvas
_CANVAS_JS = """
const c = document.querySelector(arguments[0]);
if (!c) return null;
const {width, height} = c;
const data = width && height ? c.getContext('2d').getImageData(0, 0, width, height).data : [];
let painted = 0;
for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted++;
return {width, height, painted, fraction: width && height ? painted / (width * height) : 0,
        dataUrlLength: c.toDataURL('image/png').length};
"""


def canvas_ink(driver: Any, selector: str) -> dict[str, Any] | None:
    """How much of a canvas is painted: {width, height, painted, fraction, dataUrlLength}."""
    return driver.execute_script(_CANVAS_JS, selector)


# ------------------------------------------------------------------ screenshots
def screenshot_dir() -> Path:
    path = Path(os.environ.get("ZHUGE_SCREENSHOT_DIR") or REPO / "artifacts" / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(driver: Any, name: str, full_page: bool = True) -> Path:
    """Saves a PNG named ``name`` (".png" added when missing); full_page grows the window to the page."""
    path = screenshot_dir() / (name if name.endswith(".png") else f"{name}.png")
    size = driver.get_window_size()
    try:
        if full_page:
            # The window is taller than its viewport (outer - inner): grow it by the page height
            # plus that difference, and start from the top (a click may have scrolled the page).
            height = driver.execute_script(
                "window.scrollTo(0, 0);"
                "return document.documentElement.scrollHeight + (window.outerHeight - window.innerHeight);"
            )
            driver.set_window_size(size["width"], min(max(int(height), size["height"]), MAX_SHOT_HEIGHT))
            time.sleep(0.3)  # one frame for Chart.js's resize observer to redraw at the new size
        driver.save_screenshot(str(path))
    finally:
        if full_page:
            driver.set_window_size(size["width"], size["height"])
    return path


# ------------------------------------------------------------------ origins
def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


_RESOURCES_JS = """
return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))
  .map(e => e.name);
"""


def loaded_urls(driver: Any) -> list[str]:
    """The document and every resource (scripts, styles, fetches, images) the page loaded."""
    return list(driver.execute_script(_RESOURCES_JS))


def same_origin_only(driver: Any, base_url: str) -> list[str]:
    """The loaded URLs not on ``base_url``'s origin ([] when the page used nothing external).

    data: and blob: URLs never leave the browser, so they count as local.
    """
    home = _origin(base_url)
    return [u for u in loaded_urls(driver) if not u.startswith(("data:", "blob:")) and _origin(u) != home]
