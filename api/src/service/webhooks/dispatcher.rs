//! The dispatcher: claims due deliveries, sends them, records each attempt.
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use entity::webhook_delivery;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use tokio::task::JoinSet;

use super::signing::{decode_whsec, sign, webhook_id};
use super::target_guard::check_target;

use crate::domain::ids::AccountId;
use crate::state::{AppState, Runtime};
use crate::store::webhooks;

/// The outcome of one HTTP attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// HTTP status, when a response came.
    pub status: Option<u16>,
    /// Transport or policy error.
    pub error: Option<String>,
    /// What kind of failure: `dns`, `connect`, `timeout`, `tls`, `refused_target`, `http`,
    /// `config` (None on success).
    pub kind: Option<&'static str>,
    /// The first 1 KB of the answer's body, when one came.
    pub excerpt: Option<String>,
    /// Seconds asked by `Retry-After`.
    pub retry_after: Option<u64>,
    /// Whether retrying can help (false for refused targets and 410).
    pub retryable: bool,
    /// Time spent.
    pub duration_ms: i64,
    /// The endpoint did not answer in time (or could not be reached): counts toward its backoff.
    pub timed_out: bool,
}

/// Clients kept for reuse at most; beyond it the cache starts over.
const MAX_CLIENTS: usize = 1024;

type ClientKey = (String, Vec<SocketAddr>, Duration);

/// One long-lived client per target (host, the addresses the guard checked, timeout): its
/// connections are kept alive and reused across deliveries (HTTP/2 where the receiver offers
/// it), and it can only ever connect to the checked addresses. A name that resolves elsewhere
/// later gets a client of its own.
fn client_for(
    host: &str,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    static CLIENTS: std::sync::OnceLock<std::sync::Mutex<HashMap<ClientKey, reqwest::Client>>> =
        std::sync::OnceLock::new();
    let mut sorted = addrs.to_vec();
    sorted.sort();
    let key = (host.to_string(), sorted, timeout);
    let cache = CLIENTS.get_or_init(Default::default);
    if let Some(c) = cache.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(c);
    }
    let client = builder(host, addrs, timeout).build()?;
    if let Ok(mut m) = cache.lock() {
        if m.len() >= MAX_CLIENTS {
            m.clear();
        }
        m.insert(key, client.clone());
    }
    Ok(client)
}

/// The settings of every webhook client: no proxy, no redirect, the delivery's deadline and the
/// connect deadline, connections only to the checked addresses, HTTP/2 when the receiver offers
/// it (ALPN), kept-alive connections.
fn builder(host: &str, addrs: &[SocketAddr], timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        // Proxy variables would resolve the target elsewhere and bypass the pinning below.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(CONNECT_TIMEOUT))
        .resolve_to_addrs(host, addrs)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!(
            "video-batch-api-webhooks/",
            env!("CARGO_PKG_VERSION")
        ))
}

/// Signs and sends one attempt of a delivery.
pub async fn send(runtime: &Runtime, d: &webhook_delivery::Model) -> Attempt {
    let started = std::time::Instant::now();
    let settings = &runtime.settings.webhooks;
    let done = |status: Option<u16>,
                error: Option<String>,
                retry_after: Option<u64>,
                retryable: bool| Attempt {
        kind: error.as_ref().map(|_| "config"),
        status,
        error,
        excerpt: None,
        retry_after,
        retryable,
        duration_ms: started.elapsed().as_millis() as i64,
        timed_out: false,
    };
    let Some(key) = runtime.accounts.get(&d.api_key_id) else {
        return done(
            None,
            Some("the account is no longer configured".into()),
            None,
            false,
        );
    };
    let Some(secret) = &key.policy.webhook_secret else {
        return done(
            None,
            Some("the account has no webhook_secret".into()),
            None,
            false,
        );
    };
    let (host, addrs) = match check_target(&d.target_url, settings.allow_private_targets).await {
        Ok(t) => t,
        Err(e) if e.contains("timed out") => {
            let mut a = done(None, Some(e), None, true);
            a.timed_out = true;
            a.kind = Some("dns");
            return a;
        }
        Err(e) => {
            // A name that does not resolve (yet) may resolve on a later try; a target
            // refused by policy (a private address, a bad URL) never will.
            let kind = if e.starts_with("cannot resolve") || e.ends_with("resolves to no address") {
                "dns"
            } else {
                "refused_target"
            };
            let mut a = done(None, Some(e), None, kind == "dns");
            a.kind = Some(kind);
            return a;
        }
    };
    let msg_id = webhook_id(d.id);
    let ts = Utc::now().timestamp();
    let mut signatures = Vec::new();
    // During a rotation both secrets sign (receivers verify with either), until the previous
    // one expires.
    let previous = key.policy.webhook_previous_secret.as_ref().filter(|_| {
        key.policy
            .webhook_previous_secret_expires_at
            .is_none_or(|until| Utc::now() < until)
    });
    for s in std::iter::once(secret).chain(previous) {
        match decode_whsec(s.expose()) {
            Ok(k) => signatures.push(sign(&k, &msg_id, ts, &d.payload)),
            Err(e) => return done(None, Some(format!("webhook secret: {e}")), None, false),
        }
    }
    let client = match client_for(&host, &addrs, settings.timeout) {
        Ok(c) => c,
        Err(e) => return done(None, Some(format!("client: {e}")), None, true),
    };
    let resp = client
        .post(&d.target_url)
        .header("content-type", "application/json")
        .header("webhook-id", &msg_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signatures.join(" "))
        .body(d.payload.clone())
        .send()
        .await;
    match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let success = r.status().is_success();
            let excerpt = excerpt(r).await;
            let mut a = if success {
                done(Some(status), None, None, true)
            } else {
                let mut a = done(
                    Some(status),
                    Some(format!("HTTP {status}")),
                    retry_after,
                    status != 410,
                );
                a.kind = Some("http");
                a
            };
            a.excerpt = excerpt;
            a
        }
        Err(e) => {
            let mut a = done(None, Some(format!("request failed: {e}")), None, true);
            a.timed_out = e.is_timeout() || e.is_connect();
            a.kind = Some(transport_kind(&e));
            a
        }
    }
}

/// The most of an answer's body an attempt keeps.
const EXCERPT_BYTES: usize = 1024;

/// The first [`EXCERPT_BYTES`] of an answer's body (the rest is not read).
async fn excerpt(mut r: reqwest::Response) -> Option<String> {
    let mut body = Vec::new();
    while body.len() < EXCERPT_BYTES {
        match r.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c),
            _ => break,
        }
    }
    body.truncate(EXCERPT_BYTES);
    (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned())
}

/// The kind of a failed request: `timeout`, `tls`, `connect`, or `request`.
fn transport_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        return "timeout";
    }
    let mut chain = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        chain.push_str(&s.to_string().to_ascii_lowercase());
        source = s.source();
    }
    if chain.contains("certificate") || chain.contains("tls") || chain.contains("handshake") {
        "tls"
    } else if e.is_connect() {
        "connect"
    } else {
        "request"
    }
}

/// Leases due deliveries to this dispatcher: one statement marks the attempt, so two
/// dispatchers (on any nodes) never send the same attempt. Deliveries to `skip_targets` are
/// left in the outbox (their endpoints have no room), and so are those of `skip_keys` (the
/// keys have all they may send now).
pub async fn claim_due(
    db: &DatabaseConnection,
    limit: u32,
    lock_for: std::time::Duration,
    skip_targets: &[String],
    skip_keys: &[i64],
) -> Result<Vec<webhook_delivery::Model>, DbErr> {
    let now = Utc::now();
    let until = now + chrono::Duration::from_std(lock_for).unwrap_or(chrono::Duration::seconds(60));
    webhooks::lease_due(db, u64::from(limit), now, until, skip_targets, skip_keys).await
}

/// The most target URLs (and keys) a claim leaves out (the statement stays small).
const MAX_SKIPPED_TARGETS: usize = 64;

/// Claimed deliveries waiting in memory, per key.
fn queued_by_key(
    waiting: &HashMap<String, VecDeque<webhook_delivery::Model>>,
) -> HashMap<i64, usize> {
    let mut queued = HashMap::new();
    for d in waiting.values().flatten() {
        *queued.entry(d.api_key_id).or_default() += 1;
    }
    queued
}

/// Keys that can take nothing more now: all their slots busy and more than half a slot's
/// worth each already waiting here. A claim leaves their deliveries in the outbox, so one
/// key with many endpoints costs the other keys neither slots nor claims.
fn full_keys(endpoints: &Endpoints, queued: &HashMap<i64, usize>, per_key: usize) -> Vec<i64> {
    let mut keys: Vec<i64> = endpoints
        .by_key
        .iter()
        .filter(|(k, n)| **n >= per_key && queued.get(*k).copied().unwrap_or(0) > per_key / 2)
        .map(|(k, _)| *k)
        .collect();
    keys.sort_unstable();
    keys.truncate(MAX_SKIPPED_TARGETS);
    keys
}

/// Target URLs of the endpoints that can take nothing more now: every slot busy and their
/// waiting queue full. A claim leaves their deliveries in the outbox instead of leasing them
/// only to give them back, so a stuck endpoint costs the others no claims.
fn full_targets(
    endpoints: &Endpoints,
    waiting: &HashMap<String, VecDeque<webhook_delivery::Model>>,
) -> Vec<String> {
    let mut urls: Vec<String> = waiting
        .iter()
        .filter(|(ep, q)| q.len() >= PER_ENDPOINT && !endpoints.has_slot(ep))
        .flat_map(|(_, q)| q.iter().map(|d| d.target_url.clone()))
        .collect();
    urls.sort_unstable();
    urls.dedup();
    urls.truncate(MAX_SKIPPED_TARGETS);
    urls
}

fn jittered(d: std::time::Duration) -> chrono::Duration {
    use rand::Rng;
    let ms = d.as_millis() as i64;
    let spread = ms / 10;
    let j = if spread > 0 {
        rand::rng().random_range(-spread..=spread)
    } else {
        0
    };
    chrono::Duration::milliseconds(ms + j)
}

/// Records an attempt and schedules the next one (or ends the delivery).
pub async fn record_attempt<C: ConnectionTrait>(
    txn: &C,
    runtime: &Runtime,
    d: &webhook_delivery::Model,
    a: &Attempt,
) -> Result<&'static str, DbErr> {
    let now = Utc::now();
    let schedule = &runtime.settings.webhooks.retry_schedule;
    let success = a.status.is_some_and(|s| (200..300).contains(&s));
    let retries_used = (d.attempt_count - 1).max(0) as usize;
    let (status, next) = if success {
        ("succeeded", now)
    } else if !a.retryable || retries_used >= schedule.len() {
        ("failed", now)
    } else {
        let mut delay = jittered(schedule[retries_used]);
        if let Some(ra) = a.retry_after {
            delay = delay.max(chrono::Duration::seconds(ra.min(86_400) as i64));
        }
        ("pending", now + delay)
    };
    let row = webhooks::AttemptRow {
        status_code: a.status,
        error: a.error.as_deref(),
        kind: a.kind,
        excerpt: a.excerpt.as_deref(),
        duration_ms: a.duration_ms,
    };
    webhooks::record_attempt(txn, d, &row, webhooks::Next { status, at: next }, now).await?;
    // The endpoint's state: a success clears its failing run; a run of failures longer than
    // `webhooks.disable_after` disables it and holds its pending deliveries.
    let disable_after = chrono::Duration::from_std(runtime.settings.webhooks.disable_after)
        .unwrap_or(chrono::Duration::days(5));
    if webhooks::note_endpoint(
        txn,
        AccountId(d.api_key_id),
        &d.target_url,
        success,
        now,
        disable_after,
    )
    .await?
    {
        tracing::warn!(
            key_id = d.api_key_id, url = %d.target_url,
            "webhook endpoint disabled: every delivery failed for webhooks.disable_after"
        );
        metrics::counter!("webhook_endpoints_disabled_total").increment(1);
    }
    Ok(status)
}

/// The most deliveries sent to one endpoint (host and port) at once, across this dispatcher;
/// as many more may wait for it in memory (still leased), the rest stay in the outbox.
pub const PER_ENDPOINT: usize = 16;
/// Consecutive timeouts after which an endpoint backs off.
const BACKOFF_AFTER: u32 = 3;
/// Connecting may take this long at most (less when the request timeout is shorter).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// This dispatcher's view of each endpoint: attempts in flight, and a backoff after a run of
/// timeouts. A slow or dead endpoint fills only its own few slots and then waits on its own;
/// other endpoints' deliveries are claimed and sent meanwhile. Attempts in flight are counted
/// per key too: a key's slots span all its endpoints (`webhooks.per_key_concurrency`).
#[derive(Default)]
struct Endpoints {
    in_flight: HashMap<String, usize>,
    by_key: HashMap<i64, usize>,
    /// Per endpoint: timeouts in a row, the end of its backoff, and backoffs so far.
    timeouts: HashMap<String, (u32, Instant, u32)>,
}

impl Endpoints {
    /// Until when `ep` backs off after a run of timeouts, if it does.
    fn backing_off(&self, ep: &str) -> Option<Instant> {
        self.timeouts
            .get(ep)
            .filter(|(n, until, _)| *n >= BACKOFF_AFTER && *until > Instant::now())
            .map(|(_, until, _)| *until)
    }

    /// A send to `ep` may start now.
    fn has_slot(&self, ep: &str) -> bool {
        self.in_flight.get(ep).copied().unwrap_or(0) < PER_ENDPOINT
    }

    /// A send of `key` may start now, as far as the key's own cap goes.
    fn key_has_slot(&self, key: i64, per_key: usize) -> bool {
        self.by_key.get(&key).copied().unwrap_or(0) < per_key
    }

    fn started(&mut self, ep: &str, key: i64) {
        *self.in_flight.entry(ep.to_string()).or_default() += 1;
        *self.by_key.entry(key).or_default() += 1;
    }

    fn finished(&mut self, ep: &str, key: i64, timed_out: bool) {
        if let Some(n) = self.in_flight.get_mut(ep) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(ep);
            }
        }
        if let Some(n) = self.by_key.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_key.remove(&key);
            }
        }
        if timed_out {
            let entry = self
                .timeouts
                .entry(ep.to_string())
                .or_insert((0, Instant::now(), 0));
            entry.0 += 1;
            let now = Instant::now();
            if entry.0 >= BACKOFF_AFTER && entry.1 <= now {
                // 5 s, 10 s, 20 s … up to 5 minutes, one step per backoff: attempts already in
                // flight when a backoff began fail without lengthening it.
                entry.1 = now + std::time::Duration::from_secs(5u64 << entry.2.min(6));
                entry.2 += 1;
                tracing::warn!(endpoint = %ep, timeouts = entry.0, "webhook endpoint backs off");
            }
        } else {
            self.timeouts.remove(ep);
        }
    }
}

/// The endpoint of a target URL: host and port.
fn endpoint_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}",
            u.host_str().unwrap_or_default().to_ascii_lowercase(),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => url.to_string(),
    }
}

/// Gives a claimed delivery back without counting an attempt, due again at `at`.
/// Gives several claimed deliveries back in one transaction (one commit), each due at its own
/// time.
async fn defer_all(
    db: &DatabaseConnection,
    back: &[(webhook_delivery::Model, chrono::DateTime<Utc>)],
) -> Result<(), DbErr> {
    if back.is_empty() {
        return Ok(());
    }
    let txn = crate::db::begin_write(db).await?;
    for (d, at) in back {
        webhooks::give_back(&txn, d, *at).await?;
    }
    txn.commit().await
}

/// A finished send: its endpoint, the delivery and what happened.
type Sent = (String, webhook_delivery::Model, Attempt);

/// Records an attempt (through the write pipeline, committed with others) and logs it. Runs
/// after the endpoint's slot is free again: a slow commit never holds a send slot.
async fn record(state: Arc<AppState>, d: webhook_delivery::Model, attempt: Attempt) {
    let result = match attempt.status {
        Some(s) if (200..300).contains(&s) => "success",
        Some(_) => "http_error",
        None if attempt.retryable => "transport_error",
        None => "refused",
    };
    metrics::counter!("webhook_attempts_total", "result" => result).increment(1);
    let runtime = state.runtime();
    let recorded = {
        let (d, attempt) = (d.clone(), attempt.clone());
        state
            .writes
            .run(Some(d.api_key_id), move |txn| {
                let (runtime, d, attempt) = (Arc::clone(&runtime), d.clone(), attempt.clone());
                Box::pin(async move { Ok(record_attempt(txn, &runtime, &d, &attempt).await?) })
            })
            .await
    };
    match recorded {
        Ok(outcome) => tracing::info!(
            webhook_id = %webhook_id(d.id), event = %d.event_type, attempt = d.attempt_count,
            status = ?attempt.status, error = ?attempt.error, outcome, "webhook attempt"
        ),
        Err(e) => tracing::error!(error = %e, "recording webhook attempt failed"),
    }
}

/// Sends due deliveries until `stop` is notified: up to `webhooks.concurrency` at once, at most
/// [`PER_ENDPOINT`] per endpoint and `webhooks.per_key_concurrency` per key, each send on its own (a slow one never holds the others), new
/// deliveries claimed as soon as a slot frees. When `stop` is notified it claims nothing more
/// and waits for the sends in flight.
pub async fn run_dispatcher(state: Arc<AppState>, stop: Arc<tokio::sync::Notify>) {
    tracing::info!("webhook dispatcher started");
    let mut sends: JoinSet<Sent> = JoinSet::new();
    let mut records: JoinSet<()> = JoinSet::new();
    let mut endpoints = Endpoints::default();
    // Claimed deliveries waiting for a slot of their endpoint (still leased to this node).
    let mut waiting: HashMap<String, VecDeque<webhook_delivery::Model>> = HashMap::new();
    // Endpoints the last claim found with no room left, and when that claim ran (see below).
    let mut full: std::collections::HashSet<String> = Default::default();
    // The last claim gave deliveries back because their key had no room: claim at most one
    // key's worth next, so that a busy key's backlog is not leased and given back per send.
    let mut key_was_full = false;
    let mut last_claim = Instant::now();
    let spawn = |sends: &mut JoinSet<Sent>,
                 endpoints: &mut Endpoints,
                 ep: String,
                 d: webhook_delivery::Model| {
        endpoints.started(&ep, d.api_key_id);
        let runtime = state.runtime();
        sends.spawn(async move {
            let attempt = send(&runtime, &d).await;
            (ep, d, attempt)
        });
    };
    let finished = |done: Result<Sent, tokio::task::JoinError>,
                    endpoints: &mut Endpoints,
                    records: &mut JoinSet<()>| {
        if let Ok((ep, d, attempt)) = done {
            endpoints.finished(&ep, d.api_key_id, attempt.timed_out);
            records.spawn(record(Arc::clone(&state), d, attempt));
        }
    };
    loop {
        while let Some(done) = sends.try_join_next() {
            finished(done, &mut endpoints, &mut records);
        }
        // A customer says these endpoints are back: no backoff for them.
        for url in state
            .webhook_back
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
        {
            endpoints.timeouts.remove(&endpoint_of(&url));
        }
        while records.try_join_next().is_some() {}
        let runtime = state.runtime();
        let settings = &runtime.settings.webhooks;
        let concurrency = settings.concurrency as usize;
        let per_key = settings.per_key_concurrency as usize;
        // How often an idle dispatcher looks for deliveries other nodes committed (its own
        // node's commits wake it at once). An empty look is one indexed statement that changes
        // nothing.
        let poll = settings.poll;
        // Waiting deliveries go first, as their endpoints and keys free up (in order, passing
        // over those whose key has no slot).
        for (ep, queue) in waiting.iter_mut() {
            while sends.len() < concurrency && endpoints.has_slot(ep) {
                let Some(d) = queue
                    .iter()
                    .position(|d| endpoints.key_has_slot(d.api_key_id, per_key))
                    .and_then(|i| queue.remove(i))
                else {
                    break;
                };
                spawn(&mut sends, &mut endpoints, ep.clone(), d);
            }
        }
        waiting.retain(|_, q| !q.is_empty());
        let held = sends.len() + waiting.values().map(VecDeque::len).sum::<usize>();
        let mut room = (2 * concurrency).saturating_sub(held);
        // After a claim met a full endpoint, claim again only once such an endpoint's queue
        // has half drained (or a poll interval has passed, so that a stuck endpoint delays
        // the others by that much at most), and at most one endpoint's worth: claims stay
        // batches (one commit for many deliveries) instead of a claim and a give-back per
        // finished send.
        if !full.is_empty() {
            let drained = full
                .iter()
                .any(|ep| waiting.get(ep).map_or(0, VecDeque::len) <= PER_ENDPOINT / 2);
            if drained || last_claim.elapsed() >= poll {
                room = room.min(PER_ENDPOINT);
            } else {
                room = 0;
            }
        }
        if key_was_full {
            room = room.min(per_key.max(1));
        }
        // Claimed deliveries that were started or queued (not given back).
        let mut taken = 0;
        if room > 0 && sends.len() < concurrency {
            let lock_for = settings.timeout * 2 + std::time::Duration::from_secs(30);
            last_claim = Instant::now();
            let skip = full_targets(&endpoints, &waiting);
            let mut queued = queued_by_key(&waiting);
            let skip_keys = full_keys(&endpoints, &queued, per_key);
            match claim_due(&state.writer, room as u32, lock_for, &skip, &skip_keys).await {
                Ok(batch) => {
                    full.clear();
                    key_was_full = false;
                    let mut back = Vec::new();
                    for d in batch {
                        let ep = endpoint_of(&d.target_url);
                        let key = d.api_key_id;
                        let key_queued = queued.get(&key).copied().unwrap_or(0);
                        let later = match endpoints.backing_off(&ep) {
                            Some(until) => until,
                            None if sends.len() < concurrency
                                && endpoints.has_slot(&ep)
                                && endpoints.key_has_slot(key, per_key) =>
                            {
                                spawn(&mut sends, &mut endpoints, ep, d);
                                taken += 1;
                                continue;
                            }
                            // The endpoint has all it can take: the rest stays in the outbox.
                            None if waiting.get(&ep).map_or(0, VecDeque::len) >= PER_ENDPOINT => {
                                full.insert(ep);
                                Instant::now() + poll
                            }
                            None if key_queued < per_key => {
                                waiting.entry(ep).or_default().push_back(d);
                                queued.insert(key, key_queued + 1);
                                taken += 1;
                                continue;
                            }
                            // The key has all it can take (its slots, and as many waiting): the
                            // rest goes back, and claims pass the key over while it is full.
                            None => {
                                key_was_full = true;
                                Instant::now() + poll
                            }
                        };
                        let at = Utc::now()
                            + chrono::Duration::from_std(later - Instant::now())
                                .unwrap_or_default();
                        back.push((d, at));
                    }
                    if let Err(e) = defer_all(&state.writer, &back).await {
                        tracing::warn!(error = %e, "deferring webhook deliveries failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "claiming webhook deliveries failed"),
            }
        }
        if futures::FutureExt::now_or_never(stop.notified()).is_some() {
            break;
        }
        if taken > 0 && sends.len() < concurrency {
            // More may be due right now: claim again before waiting.
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            Some(done) = sends.join_next(), if !sends.is_empty() => {
                finished(done, &mut endpoints, &mut records);
            }
            // Events committed on this node wake the dispatcher at once; other nodes' events
            // are found by this short poll.
            _ = state.webhook_wakeup.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = stop.notified() => break,
        }
    }
    // No new claims from here on. Deliveries still waiting go back to the outbox for any node;
    // the sends in flight finish (the caller bounds the wait).
    let now = Utc::now();
    let back: Vec<_> = waiting.into_values().flatten().map(|d| (d, now)).collect();
    if let Err(e) = defer_all(&state.writer, &back).await {
        tracing::warn!(error = %e, "giving back webhook deliveries failed");
    }
    while let Some(done) = sends.join_next().await {
        finished(done, &mut endpoints, &mut records);
    }
    while records.join_next().await.is_some() {}
    tracing::info!("webhook dispatcher stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn retry_delays_are_jittered_by_at_most_a_tenth_either_way() {
        let base = Duration::from_secs(300);
        let delays: Vec<i64> = (0..2_000)
            .map(|_| jittered(base).num_milliseconds())
            .collect();
        assert!(
            delays.iter().all(|d| (270_000..=330_000).contains(d)),
            "{:?}",
            (delays.iter().min(), delays.iter().max())
        );
        // Spread over the whole band (not a constant, not one side only), so that deliveries
        // failing together do not retry together.
        let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(*min < 276_000 && *max > 324_000, "spread {min}..{max}");
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 1_000, "{} distinct delays", distinct.len());
        assert_eq!(jittered(Duration::ZERO), chrono::Duration::zero());
    }

    /// A receiver that reads one request and answers 204; it reports the request's first line.
    async fn one_shot_receiver() -> (SocketAddr, tokio::sync::oneshot::Receiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            s.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            let _ = tx.send(text.lines().next().unwrap_or_default().to_string());
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn the_request_goes_only_to_the_addresses_the_guard_checked() {
        // `.invalid` never resolves (RFC 6761): the request can only arrive if the sender
        // connects to the checked address without asking DNS again, so a name rebound to a
        // private address after the check is never reached.
        let (addr, first_line) = one_shot_receiver().await;
        let client = client_for("hooks.rebind.invalid", &[addr], Duration::from_secs(10)).unwrap();
        let resp = client
            .post(format!("http://hooks.rebind.invalid:{}/hook", addr.port()))
            .body("{}")
            .send()
            .await
            .expect("sent to the pinned address");
        assert_eq!(resp.status().as_u16(), 204);
        assert_eq!(first_line.await.unwrap(), "POST /hook HTTP/1.1");
        // Another port of the same host is not pinned: it would need DNS, and `.invalid` fails.
        let err = client
            .post("http://hooks.rebind.invalid:1/hook")
            .send()
            .await
            .expect_err("unpinned");
        assert!(err.is_connect() || err.is_request(), "{err:?}");
    }

    #[tokio::test]
    async fn a_connect_that_hangs_is_given_up_at_the_connect_deadline() {
        // A listener whose accept queue is full: the kernel drops further SYNs, so a connect
        // neither succeeds nor fails until the client gives up.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            match tokio::time::timeout(
                Duration::from_millis(300),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => fillers.push(s),
                _ => break,
            }
        }
        // The delivery's own timeout is long; the connect deadline is what ends the attempt.
        let client = client_for("hooks.example.test", &[addr], Duration::from_secs(60)).unwrap();
        let started = Instant::now();
        let err = client
            .post(format!("http://hooks.example.test:{}/hook", addr.port()))
            .send()
            .await
            .expect_err("the connect hangs");
        let took = started.elapsed();
        assert!(err.is_connect() || err.is_timeout(), "{err:?}");
        assert!(matches!(transport_kind(&err), "timeout" | "connect"));
        assert!(
            took >= CONNECT_TIMEOUT - Duration::from_millis(200) && took < Duration::from_secs(30),
            "gave up after {took:?}"
        );
        drop((listener, fillers));
    }

    #[tokio::test]
    async fn a_receiver_that_offers_http2_is_sent_http2() {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use tokio_rustls::rustls;
        // A TLS receiver for `hooks.h2.test` that offers h2 and HTTP/1.1 (ALPN), as most do.
        let cert = rcgen::generate_simple_self_signed(vec!["hooks.h2.test".to_string()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            // The receiver answers with the protocol the request came in.
                            let version = format!("{:?}", req.version());
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(hyper::body::Bytes::from(version)),
                            ))
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        // The sender's own client settings, trusting this receiver's certificate.
        let trusted = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
        let client = builder("hooks.h2.test", &[addr], Duration::from_secs(10))
            .add_root_certificate(trusted)
            .build()
            .unwrap();
        for _ in 0..2 {
            let resp = client
                .post(format!("https://hooks.h2.test:{}/hook", addr.port()))
                .body("{}")
                .send()
                .await
                .expect("sent over TLS");
            assert_eq!(resp.version(), reqwest::Version::HTTP_2);
            assert_eq!(resp.text().await.unwrap(), "HTTP/2.0");
        }
    }
}
