"""The feature atlas on the real model at two precisions, checked in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def atlas(smollm2_path, tmp_path_factory):
    from sae_lens import StandardSAE, StandardSAEConfig

    from qsae_lens.corpus import tokenize_corpus
    from qsae_lens.dashboards import build_atlas
    from qsae_lens.models import load_model
    from qsae_lens.survival import feature_survival

    models = {p: load_model(str(smollm2_path), p, device="cpu") for p in ("fp32", "nf4")}
    ds = tokenize_corpus(models["fp32"].tokenizer, "stdlib", context_size=32, max_windows=8, seed=0)
    tokens = torch.tensor(ds["input_ids"], dtype=torch.long)
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=576, d_sae=32, dtype="float32", device="cpu")).eval()
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)
        acts = {p: m.run_with_cache(tokens, names_filter=[HOOK], stop_at_layer=3)[1][HOOK].reshape(-1, 576)
                for p, m in models.items()}
    reports = {"nf4": feature_survival(sae, acts["fp32"], acts["nf4"], n_bootstrap=10)}
    out = tmp_path_factory.mktemp("atlas") / "site"
    res = build_atlas(sae, models, tokens, HOOK, out, reference="fp32", n_latents=6, k=4, reports=reports,
                      own_saes={"nf4": sae})
    return res, sae, acts, models["fp32"].tokenizer


def test_atlas_pages_hold_the_examples(atlas):
    res, sae, acts, _ = atlas
    assert (res.path / "index.html").is_file() and len(res.latents) == 6
    # each page's reference top value is the latent's true maximum (dense, independent of the streaming pass)
    with torch.no_grad():
        codes = sae.encode(acts["fp32"])
    from qsae_lens.dashboards import latent_filename

    for i in res.latents:
        page = (res.path / latent_filename(i)).read_text()
        first = re.search(r"<div class='top'><div class='ex'><b>([0-9.]+)</b>", page)
        assert first and float(first.group(1)) == pytest.approx(codes[:, i].max().item(), abs=0.006)
        assert "own SAE match: latent " + str(i) in page  # the SAE matched against itself finds itself
    every = "".join(p.read_text() for p in res.path.glob("*.html"))
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", every), "a page refers outside itself"


@pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("chromedriver") is None,
                    reason="no chromium/chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
def test_atlas_in_headless_chromium(atlas):
    pytest.importorskip("selenium", reason="selenium is in the dev extra: pip install 'qsae-lens[dev]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    res = atlas[0]
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get((res.path / "index.html").as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
        assert len(rows) == 6
        # sorting by frequency (column 2) orders the rows
        driver.find_elements(By.CSS_SELECTOR, "#latents th")[1].click()
        freqs = [float(c.get_attribute("data-v")) for c in driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr td:nth-child(2)")]
        assert freqs == sorted(freqs)
        driver.find_element(By.CSS_SELECTOR, "#latents tbody tr a").click()
        cols = driver.find_elements(By.CSS_SELECTOR, ".col")
        assert [c.get_attribute("data-precision") for c in cols] == ["fp32", "nf4"]
        assert len(cols[0].find_elements(By.CSS_SELECTOR, ".top .ex")) >= 1
        assert cols[0].find_element(By.CSS_SELECTOR, ".top .ex").is_displayed()
        urls = [json.loads(e["message"])["message"].get("params", {}).get("request", {}).get("url")
                for e in driver.get_log("performance")]
        urls = [u for u in urls if u]
        assert urls and all(u.startswith("file://") for u in urls), urls
    finally:
        driver.quit()


def test_atlas_cli_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    from qsae_lens.cli import main

    assert main(["atlas", str(tmp_path), "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err.strip()
    assert "sweep_config.json" in err and len(err.splitlines()) == 1


def test_extra_facts_become_page_rows_and_sortable_index_columns(tmp_path):
    """``LatentPage.extra`` (e.g. a crosscoder latent's relative norm) shows on the page and as an
    index column whose cells carry the number for sorting; text values are escaped."""
    from qsae_lens.dashboards import Example, LatentPage, PrecisionView, write_feature_pages

    view = PrecisionView("fp32", [Example(["a", "<b>"], [0.0, 2.0], 1, 2.0)], [], [0.0, 1.0, 2.0], [0, 1], 0.5, [], [])
    pages = [LatentPage(3, [view], extra={"relative norm": 0.98765, "exclusive to": "only <nf4>"}),
             LatentPage(7, [view], extra={"relative norm": 0.5, "exclusive to": "shared"})]
    out = write_feature_pages(tmp_path / "site", pages)
    index = (out / "index.html").read_text()
    assert "<th>relative norm</th><th>exclusive to</th>" in index
    assert "<td data-v='0.98765'>0.988</td><td>only &lt;nf4&gt;</td>" in index
    page = (out / "latent_000003.html").read_text()
    assert "<tr><th>relative norm</th><td data-v='0.98765'>0.988</td></tr>" in page and "<nf4>" not in page
