"""The `saereg serve` pages in a real browser (headless Chromium through Playwright) against the
real server on a real catalog: the SAE list links to a version page; a feature page draws its
histogram (one bar per stored bin) and its top examples as shaded tokens and pages to the next
feature; searching a label lands on that feature's page; typing a prompt shades its tokens as
they stream in (and clicking a token lists its top features); steering fills the default and
the steered column (they differ) and stores the run; adding a label grows the history (kept
after a reload) and accepting it shows it accepted; a label `<script>alert(1)</script>` is
shown as text on its feature page and in search results, and no dialog ever fires. No page
raises an uncaught JavaScript error. Each test leaves a screenshot in tests/browser/screenshots/.

Skipped (the whole module) where /usr/bin/chromium or the `playwright` package is missing."""

from __future__ import annotations

import os
import re

import pytest

if not os.access("/usr/bin/chromium", os.X_OK):
    pytest.skip("browser tests need Debian's chromium at /usr/bin/chromium "
                "(apt-get install chromium)", allow_module_level=True)
pytest.importorskip("playwright.sync_api",
                    reason="browser tests need the `playwright` package (pip install playwright)")

from playwright.sync_api import expect  # noqa: E402


def feature_path(cat, index: int) -> str:
    return f"/sae/{cat.ref}/feature/{index}"


def is_post(path_end: str):
    return lambda r: r.request.method == "POST" and r.url.split("?")[0].endswith(path_end)


def test_sae_list_links_to_the_version_page(tab, web_catalog):
    tab.goto("/")
    expect(tab.page).to_have_url(re.compile(r"/saes$"))
    row = tab.page.locator(f'table#saes tr.version[data-ref="{web_catalog.ref}"]')
    expect(row).to_have_count(1)
    expect(tab.page.locator("form#filters input[name=model]")).to_have_count(1)
    expect(tab.page.locator("nav")).to_contain_text("Search")
    tab.shot("sae_list")
    row.locator("a.version-link").click()
    expect(tab.page).to_have_url(re.compile(re.escape(f"/sae/{web_catalog.ref}") + r"$"))
    for part in ("#config", "#metrics", "#lineage", "#alias-history", "#publications"):
        expect(tab.page.locator(part)).to_have_count(1)
    expect(tab.page.locator("a#open-prompt")).to_have_attribute(
        "href", re.compile(r"/prompt\?sae="))
    expect(tab.page.locator("a#open-steer")).to_have_attribute("href", re.compile(r"/steer\?sae="))
    expect(tab.page.locator("#config")).to_contain_text(str(web_catalog.d_sae))
    tab.shot("sae_version")


def test_feature_page_draws_histogram_and_examples(tab, web_catalog):
    cat = web_catalog
    tab.goto(feature_path(cat, cat.feature))
    expect(tab.page.locator("h1")).to_contain_text(str(cat.feature))
    expect(tab.page.locator("h1")).to_contain_text(cat.ref)
    bars = tab.page.locator("svg#histogram rect.bar")
    expect(bars).to_have_count(cat.bins)
    titles = [b.evaluate("e => (e.querySelector('title') || {}).textContent || e.getAttribute('title')")
              for b in bars.all()]
    assert all(titles), f"every bar names its bin range and count: {titles}"
    examples = tab.page.locator("#top-examples .example")
    expect(examples).to_have_count(cat.top_examples)
    toks = examples.first.locator("span.tok")
    assert toks.count() > 1
    acts = [float(t.get_attribute("data-act")) for t in toks.all()]
    assert max(acts) > 0, acts
    peak = toks.nth(acts.index(max(acts)))
    assert peak.get_attribute("title"), "a token shows its value on hover (title)"
    shaded = peak.evaluate("e => getComputedStyle(e).backgroundColor")
    assert shaded not in ("rgba(0, 0, 0, 0)", "transparent"), shaded
    expect(tab.page.locator("#stats [data-flag]")).to_have_count(1)
    expect(tab.page.locator("#label-current")).to_have_text(cat.search_label)
    expect(tab.page.locator("#top-logits li").first).to_be_visible()
    tab.shot("feature_page")
    step, other = ("a#next", cat.feature + 1) if cat.feature + 1 < cat.d_sae else ("a#prev", cat.feature - 1)
    tab.page.locator(step).click()
    expect(tab.page).to_have_url(re.compile(re.escape(feature_path(cat, other)) + "$"))
    expect(tab.page.locator("h1")).to_contain_text(str(other))


def test_search_lands_on_the_feature_page(tab, web_catalog):
    cat = web_catalog
    tab.goto("/search")
    tab.page.locator("form#search input[name=q]").fill("parentheses")
    tab.page.locator("form#search input[name=q]").press("Enter")
    hits = tab.page.locator("#results li.hit a")
    expect(hits).to_have_count(1)
    expect(tab.page.locator("#results li.hit")).to_contain_text(cat.search_label)
    tab.shot("search_results")
    hits.first.click()
    expect(tab.page).to_have_url(re.compile(re.escape(feature_path(cat, cat.feature)) + "$"))
    expect(tab.page.locator("#label-current")).to_have_text(cat.search_label)
    tab.shot("search_landed")


def test_typed_prompt_shades_tokens(tab, web_catalog):
    cat = web_catalog
    tab.goto(f"/prompt?sae={cat.ref}")
    tab.page.locator("select#mode").select_option("feature")
    tab.page.locator("input#feature").fill(str(cat.feature))
    with tab.page.expect_response(is_post("/prompt")) as streamed:
        tab.page.locator("textarea#prompt").press_sequentially(cat.prompt, delay=5)
    assert streamed.value.headers["content-type"].startswith("text/event-stream")
    streamed.value.finished()
    toks = tab.page.locator("#tokens span.tok")
    # every token of the whole prompt streams in (the app may show BOS as one more)
    tab.page.wait_for_function(
        "n => document.querySelectorAll('#tokens span.tok').length >= n", arg=cat.prompt_tokens)
    acts = [float(t.get_attribute("data-act")) for t in toks.all()]
    assert max(acts) > 0, f"feature {cat.feature} did not fire on its own top example: {acts}"
    peak = toks.nth(acts.index(max(acts)))
    shaded = peak.evaluate("e => getComputedStyle(e).backgroundColor")
    assert shaded not in ("rgba(0, 0, 0, 0)", "transparent"), shaded
    tab.shot("prompt_feature_mode")

    with tab.page.expect_response(is_post("/prompt")) as streamed:
        tab.page.locator("select#mode").select_option("top")
    streamed.value.finished()
    tab.page.wait_for_function(
        "n => document.querySelectorAll('#tokens span.tok').length >= n", arg=cat.prompt_tokens)
    toks.last.click()
    links = tab.page.locator("#token-features li a")
    expect(links.first).to_have_attribute("href", re.compile(re.escape(f"/sae/{cat.ref}/feature/")))
    hrefs = [a.get_attribute("href") for a in links.all()]
    assert f"/sae/{cat.ref}/feature/{cat.feature}" in hrefs, hrefs  # it fires on the last token
    tab.shot("prompt_top_mode")


def test_steering_fills_both_columns(tab, web_catalog):
    cat = web_catalog
    tab.goto(f"/steer?sae={cat.ref}")
    runs_before = tab.page.locator("#runs li").count()
    row = tab.page.locator("#steer-features .steer-feature").first
    row.locator("input.index").fill(str(cat.feature))
    row.locator("input.strength").fill("40")
    tab.page.locator("select#method").select_option("add")
    tab.page.locator("textarea#steer-prompt").fill("The weather today is")
    tab.page.locator("input#max-new-tokens").fill("8")
    tab.page.locator("input#seed").fill("0")
    with tab.page.expect_response(is_post("/steer")) as streamed:
        tab.page.locator("button#run").click()
    assert streamed.value.status == 200
    assert streamed.value.headers["content-type"].startswith("text/event-stream")
    streamed.value.finished()  # the whole stream, `done` included
    default, steered = tab.page.locator("#default-output"), tab.page.locator("#steered-output")
    expect(default).not_to_have_text(re.compile(r"^\s*$"))
    expect(steered).not_to_have_text(re.compile(r"^\s*$"))
    tab.shot("steer_columns")
    assert default.inner_text() != steered.inner_text(), "strength 40 changed nothing"
    tab.page.reload()
    expect(tab.page.locator("#runs li")).to_have_count(runs_before + 1)
    tab.shot("steer_runs")


def test_adding_a_label_grows_the_history(tab, web_catalog):
    cat = web_catalog
    tab.goto(feature_path(cat, cat.fresh))
    history = tab.page.locator("#label-history li.label")
    expect(history).to_have_count(0)
    form = tab.page.locator("form#add-label")
    for n, text in enumerate(["nested brackets in source code", "brackets and braces"], 1):
        form.locator("input[name=text]").fill(text)
        form.locator("[type=submit]").click()
        expect(history).to_have_count(n)
        expect(tab.page.locator("#label-history")).to_contain_text(text)
    tab.page.reload()
    expect(history).to_have_count(2)
    expect(tab.page.locator("#label-current")).to_have_text("brackets and braces")
    first = history.filter(has_text="nested brackets in source code")
    expect(first).to_contain_text("human")
    with tab.page.expect_response(lambda r: r.request.method == "POST"
                                  and "/labels" in r.url) as accepted:
        first.locator("button.accept").click()
    assert accepted.value.ok, accepted.value.status
    tab.page.reload()
    expect(history.filter(has_text="nested brackets in source code")).to_contain_text("accepted")
    # an accepted label outranks a newer candidate (the catalog's current-label rule)
    expect(tab.page.locator("#label-current")).to_have_text("nested brackets in source code")
    tab.shot("label_added")


def test_script_label_is_shown_as_text(tab, web_catalog):
    cat = web_catalog
    tab.goto(feature_path(cat, cat.hostile))
    expect(tab.page.locator("#label-current")).to_have_text(cat.hostile_label)
    expect(tab.page.locator("#label-history li.label").first).to_contain_text(cat.hostile_label)
    assert tab.page.locator("#label-current script, #label-history script").count() == 0
    tab.shot("script_label_feature")
    tab.goto("/search?q=alert")
    expect(tab.page.locator("#results li.hit")).to_contain_text(cat.hostile_label)
    assert tab.page.locator("#results script").count() == 0
    tab.shot("script_label_search")
    assert tab.dialogs == [], f"a label ran as script: {tab.dialogs}"
    assert not tab.page.evaluate("() => window.__alerted === true")
