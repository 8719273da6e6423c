//! The one error shape of every API: `ApiError` in code, `ErrorBody` on the wire.
use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaResponses, Registry};
use poem_openapi::{ApiResponse, Object};
use serde_json::{Value, json};

use crate::context;
pub use crate::domain::error_code::ErrorCode;

impl From<crate::domain::Invalid> for ApiError {
    fn from(e: crate::domain::Invalid) -> Self {
        ApiError::validation(&e.field, e.message)
    }
}

/// The body of every error response.
#[derive(Object, Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// Always `false`.
    pub ok: bool,
    // Machine-readable code.
    pub error: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
    /// The call's request id: the create's `request_id` when given, else `x-request-id`.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Structured facts about the error (limits, amounts, fields).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// An error returned by a handler or service, rendered as `ErrorBody`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The code.
    pub code: ErrorCode,
    /// The HTTP status (usually `code.status()`).
    pub status: StatusCode,
    /// Text for the client.
    pub message: String,
    /// Optional details object (boxed: errors travel in `Result`s).
    pub details: Option<Box<Value>>,
    /// Extra response headers (e.g. `Retry-After`).
    pub headers: Vec<(&'static str, String)>,
    /// A transient database conflict (deadlock, serialization failure): the same work may
    /// simply be run again.
    pub transient: bool,
    /// The store failed (`503 STORE_UNAVAILABLE`): nothing of the call was stored.
    pub fault: Option<crate::fault::Fault>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// An error with the code's usual status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            status: code.status(),
            message: message.into(),
            details: None,
            headers: Vec::new(),
            transient: false,
            fault: None,
        }
    }

    /// Adds a details object.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(Box::new(details));
        self
    }

    /// Overrides the HTTP status.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    /// 404 for a resource, named by kind and id.
    pub fn not_found(kind: &str, id: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::NotFound, format!("{kind} {id} not found"))
    }

    /// 422 naming the field.
    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::new(ErrorCode::ValidationError, format!("{field}: {message}"))
            .with_details(json!({ "field": field }))
    }

    /// 409 LEASE_LOST.
    pub fn lease_lost(item: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorCode::LeaseLost,
            format!("lease of item {item} is no longer held by this token"),
        )
    }

    /// 500: logs the cause, shows the client a generic text.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            ErrorCode::Internal,
            "internal error; the request id identifies it in our logs",
        )
    }

    /// 503 STORE_UNAVAILABLE with `Retry-After`: the store failed and the call was not stored.
    pub fn store_unavailable(fault: crate::fault::Fault) -> Self {
        let mut err = Self::new(
            ErrorCode::StoreUnavailable,
            "the store is unavailable; nothing was stored, retry with the same request_id",
        )
        .with_header("Retry-After", STORE_RETRY_AFTER_SECS.to_string());
        err.fault = Some(fault);
        err
    }

    /// The wire body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            ok: false,
            error: self.code,
            message: self.message.clone(),
            request_id: context::call_request_id(),
            details: self.details.as_deref().cloned(),
        }
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(e: sea_orm::DbErr) -> Self {
        if let Some(fault) = crate::fault::classify(&e) {
            crate::fault::record(fault);
            tracing::warn!(error = %e, kind = fault.kind.as_str(), "store failure");
            return ApiError::store_unavailable(fault);
        }
        if is_transient(&e) {
            // Retried by the write pipeline; the client sees a generic text if it persists.
            tracing::warn!(error = %e, "transient database conflict");
            let mut err = ApiError::new(
                ErrorCode::Internal,
                "internal error; the request id identifies it in our logs",
            );
            err.transient = true;
            return err;
        }
        ApiError::internal(format!("database: {e}"))
    }
}

/// Seconds a client is asked to wait before retrying after a store failure.
pub const STORE_RETRY_AFTER_SECS: u32 = 1;

/// A deadlock or a serialization failure (PostgreSQL `40P01`, `40001`): the same work may be run
/// again once the other transaction is done.
fn is_transient(e: &sea_orm::DbErr) -> bool {
    let (sea_orm::DbErr::Exec(r) | sea_orm::DbErr::Query(r) | sea_orm::DbErr::Conn(r)) = e else {
        return false;
    };
    let sea_orm::RuntimeErr::SqlxError(sqlx) = r else {
        return false;
    };
    matches!(
        sqlx.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("40P01" | "40001")
    )
}

impl From<sea_orm::TransactionError<ApiError>> for ApiError {
    fn from(e: sea_orm::TransactionError<ApiError>) -> Self {
        match e {
            sea_orm::TransactionError::Connection(db) => db.into(),
            sea_orm::TransactionError::Transaction(api) => api,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut resp = Response::builder()
            .status(self.status)
            .content_type("application/json; charset=utf-8")
            .body(body);
        for (name, value) in self.headers {
            if let Ok(v) = value.parse() {
                resp.headers_mut().insert(name, v);
            }
        }
        // The audit layer reads the code from here.
        resp.set_data(self.code);
        resp
    }
}

/// Documentation of the error responses (the spec side of `ApiError`).
#[derive(ApiResponse)]
#[allow(dead_code)]
enum ErrorResponses {
    /// Malformed request: bad JSON, wrong types, failed schema rules.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// Missing, unknown or disabled credentials.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// Not enough credits (`INSUFFICIENT_CREDITS`).
    #[oai(status = 402)]
    PaymentRequired(Json<ErrorBody>),
    /// Client address not allowed (`IP_NOT_ALLOWED`).
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// No such resource (`NOT_FOUND`).
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `IDEMPOTENCY_CONFLICT`, `LEASE_LOST` or `CONFLICT`.
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// Body too large (`PAYLOAD_TOO_LARGE`).
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// Wrong content type (`VALIDATION_ERROR`).
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// Breaks a rule (`VALIDATION_ERROR`, `BATCH_TOO_LARGE`).
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// Quota used up (`RATE_LIMIT_EXCEEDED`); see `Retry-After`.
    #[oai(status = 429)]
    TooManyRequests(
        Json<ErrorBody>,
        /// Seconds until the current window ends.
        #[oai(header = "Retry-After")]
        i64,
    ),
    /// Our fault (`INTERNAL`).
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The store failed (`STORE_UNAVAILABLE`): nothing was stored; retry after `Retry-After`
    /// seconds with the same `request_id`.
    #[oai(status = 503)]
    StoreUnavailable(
        Json<ErrorBody>,
        /// Seconds to wait before retrying.
        #[oai(header = "Retry-After")]
        i64,
    ),
}

impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        ErrorResponses::meta()
    }

    fn register(registry: &mut Registry) {
        ErrorResponses::register(registry);
    }
}

/// A header that is present but not text is read as absent by the extractors; refuse it
/// (400) instead of acting as if it had not been sent.
pub fn refuse_unreadable_header(
    req: &poem::Request,
    name: &str,
    parsed: &Option<String>,
) -> Result<(), ApiError> {
    if parsed.is_none() && req.headers().contains_key(name) {
        return Err(ApiError::new(
            ErrorCode::ValidationError,
            format!("{name}: must be 1-255 characters of [A-Za-z0-9._:-]"),
        )
        .with_status(StatusCode::BAD_REQUEST));
    }
    Ok(())
}

/// Turns any `poem::Error` that is not already a response (unknown route, wrong method,
/// body too large, parse and validator failures, auth failures) into the JSON error body.
pub fn catch_all(err: poem::Error) -> Response {
    if let Some(api) = err.downcast_ref::<ApiError>() {
        return api.clone().into_response();
    }
    if err.is_from_response() {
        return err.into_response();
    }
    let status = err.status();
    let api = match status {
        StatusCode::NOT_FOUND => ApiError::new(ErrorCode::NotFound, "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            ErrorCode::NotFound,
            "this route does not accept that method",
        )
        .with_status(StatusCode::METHOD_NOT_ALLOWED),
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large")
        }
        StatusCode::UNAUTHORIZED => ApiError::unauthorized("missing or invalid credentials"),
        StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            ErrorCode::ValidationError,
            describe_parse_error(&err.to_string()),
        )
        .with_status(status),
        s if s.is_server_error() => ApiError::internal(err.to_string()),
        s => ApiError::new(ErrorCode::ValidationError, err.to_string()).with_status(s),
    };
    api.into_response()
}

/// Makes poem-openapi's parse messages say which field is wrong where they can.
fn describe_parse_error(raw: &str) -> String {
    // poem-openapi nests messages like `failed to parse "X": failed to parse "Y": ... (occurred while parsing "items")`.
    raw.replace("parse request payload error: ", "invalid request body: ")
}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn as_response(&self) -> Response {
        self.clone().into_response()
    }
}
