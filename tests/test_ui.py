"""The steering page driven in headless Chromium (Debian's chromium + chromedriver, via selenium)."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

HOOK = "blocks.3.hook_resid_post"
CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(smollm2_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    from qsae_lens.models import load_model
    from qsae_lens.ui import SteeringApp, make_server

    torch.manual_seed(0)
    cfg = StandardSAEConfig(d_in=576, d_sae=64, dtype="float32", device="cpu")
    cfg.metadata.hook_name = HOOK
    sae = StandardSAE(cfg).eval()
    models = {p: load_model(smollm2_path, p, "cpu") for p in ("fp32", "nf4")}
    tokens = models["fp32"].to_tokens(["def add(a, b):\n    return a + b", "import os\nprint(os.getcwd())"])
    srv = make_server(SteeringApp(models, sae, example_tokens=tokens), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (shutil.os.path.exists(CHROMIUM) and shutil.os.path.exists(DRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _generate(driver, latent: int, strength: float) -> dict[str, str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "latent")
    box.clear()
    box.send_keys(str(latent))
    driver.execute_script(
        "const s=document.getElementById('strength'); s.value=arguments[0]; s.dispatchEvent(new Event('input'));",
        str(strength))
    ntok = driver.find_element(By.ID, "ntok")
    ntok.clear()
    ntok.send_keys("4")
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 90).until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "1")
    assert driver.find_element(By.ID, "status").text == "done"
    return {k: driver.find_element(By.ID, k).text for k in
            ("left_steered", "left_unsteered", "right_steered", "right_unsteered")}


def test_page_steers_and_strength_zero_is_unsteered(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{server.server_port}/")
    assert "Steer one SAE latent" in browser.page_source
    assert "http" not in browser.page_source.split("<body>")[1]  # no outside assets
    browser.find_element(By.ID, "right").send_keys("nf4")
    browser.find_element(By.ID, "search").click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#latents li"))
    browser.find_elements(By.CSS_SELECTOR, "#latents li")[5].click()
    assert browser.find_element(By.ID, "latent").get_attribute("value") == "5"

    zero = _generate(browser, 5, 0.0)
    assert zero["left_steered"] == zero["left_unsteered"] and zero["left_steered"].startswith("def add(a, b):")
    assert zero["right_steered"] == zero["right_unsteered"]
    assert browser.find_element(By.ID, "right_name").text == "nf4"
    strong = _generate(browser, 5, 10.0)
    assert strong["left_unsteered"] == zero["left_unsteered"]
    assert strong["left_steered"] != strong["left_unsteered"]  # 10x the typical max does move the text


def test_server_refuses_non_local_host_and_bad_requests(server):
    import json
    import urllib.error
    import urllib.request

    from qsae_lens.ui import make_server

    with pytest.raises(ValueError, match="local"):
        make_server(None, "0.0.0.0", 0)  # type: ignore[arg-type]
    req = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/api/generate",
                                 data=json.dumps({"latent": 999, "strength": 1}).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "latent must be in" in json.loads(err.value.read())["error"]
