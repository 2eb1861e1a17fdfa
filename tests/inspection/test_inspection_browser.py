"""The inspection page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright): the tokens
render, hovering one shows its curves and logit lens, clicking pins it, and the page asks for nothing over the
network. A screenshot is kept in tests/artifacts/inspection/ (or $RDEPTH_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from inspection_stubs import PAGE_PROMPT, PAGE_STEPS

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[2]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def _artifact_dir() -> Path:
    root = Path(os.environ.get("RDEPTH_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
    root.mkdir(parents=True, exist_ok=True)
    ignore = root / ".gitignore"
    if root == REPO / "tests" / "artifacts" and not ignore.exists():
        ignore.write_text("*\n")  # test outputs, never committed
    (root / "inspection").mkdir(exist_ok=True)
    return root / "inspection"


def test_page_renders_tokens_and_hover_detail_in_chromium(inspect_out: Path) -> None:
    requests: list[str] = []
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto((inspect_out / "index.html").as_uri())

            tokens = page.locator("#text .tok")
            assert tokens.count() == len(PAGE_PROMPT)
            texts = tokens.all_text_contents()
            assert "".join(texts).replace("\u23ce", "") == PAGE_PROMPT
            assert tokens.nth(3).evaluate("e => getComputedStyle(e).backgroundColor").startswith("rgb(")
            assert page.locator("#hint").is_visible()

            tokens.nth(3).hover()  # '<' of "<b>"
            title = page.locator("#detail-title")
            assert title.is_visible()
            assert '"<"' in title.inner_text() and "position 3" in title.inner_text()
            curves = page.locator("#curves svg.curve")
            assert curves.count() == 6
            points = curves.first.locator("polyline").get_attribute("points")
            assert len(points.split()) == PAGE_STEPS
            assert page.locator("#lens tr").count() == PAGE_STEPS + 1
            assert page.locator("#exit-table td").count() == 6

            tokens.nth(5).click()  # pin '>'; hovering elsewhere must not replace it
            tokens.nth(0).hover()
            assert "position 5" in title.inner_text()
            shot = _artifact_dir() / "page_hover.png"
            page.screenshot(path=str(shot))
            print(f"\nscreenshot of the inspection page: {shot}")

            page.select_option("#criterion", "argmax-stability")
            assert "(argmax-stability)" in (tokens.nth(0).get_attribute("title") or "")
        finally:
            browser.close()
    assert shot.stat().st_size > 10000
    assert errors == []
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
