//! Why an item failed, in words a program can act on: the code a worker reports with a
//! failure (or the service gives an item whose completion window ended), and whether a
//! failure of that kind is retried by default.
use poem_openapi::Enum;

/// Why an item ended without a video.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[oai(rename_all = "snake_case")]
pub enum FailureCode {
    /// The prompt or the video was refused by a content policy (not retried).
    ContentPolicy,
    /// The item's params cannot be rendered (not retried).
    InvalidParams,
    /// Rendering took longer than the renderer allows (retried).
    RenderTimeout,
    /// The worker went away mid-render; also what a lease that ran out records (retried).
    WorkerLost,
    /// The model failed on this prompt (not retried).
    ModelError,
    /// Something failed on the worker's side (retried).
    Internal,
    /// The item was still queued when its batch's completion window ended. Given by the
    /// service, never reported by a worker.
    Expired,
}

impl FailureCode {
    /// Every code, in the order of the documentation.
    pub const ALL: [FailureCode; 7] = [
        Self::ContentPolicy,
        Self::InvalidParams,
        Self::RenderTimeout,
        Self::WorkerLost,
        Self::ModelError,
        Self::Internal,
        Self::Expired,
    ];

    /// The stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ContentPolicy => "content_policy",
            Self::InvalidParams => "invalid_params",
            Self::RenderTimeout => "render_timeout",
            Self::WorkerLost => "worker_lost",
            Self::ModelError => "model_error",
            Self::Internal => "internal",
            Self::Expired => "expired",
        }
    }

    /// The code of a stored name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Whether a failure of this kind is tried again (while attempts remain) when the worker
    /// does not say: what another attempt can fix (a lost worker, a timeout, a fault of ours)
    /// is retried; what the same prompt would fail again (policy, params, the model) is not.
    pub fn retryable_by_default(self) -> bool {
        matches!(
            self,
            Self::RenderTimeout | Self::WorkerLost | Self::Internal
        )
    }

    /// The code an item shows: `expired` for an expired item, else its stored code (a code
    /// this release does not know reads as `internal`).
    pub fn of_item(status: entity::status::ItemState, stored: Option<&str>) -> Option<Self> {
        match status {
            entity::status::ItemState::Expired => Some(Self::Expired),
            _ => stored.map(|s| Self::from_name(s).unwrap_or(Self::Internal)),
        }
    }
}

impl std::fmt::Display for FailureCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_defaults_follow_the_contract() {
        for c in FailureCode::ALL {
            assert_eq!(FailureCode::from_name(c.as_str()), Some(c));
        }
        let retried: Vec<_> = FailureCode::ALL
            .into_iter()
            .filter(|c| c.retryable_by_default())
            .map(FailureCode::as_str)
            .collect();
        assert_eq!(retried, ["render_timeout", "worker_lost", "internal"]);
        assert_eq!(
            FailureCode::of_item(entity::status::ItemState::Expired, None),
            Some(FailureCode::Expired)
        );
        assert_eq!(
            FailureCode::of_item(entity::status::ItemState::Failed, Some("from_the_future")),
            Some(FailureCode::Internal)
        );
    }
}
