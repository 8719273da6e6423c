//! HTTP routes, one file per resource; `startup.rs` mounts them.

/// Makes an `impl` block a part of the customer API: its `#[OpenApi]` attribute, with the
/// headers every customer answer carries (quota and request id), for each group of customer
/// routes (batches and account, webhooks).
macro_rules! customer_api {
    ($($item:item)*) => {
        #[poem_openapi::OpenApi(
            prefix_path = "/",
            response_header(
                name = "RateLimit-Policy",
                ty = "String",
                description = "Quota policy of this call's scope (`batch` for calls that create \
                               a batch, `read` for the others), e.g. `\"batch\";q=60;w=60`"
            ),
            response_header(
                name = "RateLimit",
                ty = "String",
                description = "Quota left and seconds to reset, e.g. `\"batch\";r=12;t=31`"
            ),
            response_header(
                name = "X-RateLimit-Limit",
                ty = "u32",
                description = "Calls allowed per minute"
            ),
            response_header(
                name = "X-RateLimit-Remaining",
                ty = "u32",
                description = "Calls left in this minute"
            ),
            response_header(
                name = "X-RateLimit-Reset",
                ty = "u32",
                description = "Seconds until the minute ends"
            ),
            response_header(
                name = "x-request-id",
                ty = "String",
                description = "Request id (echoed when sent)"
            )
        )]
        #[allow(clippy::duplicated_attributes)]
        $($item)*
    };
}
pub(crate) use customer_api;

pub mod admin;
pub mod batches;
pub mod documents;
pub mod health;
pub mod webhooks;
pub mod worker;
