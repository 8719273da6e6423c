//! What a customer call gathers for its audit row and its quota headers, carried explicitly:
//! the audit layer makes a [`CallRecord`] for each call and puts it in the request's data; the
//! key check writes the key and the quota into it, the handlers the batch they touch, and the
//! create service (which receives it with its audit template) what it counted and wrote. The
//! response's error code travels on the response itself (its data), not here.
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::domain::quota::RateInfo;
use crate::domain::usage::UsageRow;

/// Facts gathered while the call runs.
#[derive(Debug, Default, Clone)]
pub struct CallState {
    /// Authenticated key.
    pub key_id: Option<i64>,
    /// The authenticated key's account.
    pub account_id: Option<i64>,
    /// Which of the key's secrets authenticated the call (`current` or `previous`).
    pub key_version: Option<&'static str>,
    /// Quota consulted for this call.
    pub rate: Option<RateInfo>,
    /// The quota of a call that creates a batch, counted late: by the create service (which
    /// receives it with the caller) in the batch's commit, else by the audit layer with the
    /// call's usage row.
    pub pending_quota: Option<PendingQuota>,
    /// The create service has consulted the pending quota (counted it, or failed trying): the
    /// audit layer does not count the call again.
    pub quota_consulted: bool,
    /// Batch touched.
    pub batch_id: Option<Uuid>,
    /// Items in the batch created.
    pub items: i32,
    /// Credits held by the call.
    pub credits: i64,
    /// The usage row was already written inside the create transaction.
    pub audited: bool,
}

/// One call's record, shared by the audit layer and what runs inside it.
#[derive(Debug, Default)]
pub struct CallRecord {
    state: Mutex<CallState>,
}

impl CallRecord {
    /// A copy of the gathered facts.
    pub fn snapshot(&self) -> CallState {
        self.state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Changes the gathered facts.
    pub fn update(&self, f: impl FnOnce(&mut CallState)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }
}

/// The record of the call `req` belongs to (none outside the customer API's audit layer).
pub fn of(req: &poem::Request) -> Option<&Arc<CallRecord>> {
    req.data::<Arc<CallRecord>>()
}

/// Changes the facts of `record`, when the call has one (a call outside the audit layer, or
/// a service run without HTTP, has none).
pub fn note(record: Option<&CallRecord>, f: impl FnOnce(&mut CallState)) {
    if let Some(r) = record {
        r.update(f);
    }
}

/// Notes on the call's record the batch the call is about.
pub fn note_batch(req: &poem::Request, batch_id: Uuid) {
    note(of(req).map(|r| &**r), |s| s.batch_id = Some(batch_id));
}

/// The quota a call that creates a batch counts against, counted in the same commit as what the
/// call writes: the batch (the create service, which receives it as an argument), or the
/// call's usage row when the create was refused before it counted (the audit layer).
#[derive(Debug, Clone)]
pub struct PendingQuota {
    /// The key's name (for the rejection metric).
    pub key_name: String,
    /// The quota scope.
    pub scope: &'static str,
    /// Calls allowed per window (the account's).
    pub limit: u32,
    /// When the call was authenticated: its window.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The key's own tighter quota, already counted (and within it) when the key has one.
    pub own: Option<RateInfo>,
}

/// The usage-row template and start time the audit layer hands to the create handler, which
/// writes the row in the create's own transaction.
#[derive(Clone)]
pub struct AuditTemplate(pub UsageRow, pub std::time::Instant);
