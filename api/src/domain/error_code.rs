//! The machine-readable error codes of the one error shape, and the HTTP status each one
//! means. A leaf: every layer may name a code.
use poem::http::StatusCode;
use poem_openapi::Enum;

/// Machine-readable error codes.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[oai(rename_all = "SCREAMING_SNAKE_CASE")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Missing, unknown or disabled credentials.
    Unauthorized,
    /// The client address is not in the key's allowlist.
    IpNotAllowed,
    /// The key's quota for this minute is used up.
    RateLimitExceeded,
    /// The wallet cannot cover the batch.
    InsufficientCredits,
    /// The request id was used with a different request.
    IdempotencyConflict,
    /// The request is malformed or breaks a rule.
    ValidationError,
    /// More items than the key's batch cap.
    BatchTooLarge,
    /// The body is larger than the server accepts.
    PayloadTooLarge,
    /// No such resource (or route).
    NotFound,
    /// The lease token is stale or the item is already final.
    LeaseLost,
    /// The request conflicts with the resource's state.
    Conflict,
    /// The key's scopes do not include what the operation needs.
    ForbiddenScope,
    /// Something failed on our side.
    Internal,
    /// The store failed (disk full, I/O error, database unreachable, timeout): nothing was
    /// stored, and a retry with the same request id is safe.
    StoreUnavailable,
}

impl ErrorCode {
    /// The wire name, e.g. `RATE_LIMIT_EXCEEDED`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::IpNotAllowed => "IP_NOT_ALLOWED",
            ErrorCode::RateLimitExceeded => "RATE_LIMIT_EXCEEDED",
            ErrorCode::InsufficientCredits => "INSUFFICIENT_CREDITS",
            ErrorCode::IdempotencyConflict => "IDEMPOTENCY_CONFLICT",
            ErrorCode::ValidationError => "VALIDATION_ERROR",
            ErrorCode::BatchTooLarge => "BATCH_TOO_LARGE",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::LeaseLost => "LEASE_LOST",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::ForbiddenScope => "FORBIDDEN_SCOPE",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::StoreUnavailable => "STORE_UNAVAILABLE",
        }
    }

    /// The default HTTP status of the code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::IpNotAllowed | ErrorCode::ForbiddenScope => StatusCode::FORBIDDEN,
            ErrorCode::RateLimitExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::InsufficientCredits => StatusCode::PAYMENT_REQUIRED,
            ErrorCode::IdempotencyConflict | ErrorCode::LeaseLost | ErrorCode::Conflict => {
                StatusCode::CONFLICT
            }
            ErrorCode::ValidationError | ErrorCode::BatchTooLarge => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}
