//! Why an item failed, in words a program can act on: the code a worker reports with a
//! failure, whether it is retried by default, and the codes a customer sees on items.
use poem_openapi::Enum;

/// The kind of failure a worker reports.
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
}

impl FailureCode {
    /// Every code, in the order of the documentation.
    pub const ALL: [FailureCode; 6] = [
        Self::ContentPolicy,
        Self::InvalidParams,
        Self::RenderTimeout,
        Self::WorkerLost,
        Self::ModelError,
        Self::Internal,
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
}

impl std::fmt::Display for FailureCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an item ended without a video, as a customer sees it: a worker's [`FailureCode`], or
/// `expired` when the batch's completion window ended before the item ran.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
pub enum ItemErrorCode {
    /// Refused by a content policy.
    ContentPolicy,
    /// The params cannot be rendered.
    InvalidParams,
    /// Rendering took too long, on every attempt.
    RenderTimeout,
    /// The worker went away, on every attempt.
    WorkerLost,
    /// The model failed on this prompt.
    ModelError,
    /// Something failed on our side, on every attempt.
    Internal,
    /// Still queued when the completion window ended.
    Expired,
}

impl From<FailureCode> for ItemErrorCode {
    fn from(c: FailureCode) -> Self {
        match c {
            FailureCode::ContentPolicy => Self::ContentPolicy,
            FailureCode::InvalidParams => Self::InvalidParams,
            FailureCode::RenderTimeout => Self::RenderTimeout,
            FailureCode::WorkerLost => Self::WorkerLost,
            FailureCode::ModelError => Self::ModelError,
            FailureCode::Internal => Self::Internal,
        }
    }
}

impl ItemErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::ContentPolicy => FailureCode::ContentPolicy.as_str(),
            Self::InvalidParams => FailureCode::InvalidParams.as_str(),
            Self::RenderTimeout => FailureCode::RenderTimeout.as_str(),
            Self::WorkerLost => FailureCode::WorkerLost.as_str(),
            Self::ModelError => FailureCode::ModelError.as_str(),
            Self::Internal => FailureCode::Internal.as_str(),
        }
    }

    /// The code an item shows: `expired` for an expired item, else its stored code (a code
    /// this release does not know reads as `internal`).
    pub fn of_item(status: entity::status::ItemState, stored: Option<&str>) -> Option<Self> {
        match status {
            entity::status::ItemState::Expired => Some(Self::Expired),
            _ => stored.map(|s| {
                FailureCode::from_name(s)
                    .unwrap_or(FailureCode::Internal)
                    .into()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_defaults_follow_the_contract() {
        for c in FailureCode::ALL {
            assert_eq!(FailureCode::from_name(c.as_str()), Some(c));
            assert_eq!(ItemErrorCode::from(c).as_str(), c.as_str());
        }
        let retried: Vec<_> = FailureCode::ALL
            .into_iter()
            .filter(|c| c.retryable_by_default())
            .map(FailureCode::as_str)
            .collect();
        assert_eq!(retried, ["render_timeout", "worker_lost", "internal"]);
    }
}
