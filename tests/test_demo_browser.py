"""`viscpm demo`: the gradio apps driven in headless Chromium (Debian's `chromium`, which `.ci/run` installs; the
tests skip where it is missing).

Both run on the shipped toy models (the defaults). Chat: upload an image, ask, see the answer, ask a follow-up about
the same image. Paint: enter a Chinese prompt, see the drawn image in the gallery.
"""

import os
import shutil
import socket

import pytest

from conftest import REPO_ROOT
from viscpm import defaults
from viscpm.experiments.glossary import ZH, describe

pytestmark = pytest.mark.slow  # the slowest tests, left out by -m "not slow"

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # tests run offline
playwright = pytest.importorskip("playwright.sync_api", reason="the dev extra (playwright) is not installed")
gradio = pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# what a sandboxed root machine needs: no setuid sandbox, no /dev/shm of a usable size, no GPU
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium not found: install Debian's chromium package (apt-get install chromium), as .ci/run does")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launched(app):
    port = free_port()
    app.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    return f"http://127.0.0.1:{port}"


def test_chat_demo_answers_and_follows_up_in_the_browser(browser):
    from viscpm.serving.demo import chat_app

    app = chat_app(defaults.CHAT)
    try:
        page = browser.new_page()
        page.goto(launched(app), timeout=TIMEOUT_MS)
        page.locator("#image input[type=file]").set_input_files(str(REPO_ROOT / "examples" / "circle.png"))
        page.locator("#question textarea").fill("图中是什么形状？")
        page.locator("#send").click()
        chat = page.locator("#chatbot")
        playwright.expect(chat).to_contain_text(ZH["circle"], timeout=TIMEOUT_MS)
        page.locator("#question textarea").fill("这个形状是什么颜色？")
        page.locator("#question textarea").press("Enter")
        playwright.expect(chat).to_contain_text(ZH["red"], timeout=TIMEOUT_MS)
        page.locator("#clear").click()
        playwright.expect(chat).not_to_contain_text(ZH["circle"], timeout=TIMEOUT_MS)
    finally:
        app.close()


def test_paint_demo_shows_an_image_in_the_browser(browser):
    from viscpm.serving.demo import paint_app

    app = paint_app(defaults.PAINT)
    try:
        page = browser.new_page()
        page.goto(launched(app), timeout=TIMEOUT_MS)
        page.locator("#prompt textarea").fill(describe("zh", "red", "circle"))
        steps = page.locator("#steps input[type=number]")
        steps.fill("10")
        steps.press("Enter")
        page.locator("#generate").click()
        playwright.expect(page.locator("#gallery img").first).to_be_visible(timeout=TIMEOUT_MS)
    finally:
        app.close()
