"""A customer's batch flow through the GENERATED Python SDK (openapi-python-client output).

Run by scripts/conformance/sdk.sh, which generates the SDK and starts the server. Every step is
run even when an earlier one failed (a step that needs an earlier result is skipped), and each
prints PASS, FAIL or SKIP with the reason; the last line is "N passed, N failed" and the exit code
is 1 when any step failed.

What "typed" means here: the SDK's `sync_detailed(...)` returns `Response.parsed` as an instance of
the generated model for that status (e.g. `BatchCreated` for 201, `ErrorBody` for 402). A
`parsed` of None means the SDK dropped that response from the document, which a customer sees as
"no data". The worker part uses plain HTTP: the worker API is not in the customer SDK.

Environment: BASE_URL, SDK_PATH (folder holding the `video_batch_client` package), API_KEY,
POOR_API_KEY (too few credits for one item), BURST_API_KEY (rate_limit_per_min = 2),
WORKER_SECRET, HOOK_API_KEY (a key whose webhook_url is http://127.0.0.1:HOOK_PORT, signed with
HOOK_SECRET and, during its rotation, HOOK_OLD_SECRET).
"""

from __future__ import annotations

import http.server
import importlib
import json
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

BASE_URL = os.environ["BASE_URL"]
sys.path.insert(0, os.environ["SDK_PATH"])

PACKAGE = "video_batch_client"
# The customer operations the design promises, by operation id, with their SDK group.
OPERATIONS = {
    "create_batch": "batches",
    "get_batch": "batches",
    "list_batches": "batches",
    "cancel_batch": "batches",
    "get_batch_errors": "batches",
    "retry_failed_items": "batches",
    "get_credits": "account",
    "get_usage": "account",
    "list_webhook_deliveries": "webhooks",
    "resend_webhook_delivery": "webhooks",
}


class StepFailed(Exception):
    """A check of a step did not hold."""


class Skip(Exception):
    """A step cannot run because an earlier one gave no result."""


@dataclass
class Flow:
    """Results of the steps, and what later steps need from earlier ones."""

    passed: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    def step(self, name: str, fn: Callable[[], str | None]) -> None:
        try:
            note = fn()
        except Skip as e:
            self.skipped += 1
            print(f"SKIP  {name}: {e}")
            return
        except StepFailed as e:
            self.failed.append(name)
            print(f"FAIL  {name}: {e}")
            return
        except Exception as e:  # an SDK crash (e.g. parsing a response) is a failure too
            self.failed.append(name)
            # Point at the generated code that raised, rather than at the standard library.
            frames = traceback.extract_tb(e.__traceback__)
            marker = f"{os.sep}{PACKAGE}{os.sep}"
            sdk = [f for f in frames if marker in f.filename]
            at = (sdk or frames)[-1]
            where = f"SDK {at.filename.split(marker)[-1]}" if sdk else at.filename
            print(f"FAIL  {name}: {type(e).__name__}: {e} (at {where}:{at.lineno}: {at.line})")
            return
        self.passed += 1
        print(f"PASS  {name}" + (f": {note}" if note else ""))

    def need(self, key: str) -> Any:
        if key not in self.state:
            raise Skip(f"needs `{key}` from an earlier step")
        return self.state[key]


def check(cond: bool, message: str) -> None:
    if not cond:
        raise StepFailed(message)


def body_of(resp: Any) -> dict:
    """The raw JSON of an SDK response (to carry on when `parsed` is missing)."""
    try:
        return json.loads(resp.content)
    except ValueError:
        return {}


def describe(resp: Any) -> str:
    return f"HTTP {int(resp.status_code)} {resp.content[:300]!r}"


def main() -> int:
    flow = Flow()
    mods: dict[str, Any] = {}

    # --- the SDK itself -------------------------------------------------------------------
    def sdk_has_operations() -> str:
        missing = []
        for op, group in OPERATIONS.items():
            try:
                m = importlib.import_module(f"{PACKAGE}.api.{group}.{op}")
            except ImportError:
                missing.append(op)
                continue
            check(hasattr(m, "sync_detailed"), f"{op} has no sync_detailed")
            mods[op] = m
        check(not missing, f"operations missing from the SDK: {missing}")
        return ", ".join(OPERATIONS)

    flow.step("SDK holds the operations create_batch, get_batch, ...", sdk_has_operations)

    models = importlib.import_module(f"{PACKAGE}.models")
    client_mod = importlib.import_module(PACKAGE)

    def model(name: str) -> Any:
        m = getattr(models, name, None)
        if m is None:
            raise StepFailed(
                f"the wire response is as expected, but the SDK has no model `{name}` "
                "(dropped at generation), so `parsed` is None"
            )
        return m

    def sdk_has_models() -> str:
        want = ["BatchCreated", "Batch", "BatchList", "BatchItemView", "ErrorBody", "ErrorCode"]
        missing = [n for n in want if not hasattr(models, n)]
        check(not missing, f"models missing from the SDK: {missing}")
        return ", ".join(want)

    flow.step("SDK holds the typed bodies (BatchCreated, Batch, ErrorBody, ...)", sdk_has_models)

    def client_for(key: str) -> Any:
        # What a customer writes: the key goes in the `x-api-key` header, without a prefix.
        return client_mod.AuthenticatedClient(
            base_url=f"{BASE_URL}/api/enterprise",
            token=key,
            prefix="",
            auth_header_name="x-api-key",
            raise_on_unexpected_status=False,
        )

    def op(name: str) -> Any:
        if name not in mods:
            raise Skip(f"the SDK has no `{name}`")
        return mods[name]

    customer = client_for(os.environ["API_KEY"])
    request_id = f"sdk-flow-{uuid.uuid4().hex[:12]}"

    def batch_request(prompts: list[str], request_id: str | None = None) -> Any:
        items = [
            models.BatchItemInput(
                prompt=p, params=models.BatchItemInputParams.from_dict({"duration_s": 5})
            )
            for p in prompts
        ]
        kwargs: dict[str, Any] = {"items": items}
        if request_id:
            kwargs["request_id"] = request_id
            kwargs["metadata"] = models.CreateBatchRequestMetadata.from_dict({"campaign": "q4"})
        return models.CreateBatchRequest(**kwargs)

    # --- customer: create, read, list, replay ---------------------------------------------
    def create() -> str:
        resp = op("create_batch").sync_detailed(
            client=customer, body=batch_request(["a red fox at dawn", "a blue whale"], request_id)
        )
        raw = body_of(resp)
        if raw.get("batch_id"):
            flow.state["batch_id"] = uuid.UUID(raw["batch_id"])  # lets later steps run
        check(int(resp.status_code) == 201, f"expected 201, got {describe(resp)}")
        check(resp.headers.get("x-request-id"), "no x-request-id header")
        check(
            isinstance(resp.parsed, model("BatchCreated")),
            f"201 not typed: parsed={resp.parsed!r}",
        )
        p = resp.parsed
        check(p.request_id == request_id, f"request_id {p.request_id!r}")
        check(p.idempotent_replay is False, "idempotent_replay should be false")
        check(p.total_count == 2 and p.required_credits == 2 * p.cost_per_video, "amounts")
        return f"batch {p.batch_id}, {p.required_credits} credits held"

    flow.step("create_batch -> 201 BatchCreated", create)

    def read() -> str:
        batch_id = flow.need("batch_id")
        resp = op("get_batch").sync_detailed(batch_id, client=customer)
        check(int(resp.status_code) == 200, f"expected 200, got {describe(resp)}")
        check(isinstance(resp.parsed, model("Batch")), f"200 not typed: parsed={resp.parsed!r}")
        b = resp.parsed
        check(str(b.status) == "queued", f"status {b.status}")
        check(b.counts.total == 2 and b.counts.queued == 2, f"counts {b.counts}")
        check(len(b.items) == 2, f"items {b.items}")
        check(isinstance(b.items[0], model("BatchItemView")), "items not typed")
        return f"status {b.status}, items {[i.prompt for i in b.items]}"

    flow.step("get_batch -> 200 Batch (queued, 2 items)", read)

    def listing() -> str:
        batch_id = flow.need("batch_id")
        resp = op("list_batches").sync_detailed(client=customer, limit=10)
        check(int(resp.status_code) == 200, f"expected 200, got {describe(resp)}")
        check(isinstance(resp.parsed, model("BatchList")), f"200 not typed: parsed={resp.parsed!r}")
        ids = [b.batch_id for b in resp.parsed.data]
        check(batch_id in ids, f"{batch_id} not listed in {ids}")
        return f"{len(ids)} batch(es), has_more={resp.parsed.has_more}"

    flow.step("list_batches -> 200 BatchList holding the batch", listing)

    def replay() -> str:
        batch_id = flow.need("batch_id")
        resp = op("create_batch").sync_detailed(
            client=customer, body=batch_request(["a red fox at dawn", "a blue whale"], request_id)
        )
        check(int(resp.status_code) == 200, f"expected 200, got {describe(resp)}")
        check(
            resp.headers.get("idempotent-replayed") == "true",
            f"Idempotent-Replayed header {resp.headers.get('idempotent-replayed')!r}",
        )
        raw = body_of(resp)
        check(raw.get("idempotent_replay") is True, f"idempotent_replay {raw.get('idempotent_replay')!r}")
        check(raw.get("batch_id") == str(batch_id), "another batch id")
        check(
            isinstance(resp.parsed, model("BatchCreated")),
            f"200 not typed: parsed={resp.parsed!r}",
        )
        check(resp.parsed.idempotent_replay is True, "typed idempotent_replay is not True")
        return "same batch, idempotent_replay true"

    flow.step("create_batch again with the same request_id -> 200 replay", replay)

    # --- typed errors ------------------------------------------------------------------------
    def expect_error(resp: Any, status: int, code: str) -> Any:
        check(int(resp.status_code) == status, f"expected {status}, got {describe(resp)}")
        raw = body_of(resp)
        check(raw.get("error") == code, f"error code {raw.get('error')!r}")
        check(
            isinstance(resp.parsed, model("ErrorBody")),
            f"{status} not typed (ErrorBody): parsed={resp.parsed!r}",
        )
        check(resp.parsed.error == model("ErrorCode")(code), f"typed error {resp.parsed.error!r}")
        check(resp.parsed.ok is False, "ok should be false")
        return resp.parsed

    def insufficient() -> str:
        poor = client_for(os.environ["POOR_API_KEY"])
        resp = op("create_batch").sync_detailed(client=poor, body=batch_request(["too expensive"]))
        err = expect_error(resp, 402, "INSUFFICIENT_CREDITS")
        return err.message

    flow.step("create_batch with too few credits -> typed 402 INSUFFICIENT_CREDITS", insufficient)

    def rate_limited() -> str:
        burst = client_for(os.environ["BURST_API_KEY"])
        # The limit is 2 per UTC minute: the 3rd call is refused, unless the minute turned over
        # between the calls, so allow a second window's worth before giving up.
        for attempt in range(1, 6):
            resp = op("create_batch").sync_detailed(client=burst, body=batch_request([f"burst {attempt}"]))
            if int(resp.status_code) != 201:
                break
        check(resp.headers.get("retry-after", "").isdigit(), f"Retry-After {resp.headers.get('retry-after')!r}")
        err = expect_error(resp, 429, "RATE_LIMIT_EXCEEDED")
        return f"after {attempt - 1} creations: {err.message}"

    flow.step("create_batch over rate_limit_per_min = 2 -> typed 429 RATE_LIMIT_EXCEEDED", rate_limited)

    def not_found() -> str:
        resp = op("get_batch").sync_detailed(uuid.uuid4(), client=customer)
        err = expect_error(resp, 404, "NOT_FOUND")
        return err.message

    flow.step("get_batch of an unknown id -> typed 404 NOT_FOUND", not_found)

    # --- worker (plain HTTP), then the customer sees the result ----------------------------
    worker = httpx.Client(
        base_url=f"{BASE_URL}/api/internal/worker",
        headers={"Authorization": f"Bearer {os.environ['WORKER_SECRET']}"},
        timeout=10,
    )

    def work() -> str:
        batch_id = str(flow.need("batch_id"))
        # Other keys' batches are queued too (the 429 step made some): claim enough for all.
        r = worker.post("/claim", json={"worker_id": "sdk-flow-worker", "max_items": 100})
        check(r.status_code == 200, f"claim: HTTP {r.status_code} {r.text[:300]}")
        mine = [i for i in r.json()["items"] if i["batch_id"] == batch_id]
        check(len(mine) == 2, f"claimed {len(mine)} of the batch's 2 items")
        for item in mine:
            r = worker.post(
                f"/items/{item['item_id']}/complete",
                json={
                    "lease_token": item["lease_token"],
                    "result_url": f"https://cdn.example.com/{item['item_id']}.mp4",
                },
            )
            check(r.status_code == 200, f"complete: HTTP {r.status_code} {r.text[:300]}")
        return f"claimed and completed {len(mine)} items"

    flow.step("worker: claim and complete the batch's items (HTTP)", work)

    def completed() -> str:
        batch_id = flow.need("batch_id")
        resp = op("get_batch").sync_detailed(batch_id, client=customer)
        check(int(resp.status_code) == 200, f"expected 200, got {describe(resp)}")
        raw = body_of(resp)
        check(raw.get("status") == "completed", f"status {raw.get('status')!r}")
        check(isinstance(resp.parsed, model("Batch")), f"200 not typed: parsed={resp.parsed!r}")
        b = resp.parsed
        check(str(b.status) == "completed", f"typed status {b.status}")
        check(b.counts.succeeded == 2, f"counts {b.counts}")
        check(all(str(i.status) == "succeeded" and i.result_url for i in b.items), "items")
        return f"completed, {b.counts.succeeded} succeeded"

    flow.step("get_batch after the worker -> completed, 2 succeeded", completed)

    # --- the remaining operations -------------------------------------------------------------
    def cancel() -> str:
        resp = op("create_batch").sync_detailed(client=customer, body=batch_request(["to cancel"]))
        raw = body_of(resp)
        check(int(resp.status_code) == 201 and raw.get("batch_id"), f"create: {describe(resp)}")
        resp = op("cancel_batch").sync_detailed(uuid.UUID(raw["batch_id"]), client=customer)
        check(int(resp.status_code) == 200, f"expected 200, got {describe(resp)}")
        check(body_of(resp).get("status") == "cancelled", f"status {body_of(resp).get('status')!r}")
        check(isinstance(resp.parsed, model("Batch")), f"200 not typed: parsed={resp.parsed!r}")
        check(str(resp.parsed.status) == "cancelled", f"typed status {resp.parsed.status}")
        return "cancelled"

    flow.step("cancel_batch -> 200 Batch cancelled", cancel)

    def claim_of(batch_id: str, n: int) -> list[dict]:
        r = worker.post("/claim", json={"worker_id": "sdk-flow-worker", "max_items": 100})
        check(r.status_code == 200, f"claim: HTTP {r.status_code} {r.text[:300]}")
        mine = [i for i in r.json()["items"] if i["batch_id"] == batch_id]
        check(len(mine) == n, f"claimed {len(mine)} of the batch's {n} items")
        return sorted(mine, key=lambda i: i["prompt"])

    def report(item: dict, what: str, body: dict) -> None:
        r = worker.post(f"/items/{item['item_id']}/{what}", json={"lease_token": item["lease_token"], **body})
        check(r.status_code == 200, f"{what}: HTTP {r.status_code} {r.text[:300]}")

    def retry_failed() -> str:
        resp = op("create_batch").sync_detailed(
            client=customer, body=batch_request(["a fails", "b renders"])
        )
        raw = body_of(resp)
        check(int(resp.status_code) == 201 and raw.get("batch_id"), f"create: {describe(resp)}")
        batch_id = raw["batch_id"]
        failing, rendering = claim_of(batch_id, 2)
        report(failing, "fail", {"error_code": "content_policy", "message": "refused"})
        report(rendering, "complete", {"result_url": "https://cdn.example.com/b.mp4"})
        resp = op("get_batch_errors").sync_detailed(uuid.UUID(batch_id), client=customer)
        check(int(resp.status_code) == 200, f"errors: expected 200, got {describe(resp)}")
        lines = [json.loads(line) for line in resp.content.decode().splitlines() if line]
        check(
            [(e["index"], e["error_code"], e["prompt"]) for e in lines] == [(0, "content_policy", "a fails")],
            f"errors export {lines}",
        )
        resp = op("retry_failed_items").sync_detailed(
            uuid.UUID(batch_id), client=customer, body=model("RetryFailedRequest")()
        )
        check(int(resp.status_code) == 201, f"retry: expected 201, got {describe(resp)}")
        check(isinstance(resp.parsed, model("BatchCreated")), f"201 not typed: parsed={resp.parsed!r}")
        check(resp.parsed.total_count == 1, f"total_count {resp.parsed.total_count}")
        retry_id = str(resp.parsed.batch_id)
        resp = op("get_batch").sync_detailed(uuid.UUID(retry_id), client=customer)
        b = resp.parsed
        check(isinstance(b, model("Batch")), f"200 not typed: parsed={resp.parsed!r}")
        check(str(b.retry_of) == batch_id, f"retry_of {b.retry_of}")
        check(b.items[0].original_index == 0 and b.items[0].prompt == "a fails", f"items {b.items}")
        # Render the retry, so that nothing stays held for the credits step.
        (again,) = claim_of(retry_id, 1)
        report(again, "complete", {"result_url": "https://cdn.example.com/a.mp4"})
        return f"errors export of 1 line; retry {retry_id} of 1 item, rendered"

    flow.step("get_batch_errors and retry_failed_items (a content_policy failure)", retry_failed)

    def credits() -> str:
        resp = op("get_credits").sync_detailed(client=customer)
        check(int(resp.status_code) == 200, f"expected 200, got {describe(resp)}")
        check(isinstance(resp.parsed, model("Credits")), f"200 not typed: parsed={resp.parsed!r}")
        c = resp.parsed
        check(c.available == c.balance - c.held, "available != balance - held")
        check(c.held == 0, f"held {c.held} after every batch is final")
        kinds = sorted({e.kind for e in c.ledger})
        return f"balance {c.balance}, held {c.held}, ledger kinds {kinds}"

    flow.step("get_credits -> 200 Credits (typed ledger)", credits)

    def usage() -> str:
        resp = op("get_usage").sync_detailed(client=customer)
        check(int(resp.status_code) == 200, f"expected 200, got {describe(resp)}")
        check(isinstance(resp.parsed, model("Usage")), f"200 not typed: parsed={resp.parsed!r}")
        check(sum(d.batches for d in resp.parsed.days) >= 2, f"days {resp.parsed.days}")
        return f"{len(resp.parsed.days)} day(s), {sum(d.calls for d in resp.parsed.days)} calls"

    flow.step("get_usage -> 200 Usage", usage)

    # --- webhooks: a rotation verified by the standardwebhooks library, then a resend -------
    hook_key = client_for(os.environ["HOOK_API_KEY"])
    received: list[tuple[dict, bytes]] = []
    arrived = threading.Condition()

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the handler's name is fixed)
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with arrived:
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                arrived.notify_all()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["HOOK_PORT"])), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def wait_received(n: int) -> list[tuple[dict, bytes]]:
        with arrived:
            arrived.wait_for(lambda: len(received) >= n, timeout=30)
            check(len(received) >= n, f"{len(received)} of {n} webhook deliveries arrived")
            return list(received)

    def rotation() -> str:
        from standardwebhooks.webhooks import Webhook, WebhookVerificationError

        resp = op("create_batch").sync_detailed(client=hook_key, body=batch_request(["hooked"]))
        raw = body_of(resp)
        check(int(resp.status_code) == 201 and raw.get("batch_id"), f"create: {describe(resp)}")
        (item,) = claim_of(raw["batch_id"], 1)
        report(item, "complete", {"result_url": "https://cdn.example.com/hooked.mp4"})
        headers, body = wait_received(1)[0]
        for name in ("HOOK_SECRET", "HOOK_OLD_SECRET"):
            event = Webhook(os.environ[name]).verify(body, headers)
            check(event["type"] == "batch.completed", f"event {event}")
            check(event["data"]["batch_id"] == raw["batch_id"], f"event {event}")
        try:
            Webhook("whsec_" + "B" * 43 + "=").verify(body, headers)
        except WebhookVerificationError:
            pass
        else:
            raise StepFailed("a delivery verified with a secret that never signed it")
        flow.state["hook_batch"] = raw["batch_id"]
        return f"batch.completed {headers['webhook-id']} verified with the new and the old secret"

    flow.step("webhook during a secret rotation verifies with both secrets (standardwebhooks)", rotation)

    def resend() -> str:
        batch_id = flow.need("hook_batch")
        # The receiver answered; the server records the attempt's outcome right after.
        deadline = time.monotonic() + 20
        while True:
            resp = op("list_webhook_deliveries").sync_detailed(client=hook_key)
            check(int(resp.status_code) == 200, f"list: expected 200, got {describe(resp)}")
            check(isinstance(resp.parsed, model("DeliveryList")), f"200 not typed: parsed={resp.parsed!r}")
            mine = [d for d in resp.parsed.data if str(d.batch_id) == batch_id]
            if (len(mine) == 1 and str(mine[0].status) == "delivered") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        check(len(mine) == 1 and str(mine[0].status) == "delivered", f"deliveries {resp.parsed.data}")
        delivery = mine[0]
        resp = op("resend_webhook_delivery").sync_detailed(
            delivery.delivery_id, client=hook_key, idempotency_key=f"resend-{uuid.uuid4().hex[:8]}"
        )
        check(int(resp.status_code) == 200, f"resend: expected 200, got {describe(resp)}")
        headers, _ = wait_received(2)[1]
        check(headers["webhook-id"] == delivery.webhook_id, f"resent as {headers['webhook-id']}")
        return f"resent {delivery.webhook_id} with the same webhook-id"

    flow.step("list_webhook_deliveries and resend_webhook_delivery (same webhook-id)", resend)

    total = flow.passed + len(flow.failed)
    print()
    if flow.failed:
        print("failed steps:")
        for name in flow.failed:
            print(f"  - {name}")
    print(f"sdk flow: {flow.passed} passed, {len(flow.failed)} failed, {flow.skipped} skipped of {total + flow.skipped}")
    print(f"{flow.passed} passed, {len(flow.failed)} failed")
    return 1 if flow.failed else 0


if __name__ == "__main__":
    sys.exit(main())
