"""The app in a real browser: Debian's headless Chromium driven by Selenium, on the default model (SmolLM2).

Trace the Eiffel Tower, edit it to Rome, save, undo (Paris again), reload the page, load the saved edits (Rome).
Screenshots of each view go to $FACTEDIT_APP_SCREENSHOTS (docs/images to refresh the docs), else a tmp folder.
"""

import os
from pathlib import Path

import pytest
import torch

from factedit import model_fingerprint
from factedit.app import App, serve_in_thread

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
        reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from test_app import app_config  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1300"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = App(app_config(tmp_path_factory.mktemp("browser")), model, tokenizer)
    server, url = serve_in_thread(app)
    yield app, url
    server.shutdown()
    app.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("FACTEDIT_APP_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_for_text(driver, element_id: str, text: str, seconds: float = 240):
    WebDriverWait(driver, seconds).until(expected_conditions.text_to_be_present_in_element((By.ID, element_id), text))


def click(driver, element_id: str):
    driver.find_element(By.ID, element_id).click()


def message(driver, view: str) -> str:
    return driver.find_element(By.ID, f"{view}-msg").text


def test_trace_edit_undo_save_reload_load(browser, page, shots):
    app, url = page
    base = model_fingerprint(app.model)
    browser.get(url)
    wait_for_text(browser, "status", "smollm2_135m")

    click(browser, "trace-run")  # the form holds the Eiffel Tower fact
    WebDriverWait(browser, 240).until(expected_conditions.presence_of_element_located((By.ID, "img-attn")))
    assert "P(Paris) clean" in message(browser, "trace")
    assert all(browser.find_element(By.ID, f"img-{k}").get_attribute("naturalWidth") != "0" for k in ("hidden", "mlp"))
    browser.save_screenshot(str(shots / "app_trace.png"))

    click(browser, "tab-edit")
    click(browser, "edit-run")
    wait_for_text(browser, "edit-msg", "edited in")
    first = browser.find_element(By.CSS_SELECTOR, "#edit-table tr:nth-child(2)")
    assert first.find_element(By.CLASS_NAME, "before").text.startswith("Paris")
    assert first.find_element(By.CLASS_NAME, "after").text.startswith("Rome")
    # the table shows first, its greedy continuations follow from a second request
    WebDriverWait(browser, 240).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#edit-table.complete"))
    )
    continued = [browser.find_element(By.ID, f"{side}-0").text for side in ("before", "after")]
    assert all(text and text != "…" for text in continued), continued
    browser.save_screenshot(str(shots / "app_edit.png"))

    click(browser, "tab-compare")
    click(browser, "compare-run")
    wait_for_text(browser, "compare-msg", "1 edit(s) applied")
    assert browser.find_element(By.ID, "compare-edited").text.startswith("Rome")
    assert browser.find_element(By.ID, "compare-unedited").text.startswith("Paris")
    browser.save_screenshot(str(shots / "app_compare.png"))

    click(browser, "tab-history")
    browser.find_element(By.ID, "save-name").send_keys("eiffel_rome_browser")
    click(browser, "save")
    wait_for_text(browser, "history-msg", "saved 1 edit(s)")
    click(browser, "undo")
    wait_for_text(browser, "history-msg", "restored bit for bit")
    assert "probe logits identical" in message(browser, "history") and model_fingerprint(app.model) == base
    browser.save_screenshot(str(shots / "app_undo.png"))
    click(browser, "tab-compare")
    click(browser, "compare-run")
    wait_for_text(browser, "compare-msg", "0 edit(s) applied")
    assert browser.find_element(By.ID, "compare-edited").text.startswith("Paris")

    browser.refresh()
    wait_for_text(browser, "status", "0 edit(s) applied")
    click(browser, "tab-history")
    WebDriverWait(browser, 30).until(lambda d: Select(d.find_element(By.ID, "checkpoint-select")).options)
    Select(browser.find_element(By.ID, "checkpoint-select")).select_by_value("eiffel_rome_browser")
    click(browser, "load")
    wait_for_text(browser, "history-msg", "loaded eiffel_rome_browser: 1 edit(s) applied")
    assert "Rome" in browser.find_element(By.ID, "history-table").text
    browser.save_screenshot(str(shots / "app_history.png"))
    click(browser, "tab-compare")
    click(browser, "compare-run")
    wait_for_text(browser, "compare-msg", "1 edit(s) applied")
    assert browser.find_element(By.ID, "compare-edited").text.startswith("Rome")


def test_bad_input_shows_inline(browser, page, shots):
    app, url = page
    before, edits = model_fingerprint(app.model), len(app.history)
    browser.get(url)
    click(browser, "tab-edit")
    prompt = browser.find_element(By.ID, "edit-prompt")
    prompt.clear()
    prompt.send_keys("Where is the tower?")
    click(browser, "edit-run")
    wait_for_text(browser, "edit-msg", "needs exactly one '{}'", seconds=60)
    assert "error" in browser.find_element(By.ID, "edit-msg").get_attribute("class")
    assert model_fingerprint(app.model) == before and len(app.history) == edits
    browser.save_screenshot(str(shots / "app_error.png"))
