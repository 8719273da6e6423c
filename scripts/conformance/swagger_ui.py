"""Swagger UI in a real browser, as a new customer tries it: headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright) opens /docs, authorizes with the demo key, opens
POST /video-batch, presses "Try it out" and "Execute" with the pre-filled body, and must see
201 with a batch_id; then /worker/docs and /admin/docs must render every operation.

    swagger_ui.py BASE_URL API_KEY [SCREENSHOT_DIR]

Exits 0 when every step passed, 1 with the step that failed."""
import json
import os
import sys

from playwright.sync_api import sync_playwright

BASE, KEY = sys.argv[1].rstrip("/"), sys.argv[2]
SHOTS = sys.argv[3] if len(sys.argv) > 3 else None
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# As root and on a machine without outside network: no sandbox, no background traffic.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000


def step(msg: str) -> None:
    print(f"swagger-ui: {msg}", flush=True)


def shot(page, name: str) -> None:
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


def operations(page) -> int:
    page.wait_for_selector(".opblock", timeout=TIMEOUT_MS)
    return page.locator(".opblock").count()


def main() -> int:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.set_default_timeout(TIMEOUT_MS)

        step(f"open {BASE}/docs")
        page.goto(f"{BASE}/docs")
        n = operations(page)
        step(f"{n} operations listed")

        step("authorize with the key")
        page.click("button.btn.authorize")
        page.fill(".auth-container input", KEY)
        page.click(".auth-btn-wrapper button.authorize")
        page.click(".auth-btn-wrapper button.btn-done")

        step("open POST /video-batch, try it out, execute the pre-filled body")
        op = page.locator(".opblock-post", has=page.locator('.opblock-summary-path[data-path="/video-batch"]'))
        op.locator(".opblock-summary").first.click()
        op.locator("button.try-out__btn").click()
        body = op.locator("textarea.body-param__text").input_value()
        step(f"pre-filled body: {json.dumps(json.loads(body))}")
        op.locator("button.execute").click()
        # The live response: its row in the table under "Server response".
        row = op.locator(".live-responses-table tbody tr.response").first
        row.wait_for()
        code = row.locator(".response-col_status").inner_text().strip()
        text = row.locator(".response-col_description pre").first.inner_text()
        shot(page, "customer-execute")
        if not code.startswith("201"):
            step(f"FAILED: expected 201, got {code}: {text[:500]}")
            return 1
        answer = json.loads(text)
        if not answer.get("batch_id"):
            step(f"FAILED: 201 without a batch_id: {text[:500]}")
            return 1
        step(f"201, batch_id {answer['batch_id']}")

        for path in ("/worker/docs", "/admin/docs"):
            step(f"open {BASE}{path}")
            page.goto(f"{BASE}{path}")
            n = operations(page)
            if page.locator(".errors-wrapper").count():
                step(f"FAILED: {path} shows errors: {page.locator('.errors-wrapper').inner_text()[:500]}")
                return 1
            shot(page, path.strip("/").replace("/", "-"))
            step(f"{n} operations listed")
        browser.close()
        if errors:
            step(f"FAILED: the pages raised script errors: {errors[:3]}")
            return 1
    step("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
