//! The SSRF guard at send time: the target is resolved (with a deadline) and every address is
//! checked; the request then goes to exactly those addresses.
use std::net::{IpAddr, SocketAddr};

pub use crate::domain::target::refuse_reason;

/// How long name resolution of a target may take.
pub const DNS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves the target now and checks every address (SSRF guard). Returns the host and the
/// addresses to connect to, so the request goes exactly where the check looked.
pub async fn check_target(
    url: &str,
    allow_private: bool,
) -> Result<(String, Vec<SocketAddr>), String> {
    check_target_with(url, allow_private, |host, port| async move {
        tokio::net::lookup_host((host.as_str(), port))
            .await
            .map(|a| a.collect())
    })
    .await
}

/// [`check_target`] with the name resolution given: the system resolver in production, one a
/// test controls (a resolver that never answers) in the tests.
async fn check_target_with<F, Fut>(
    url: &str,
    allow_private: bool,
    resolve: F,
) -> Result<(String, Vec<SocketAddr>), String>
where
    F: FnOnce(String, u16) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<SocketAddr>>>,
{
    let parsed = url::Url::parse(url).map_err(|_| format!("invalid URL {url:?}"))?;
    if parsed.scheme() != "https" && parsed.scheme() != "http" {
        return Err(format!(
            "scheme {:?} is not allowed; use https",
            parsed.scheme()
        ));
    }
    let host = parsed.host_str().ok_or("URL has no host")?.to_string();
    let port = parsed.port_or_known_default().ok_or("URL has no port")?;
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        // A resolver that never answers must not hold a send slot for long.
        Err(_) => tokio::time::timeout(DNS_TIMEOUT, resolve(bare.clone(), port))
            .await
            .map_err(|_| format!("resolving {bare} timed out"))?
            .map_err(|e| format!("cannot resolve {bare}: {e}"))?,
    };
    if addrs.is_empty() {
        return Err(format!("{bare} resolves to no address"));
    }
    if !allow_private {
        for a in &addrs {
            if let Some(why) = refuse_reason(a.ip()) {
                return Err(format!(
                    "target {bare} resolves to {} ({why}); refused",
                    a.ip()
                ));
            }
        }
    }
    Ok((bare, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_resolver_that_never_answers_is_given_up_after_the_dns_deadline() {
        let started = tokio::time::Instant::now();
        let err = check_target_with("https://hooks.example.com/in", false, |_, _| {
            std::future::pending::<std::io::Result<Vec<SocketAddr>>>()
        })
        .await
        .expect_err("a resolver that never answers");
        // The clock is paused: it advances only through the deadline's own timer.
        assert_eq!(started.elapsed(), DNS_TIMEOUT, "{err}");
        assert_eq!(err, "resolving hooks.example.com timed out");
    }

    #[tokio::test]
    async fn every_resolved_address_is_checked_and_returned() {
        let public: SocketAddr = "93.184.216.34:443".parse().unwrap();
        let private: SocketAddr = "10.1.2.3:443".parse().unwrap();
        // One private address among public ones refuses the target (rebinding to a private
        // address through a second record is caught).
        let err = check_target_with("https://hooks.example.com/in", false, |h, p| async move {
            assert_eq!((h.as_str(), p), ("hooks.example.com", 443));
            Ok(vec![public, private])
        })
        .await
        .expect_err("a private address among the records");
        assert!(err.contains("10.1.2.3") && err.contains("refused"), "{err}");
        // What is returned is exactly what was checked: the sender connects only there.
        let (host, addrs) =
            check_target_with("https://hooks.example.com/in", false, |_, _| async move {
                Ok(vec![public])
            })
            .await
            .unwrap();
        assert_eq!((host.as_str(), addrs), ("hooks.example.com", vec![public]));
        let err = check_target_with("https://hooks.example.com/in", false, |_, _| async move {
            Ok(vec![])
        })
        .await
        .expect_err("no address");
        assert_eq!(err, "hooks.example.com resolves to no address");
    }

    #[tokio::test]
    async fn private_and_odd_targets_are_refused() {
        for url in [
            "http://127.0.0.1/hook",
            "http://[::1]/hook",
            "http://10.0.0.1/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:127.0.0.1]/hook",
            "http://localhost:9/hook",
            "http://192.168.1.10/",
            "http://[fd00::1]/",
            "http://0.0.0.0/",
            "https://[64:ff9b::a00:5]/",
            "https://[64:ff9b::7f00:1]/",
            "https://[64:ff9b:1::a00:5]/",
            "https://[2002:a00:5::1]/",
            "https://[2002:c0a8:101::1]/",
            "https://[2001:0:a00:5::1]/",
            "https://[2001:0:5db8:f00d:0:0:f5ff:fffa]/",
            "https://[fec0::1]/",
            "https://[::a00:5]/",
            "https://[::7f00:1]/",
            "https://198.18.0.1/",
            "https://198.19.255.254/",
            "https://192.0.0.8/",
            "https://240.0.0.1/",
            "https://255.255.255.255/",
            "https://100.64.0.1/",
            "file:///etc/passwd",
            "ftp://example.com/",
        ] {
            let err = check_target(url, false).await.expect_err(url);
            assert!(
                err.contains("refused") || err.contains("scheme"),
                "{url}: {err}"
            );
        }
        assert!(check_target("http://127.0.0.1:9/hook", true).await.is_ok());
        for public in [
            "https://93.184.216.34/hook",
            "https://[2606:2800:220:1:248:1893:25c8:1946]/",
            "https://[64:ff9b::5db8:d822]/",
            "https://[2002:5db8:d822::1]/",
            "https://198.20.0.1/",
        ] {
            assert!(check_target(public, false).await.is_ok(), "{public}");
        }
    }
}
