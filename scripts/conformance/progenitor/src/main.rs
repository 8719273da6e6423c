//! A customer's flow through a Rust client that progenitor generated (with its default options)
//! from the committed customer document: create -> replay -> get -> list -> (a worker renders one
//! item and fails the other, over plain HTTP: the worker API is not in the customer document) ->
//! get -> results export -> error export -> retry-failed -> a typed 404. Exits 1 on the first
//! step that does not hold. Environment: BASE_URL, API_KEY, WORKER_SECRET.

mod client {
    include!(concat!(env!("OUT_DIR"), "/client.rs"));
}

use client::{Client, Error, types};
use futures::TryStreamExt;
use serde_json::{Value, json};
use std::{env, process::ExitCode};

type Step = Result<String, String>;

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

fn customer(base: &str, key: &str) -> Client {
    // What a customer writes: the key in the `x-api-key` header of every call.
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", key.parse().expect("header value"));
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client");
    Client::new_with_client(base, http)
}

fn request(prompts: &[&str], request_id: &str) -> types::CreateBatchRequest {
    let items = prompts
        .iter()
        .map(|p| types::BatchItemInput {
            prompt: (*p).parse().expect("prompt"),
            params: json!({"duration_s": 5}).as_object().cloned().unwrap(),
        })
        .collect();
    types::CreateBatchRequest {
        items,
        request_id: Some(request_id.parse().expect("request id")),
        metadata: json!({"campaign": "progenitor"})
            .as_object()
            .cloned()
            .unwrap(),
        completion_window: None,
        webhook_url: None,
    }
}

async fn lines(stream: client::ByteStream) -> Result<Vec<Value>, String> {
    let bytes: Vec<u8> = stream
        .into_inner()
        .map_ok(|b| b.to_vec())
        .try_concat()
        .await
        .map_err(|e| format!("reading the stream: {e}"))?;
    String::from_utf8(bytes)
        .map_err(|e| e.to_string())?
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("line {l:?}: {e}")))
        .collect()
}

struct Flow {
    api: Client,
    worker: reqwest::Client,
    base: String,
    secret: String,
    run: String,
    batch: Option<uuid::Uuid>,
}

impl Flow {
    /// `get_batch`, typed.
    async fn batch_of(&self, id: &uuid::Uuid) -> Result<types::Batch, String> {
        let r = self.api.get_batch(id).await.map_err(|e| e.to_string())?;
        Ok(r.into_inner())
    }

    async fn worker_call(&self, path: &str, body: Value) -> Result<Value, String> {
        let r = self
            .worker
            .post(format!("{}/api/internal/worker{path}", self.base))
            .bearer_auth(&self.secret)
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let text = r.text().await.map_err(|e| e.to_string())?;
        check(status == 200, || {
            format!("worker {path}: HTTP {status} {text}")
        })?;
        serde_json::from_str(&text).map_err(|e| e.to_string())
    }

    async fn create(&mut self) -> Step {
        let rid = format!("progenitor-{}", self.run);
        let body = request(&["a red fox at dawn", "a blue whale"], &rid);
        let r = self
            .api
            .create_batch(None, &body)
            .await
            .map_err(|e| e.to_string())?;
        check(r.status() == 201, || {
            format!("expected 201, got {}", r.status())
        })?;
        let created = r.into_inner();
        check(
            created.total_count == 2 && !created.idempotent_replay,
            || format!("{created:?}"),
        )?;
        self.batch = Some(created.batch_id);
        let again = self
            .api
            .create_batch(None, &body)
            .await
            .map_err(|e| e.to_string())?;
        check(again.status() == 200, || {
            format!("replay: expected 200, got {}", again.status())
        })?;
        let again = again.into_inner();
        check(
            again.idempotent_replay && again.batch_id == created.batch_id,
            || format!("replay {again:?}"),
        )?;
        Ok(format!(
            "created {} (2 items); the same request_id replays it",
            created.batch_id
        ))
    }

    async fn read(&self) -> Step {
        let id = self.batch.ok_or("no batch")?;
        let b = self.batch_of(&id).await?;
        check(b.counts.queued == 2 && b.items.len() == 2, || {
            format!("{b:?}")
        })?;
        let list = self
            .api
            .list_batches(None, Some(20.try_into().unwrap()), None)
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        check(list.data.iter().any(|s| s.batch_id == id), || {
            format!("list {list:?}")
        })?;
        Ok(format!(
            "get: {:?}, 2 queued; listed among {}",
            b.status,
            list.data.len()
        ))
    }

    async fn work(&self) -> Step {
        let id = self.batch.ok_or("no batch")?.to_string();
        let claimed = self
            .worker_call(
                "/claim",
                json!({"worker_id": "progenitor-flow", "max_items": 100}),
            )
            .await?;
        let mine: Vec<&Value> = claimed["items"]
            .as_array()
            .ok_or("no items")?
            .iter()
            .filter(|i| i["batch_id"] == id)
            .collect();
        check(mine.len() == 2, || format!("claimed {} of 2", mine.len()))?;
        let by_prompt = |p: &str| {
            mine.iter()
                .copied()
                .find(|i| i["prompt"] == p)
                .ok_or(format!("no {p}"))
        };
        let (fox, whale) = (by_prompt("a red fox at dawn")?, by_prompt("a blue whale")?);
        let lease = |i: &Value| i["lease_token"].clone();
        self.worker_call(
            &format!("/items/{}/complete", fox["item_id"].as_str().unwrap()),
            json!({"lease_token": lease(fox), "result_url": "https://cdn.example.com/fox.mp4"}),
        )
        .await?;
        self.worker_call(
            &format!("/items/{}/fail", whale["item_id"].as_str().unwrap()),
            json!({"lease_token": lease(whale), "error_code": "content_policy", "message": "refused"}),
        )
        .await?;
        Ok("rendered the fox, failed the whale with content_policy".into())
    }

    async fn finished(&self) -> Step {
        let id = self.batch.ok_or("no batch")?;
        let b = self.batch_of(&id).await?;
        check(b.counts.succeeded == 1 && b.counts.failed == 1, || {
            format!("counts {:?}", b.counts)
        })?;
        check(b.error_counts.get("content_policy") == Some(&1), || {
            format!("error_counts {:?}", b.error_counts)
        })?;
        Ok(format!(
            "{:?}: 1 succeeded, 1 failed (content_policy)",
            b.status
        ))
    }

    async fn exports(&self) -> Step {
        let id = self.batch.ok_or("no batch")?;
        let results = self
            .api
            .get_batch_results(&id)
            .await
            .map_err(|e| e.to_string())?;
        let results = lines(results.into_inner()).await?;
        let urls: Vec<&str> = results
            .iter()
            .filter_map(|l| l["result_url"].as_str())
            .collect();
        check(urls == ["https://cdn.example.com/fox.mp4"], || {
            format!("results {results:?}")
        })?;
        let errors = self
            .api
            .get_batch_errors(&id)
            .await
            .map_err(|e| e.to_string())?;
        let errors = lines(errors.into_inner()).await?;
        check(
            errors.len() == 1
                && errors[0]["error_code"] == "content_policy"
                && errors[0]["index"] == 1,
            || format!("errors {errors:?}"),
        )?;
        Ok(format!(
            "results export {} lines, error export 1 line",
            results.len()
        ))
    }

    async fn retry(&self) -> Step {
        let id = self.batch.ok_or("no batch")?;
        let body = types::RetryFailedRequest {
            include_expired: None,
            request_id: Some(
                format!("progenitor-retry-{}", self.run)
                    .parse()
                    .expect("id"),
            ),
        };
        let r = self
            .api
            .retry_failed_items(&id, None, &body)
            .await
            .map_err(|e| e.to_string())?;
        check(r.status() == 201, || {
            format!("expected 201, got {}", r.status())
        })?;
        let retry = r.into_inner();
        check(retry.total_count == 1, || format!("{retry:?}"))?;
        let b = self.batch_of(&retry.batch_id).await?;
        check(
            b.retry_of == Some(id) && b.items[0].prompt == "a blue whale",
            || format!("{b:?}"),
        )?;
        // Cancel it, so that nothing stays held.
        self.api
            .cancel_batch(&retry.batch_id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "retry {} holds the failed item; cancelled",
            retry.batch_id
        ))
    }

    async fn not_found(&self) -> Step {
        match self.api.get_batch(&uuid::Uuid::new_v4()).await {
            Err(Error::ErrorResponse(r)) => {
                // The batch is unknown, not the route.
                check(
                    r.status() == 404
                        && !r.ok
                        && r.error == types::ErrorCode::NotFound
                        && r.message != "no such route",
                    || format!("{} {:?} {:?}", r.status(), r.error, r.message),
                )?;
                Ok(format!("typed error body: {:?}: {}", r.error, r.message))
            }
            other => Err(format!("expected a typed 404, got {other:?}")),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let var = |k: &str| env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let base = var("BASE_URL");
    let mut flow = Flow {
        // The document's server is `/api/enterprise` on the host; progenitor takes the base URL
        // from the caller.
        api: customer(&format!("{base}/api/enterprise"), &var("API_KEY")),
        worker: reqwest::Client::new(),
        secret: var("WORKER_SECRET"),
        run: uuid::Uuid::new_v4().simple().to_string(),
        base,
        batch: None,
    };
    let (mut passed, mut failed) = (0, 0);
    macro_rules! step {
        ($name:expr, $call:expr) => {
            match $call.await {
                Ok(what) => {
                    passed += 1;
                    println!("PASS {}: {what}", $name);
                }
                Err(why) => {
                    failed += 1;
                    println!("FAIL {}: {why}", $name);
                }
            }
        };
    }
    step!("create_batch, then the same request_id", flow.create());
    step!("get_batch and list_batches", flow.read());
    step!("worker: claim, complete one, fail one (HTTP)", flow.work());
    step!("get_batch after the worker", flow.finished());
    step!(
        "get_batch_results and get_batch_errors (streams)",
        flow.exports()
    );
    step!("retry_failed_items", flow.retry());
    step!("get_batch of an unknown id -> typed 404", flow.not_found());
    println!(
        "progenitor flow: {passed} of {} steps held",
        passed + failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
