"""The accessible web page and the example clients, end to end against a real `rpiq serve` on loopback.

The browser is Debian's headless Chromium driven through /usr/bin/chromedriver (selenium; nothing is
downloaded). The photo is set on the file input (what the OS file dialog would do); everything after
that is keyboard only: Tab to a button, Enter or Space. axe-core (npm, `tests/ui/node_modules`) checks
accessibility, including the enhanced (7:1) contrast rule. Screenshots go to $RPIQ_TEST_ARTIFACTS
(default: a pytest temporary folder), whose path is printed.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import API_KEY
from tests.server.helpers import REPO, parse_wav, render_text

UI_DIR = Path(__file__).resolve().parent
STATIC = REPO / "server" / "static"
CLIENTS = REPO / "deploy" / "clients"
AXE_JS = UI_DIR / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SIGN = ["ORANGE JUICE", "BEST BEFORE 12 MAY"]
CAT_PHOTO = REPO / "quantizer" / "calib_images" / "chelsea.jpg"


def squash(text: str) -> str:
    """Upper case without whitespace: the OCR clean-up may only move spaces, never change letters."""
    return "".join(text.split()).upper()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    path = Path(os.environ.get("RPIQ_TEST_ARTIFACTS") or tmp_path_factory.mktemp("ui-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nUI test artifacts (screenshots): {path}")
    return path


@pytest.fixture(scope="module")
def sign_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ui-photo") / "juice.png"
    render_text(SIGN, size=44).save(path)
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            pytest.skip(f"{what} is not installed ({path}); scripts/install.sh installs it with apt")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--mute-audio", "--window-size=1000,1400",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def active_id(driver) -> str:
    return driver.execute_script("return document.activeElement ? document.activeElement.id : ''")


def press(driver, *keys: str) -> None:
    """Keys typed into whatever has focus, like a keyboard user (no element is clicked or targeted)."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def tab_to(driver, element_id: str, max_tabs: int = 30) -> int:
    """Press Tab until `element_id` has focus; the number of presses (fails if it is not in the tab order)."""
    from selenium.webdriver.common.keys import Keys

    for n in range(1, max_tabs + 1):
        press(driver, Keys.TAB)
        if active_id(driver) == element_id:
            return n
    raise AssertionError(f"#{element_id} not reached with {max_tabs} Tab presses")


def text_of(driver, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id).strip()


def axe_violations(driver) -> list[dict]:
    """axe-core on the current page, all default rules plus the 7:1 contrast rule: the violations found."""
    driver.execute_script(AXE_JS.read_text() + "\nwindow.axe = axe;")
    violations = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {rules: {'color-contrast-enhanced': {enabled: true}}})"
        "  .then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
        "     nodes: v.nodes.map(n => n.target.join(' '))}))), e => done([{id: 'axe-error', help: String(e)}]));"
    )
    return violations


def run_axe(driver, label: str) -> None:
    violations = axe_violations(driver)
    assert violations == [], f"axe violations ({label}): {violations}"


# --- the page is served, open without a key, self-contained ---------------------------------------------


def test_page_and_assets_load_without_key(tiny_server):
    page = httpx.get(tiny_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset, mime in (("app.js", "javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{tiny_server.url}/static/{asset}")
        assert r.status_code == 200 and mime in r.headers["content-type"], asset
    assert httpx.post(tiny_server.url + "/v1/read").status_code == 401  # the API itself still needs the key
    html = page.text
    for needed in ("<main>", "<h1>", 'accept="image/*"', 'capture="environment"', 'role="status"', "aria-live"):
        assert needed in html, needed
    for name in ("Describe scene", "Describe", "Read text", "Ask"):
        assert re.search(rf"<button[^>]*>{name}</button>", html), name
    for f in STATIC.iterdir():  # offline: no CDN, fonts or scripts from elsewhere
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", f.read_text()), f"external URL in {f.name}"


# --- keyboard-only use in a real browser ----------------------------------------------------------------


def test_read_text_keyboard_only(browser, tiny_server, sign_file, artifacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(tiny_server.url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(tiny_server.url + "/")
    wait_for(lambda: "ready" in text_of(driver, "server-status"), 30, "the server status")
    driver.save_screenshot(str(artifacts / "01-page.png"))

    # The one non-keyboard step: the photo goes into the file input, as the OS file dialog would put it.
    driver.find_element(By.ID, "photo").send_keys(str(sign_file))
    assert "Photo ready" in text_of(driver, "photo-status")

    # Tab to "Read text", Enter: the server wants a key, so the page says so and moves focus to the key field.
    tab_to(driver, "read")
    press(driver, Keys.ENTER)
    wait_for(lambda: "API key" in text_of(driver, "error"), 30, "the API key error")
    assert text_of(driver, "error").startswith("Error:")  # said in words, not by colour
    assert active_id(driver) == "apikey"
    driver.save_screenshot(str(artifacts / "02-needs-api-key.png"))

    # Type the key, Enter: it is kept for the tab and focus goes back to "Read text"; Space presses it.
    press(driver, API_KEY, Keys.ENTER)
    assert active_id(driver) == "read"
    assert driver.execute_script("return sessionStorage.getItem('rpiq-api-key')") == API_KEY
    t0 = time.monotonic()
    press(driver, Keys.SPACE)
    answer = wait_for(lambda: (t := text_of(driver, "answer")) and "wait" not in t and t != "No answer yet." and t,
                      60, "the answer in the live region")  # fmt: skip
    assert text_of(driver, "error") == ""
    for line in SIGN:
        assert squash(line) in squash(answer), answer
    live = driver.find_element(By.ID, "answer")
    assert live.get_attribute("role") == "status" and live.get_attribute("aria-live") == "polite"
    print(f"answer after {time.monotonic() - t0:.1f} s: {answer!r}")

    # The speech: a blob: URL in the <audio> element whose metadata loads (duration > 0) and whose bytes are a WAV.
    audio = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const a = document.getElementById('speech');
        const report = async () => { try {
          const bytes = new Uint8Array(await (await fetch(a.src)).arrayBuffer());
          let bin = '';
          for (let i = 0; i < bytes.length; i += 8192) bin += String.fromCharCode(...bytes.subarray(i, i + 8192));
          done({src: a.src, duration: a.duration, hidden: a.hidden, controls: a.controls, wav: btoa(bin)});
        } catch (e) { done({error: String(e)}); } };
        if (a.readyState >= 1) report();
        else {
          a.addEventListener('loadedmetadata', report, {once: true});
          a.addEventListener('error', () => done({error: String(a.error && a.error.message)}), {once: true});
        }
    """)
    assert "error" not in audio, audio
    assert audio["src"].startswith("blob:") and not audio["hidden"] and audio["controls"]
    assert audio["duration"] > 0.5, audio["duration"]
    channels, rate, seconds = parse_wav(base64.b64decode(audio["wav"]))
    assert channels >= 1 and rate > 0 and abs(seconds - audio["duration"]) < 0.2
    driver.save_screenshot(str(artifacts / "03-answer.png"))
    if AXE_JS.is_file():
        run_axe(driver, "page with an answer and its audio")

    # Ask, keyboard only: Tab to the question, type, Enter (goes to /v1/vqa; "what does it say" is answered
    # from the OCR text, so even the tiny random model gives a checkable answer).
    old_src = audio["src"]
    tab_to(driver, "question")
    press(driver, "What does it say?", Keys.ENTER)
    answer = wait_for(lambda: "wait" not in (t := text_of(driver, "answer")) and t, 60, "the answer to Ask")
    assert text_of(driver, "error") == "" and squash(SIGN[0]) in squash(answer), answer
    assert wait_for(lambda: driver.execute_script("return document.getElementById('speech').src") != old_src, 10,
                    "the new speech")  # fmt: skip


def test_describe_scene_keyboard_only(browser, tiny_server, artifacts):
    """Describe scene posts the photo to /v1/scene; the summary (no language model) is announced and spoken."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(tiny_server.url + "/")
    driver.execute_script("sessionStorage.setItem('rpiq-api-key', arguments[0])", API_KEY)
    driver.get(tiny_server.url + "/")
    wait_for(lambda: "ready" in text_of(driver, "server-status"), 30, "the server status")
    driver.find_element(By.ID, "photo").send_keys(str(CAT_PHOTO))
    old_src = driver.execute_script("return document.getElementById('speech').src")
    tab_to(driver, "scene")
    assert driver.execute_script("return document.activeElement.textContent") == "Describe scene"
    press(driver, Keys.ENTER)
    answer = wait_for(lambda: (t := text_of(driver, "answer")) and "wait" not in t and t != "No answer yet." and t,
                      60, "the scene summary in the live region")  # fmt: skip
    assert text_of(driver, "error") == "" and "a cat" in answer and "o'clock" not in answer, answer
    assert wait_for(lambda: driver.execute_script("return document.getElementById('speech').src") != old_src, 10,
                    "the spoken summary")  # fmt: skip
    driver.save_screenshot(str(artifacts / "05-describe-scene.png"))
    if AXE_JS.is_file():
        run_axe(driver, "page with a scene summary")


def test_status_polls_until_ready(browser, tiny_server):
    """While /readyz says 503 the page says it is loading, and it keeps asking until the server is ready."""
    driver = browser
    stub = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        const realFetch = window.fetch.bind(window);
        let loading = 2;
        window.fetch = (url, opts) => (String(url).endsWith('/readyz') && loading-- > 0)
          ? Promise.resolve(new Response(JSON.stringify({ready: false}), {status: 503}))
          : realFetch(url, opts);
    """})  # fmt: skip
    try:
        driver.get(tiny_server.url + "/")
        wait_for(lambda: "still loading" in text_of(driver, "server-status"), 10, "the loading status")
        wait_for(lambda: text_of(driver, "server-status") == "The server is ready.", 30, "the ready status")
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": stub["identifier"]})


def test_axe_no_violations(browser, tiny_server, artifacts):
    """axe-core finds nothing on the fresh page, with the settings open, and with an error shown."""
    from selenium.webdriver.common.keys import Keys

    if not AXE_JS.is_file():
        pytest.skip(f"axe-core is not installed ({AXE_JS}); run: npm ci --prefix tests/ui")
    driver = browser
    driver.get(tiny_server.url + "/")
    wait_for(lambda: "ready" in text_of(driver, "server-status"), 30, "the server status")
    run_axe(driver, "fresh page")
    tab_to(driver, "read")
    press(driver, Keys.ENTER)  # no photo yet: an error, focus to the file input
    assert "photo first" in text_of(driver, "error") and active_id(driver) == "photo"
    driver.execute_script("document.getElementById('settings').open = true")
    run_axe(driver, "error shown, settings open")
    driver.save_screenshot(str(artifacts / "04-no-photo-error.png"))
    # The check itself works: an unlabelled field and grey-on-black text are caught.
    driver.execute_script(
        "const i = document.createElement('input'); i.type = 'text'; document.querySelector('main').append(i);"
        "const p = document.createElement('p'); p.textContent = 'faint'; p.style.color = '#555';"
        "document.querySelector('main').append(p);"
    )
    found = {v["id"] for v in axe_violations(driver)}
    assert {"label", "color-contrast"} <= found, found


# --- the example clients ----------------------------------------------------------------------------------


def test_python_client(tiny_server, sign_file, tmp_path):
    wav = tmp_path / "answer.wav"
    env = {**os.environ, "RPIQ_URL": tiny_server.url, "RPIQ_API_KEY": API_KEY}
    r = subprocess.run([sys.executable, str(CLIENTS / "rpiq_client.py"), str(sign_file), "--read", "--wav", str(wav)],
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    for line in SIGN:
        assert squash(line) in squash(r.stdout), r.stdout
    assert parse_wav(wav.read_bytes())[2] > 0.5
    env.pop("RPIQ_API_KEY")
    r = subprocess.run([sys.executable, str(CLIENTS / "rpiq_client.py"), str(sign_file), "--read"],
                       env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0 and "Error 401" in r.stderr


def test_speak_clipboard_script(tiny_server, sign_file):
    script = CLIENTS / "speak-clipboard.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: only the syntax was checked")
    env = {**os.environ, "RPIQ_URL": tiny_server.url, "RPIQ_API_KEY": API_KEY, "RPIQ_PLAYER": "none"}
    r = subprocess.run(["bash", str(script), str(sign_file)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for line in SIGN:
        assert squash(line) in squash(r.stdout), r.stdout
