//! Network address checks shared by the services that call URLs their users give (custom
//! model endpoints, git remotes, callbacks).
//!
//! Two layers: [`private_url`] refuses a URL whose host *is* a private address (a literal, or
//! `localhost`) when it is given, with a clear message; [`GuardedResolver`] refuses, at connect
//! time, a name that *resolves* to one, so a public-looking name pointing at `127.0.0.1` or
//! the metadata service (`169.254.169.254`) cannot reach them either. reqwest does not resolve
//! IP literals, so clients need both.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

/// Whether `url` names this machine or a private network by its host: `localhost`, or an
/// address literal that is not public ([`is_private_ip`]). A public name that resolves to such
/// an address is not caught here but by [`GuardedResolver`]. Unparseable URLs count as
/// private.
pub fn private_url(url: &str) -> bool {
    let Some(host) = url::Url::parse(url)
        .ok()
        .and_then(|u| u.host().map(|h| h.to_owned()))
    else {
        return true;
    };
    match host {
        url::Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        url::Host::Ipv4(ip) => is_private_ip(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => is_private_ip(IpAddr::V6(ip)),
    }
}

/// Whether `ip` is not a public unicast address: loopback, private (RFC 1918), shared
/// (100.64.0.0/10, RFC 6598), link-local, unique-local (fc00::/7), unspecified, `0.0.0.0/8`,
/// broadcast or multicast; an IPv4-mapped IPv6 address is judged as its IPv4 address.
pub fn is_private_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => private_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => private_v4(v4),
            None => private_v6(v6),
        },
    }
}

fn private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
}

fn private_v6(ip: Ipv6Addr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        || ip.is_multicast()
}

/// Why [`GuardedResolver`] gave no address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The name resolves to an address that is not public (one such address is enough: a
    /// name with mixed answers is refused whole, so a client cannot be steered to the private
    /// one).
    #[error("refusing to connect to {host}: it resolves to the non-public address {ip}")]
    Private {
        /// The name asked for.
        host: String,
        /// The offending address.
        ip: IpAddr,
    },
    /// The lookup failed or found nothing.
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        /// The name asked for.
        host: String,
        /// What the lookup said.
        source: io::Error,
    },
}

/// A DNS lookup: a host name to its addresses.
pub type Lookup = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>> + Send + Sync,
>;

/// A resolver that refuses names resolving to non-public addresses ([`is_private_ip`])
/// unless private targets are allowed. As a [`reqwest::dns::Resolve`] it runs at connect
/// time, for every connection a client opens (redirects included), so the address checked is
/// the address used. Errors are [`ResolveError`]s.
#[derive(Clone)]
pub struct GuardedResolver {
    allow_private: bool,
    lookup: Lookup,
}

impl std::fmt::Debug for GuardedResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedResolver")
            .field("allow_private", &self.allow_private)
            .finish_non_exhaustive()
    }
}

impl GuardedResolver {
    /// A resolver using the system's (`getaddrinfo`, through tokio); with `allow_private`
    /// it checks nothing.
    pub fn new(allow_private: bool) -> Self {
        let lookup: Lookup = Arc::new(|host: String| {
            Box::pin(async move {
                let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
                Ok(addrs.map(|a| a.ip()).collect())
            })
        });
        Self::with_lookup(allow_private, lookup)
    }

    /// A resolver asking `lookup` (tests, or another DNS client).
    pub fn with_lookup(allow_private: bool, lookup: Lookup) -> Self {
        Self {
            allow_private,
            lookup,
        }
    }

    /// The addresses of `host` (a name, or an address literal with IPv6 in brackets or not),
    /// all of them public unless private targets are allowed.
    ///
    /// Errors: [`ResolveError::Private`]; [`ResolveError::Lookup`] when the lookup fails or
    /// finds no address.
    pub async fn resolve_checked(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let ips = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                (self.lookup)(bare.to_owned())
                    .await
                    .map_err(|source| ResolveError::Lookup {
                        host: host.to_owned(),
                        source,
                    })?
            }
        };
        if ips.is_empty() {
            return Err(ResolveError::Lookup {
                host: host.to_owned(),
                source: io::Error::new(io::ErrorKind::NotFound, "no address"),
            });
        }
        if !self.allow_private
            && let Some(ip) = ips.iter().copied().find(|ip| is_private_ip(*ip))
        {
            return Err(ResolveError::Private {
                host: host.to_owned(),
                ip,
            });
        }
        Ok(ips)
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        Box::pin(async move {
            let ips = this.resolve_checked(name.as_str()).await?;
            // reqwest puts the URL's port in place of 0.
            let addrs: reqwest::dns::Addrs =
                Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// The resolver for clients whose targets users choose: [`GuardedResolver::new`] behind the
/// trait object `reqwest::ClientBuilder::dns_resolver` takes. `allow_private` lets
/// everything through (operators' opt-in, and tests on loopback).
pub fn guarded_resolver(allow_private: bool) -> Arc<dyn reqwest::dns::Resolve> {
    Arc::new(GuardedResolver::new(allow_private))
}

/// Whether a reqwest error was caused by [`GuardedResolver`] refusing a non-public address
/// (a refusal that retrying cannot cure).
pub fn is_private_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if matches!(
            e.downcast_ref::<ResolveError>(),
            Some(ResolveError::Private { .. })
        ) {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_endpoints_are_recognised_by_host() {
        for (url, private) in [
            ("https://llm.example.com/v1", false),
            ("http://203.0.113.7:8000/v1", false),
            ("http://localhost:8080/v1", true),
            ("http://api.localhost./v1", true),
            ("http://127.0.0.1:9/v1", true),
            ("http://10.1.2.3/v1", true),
            ("http://169.254.169.254/latest", true),
            ("http://100.64.0.1/", true),
            ("http://0.1.2.3/", true),
            ("http://224.0.0.1/", true),
            ("http://[::1]:80/", true),
            ("http://[fd00::1]/", true),
            ("http://[fe80::1]/", true),
            ("http://[ff02::1]/", true),
            ("http://[::ffff:192.168.1.1]/", true),
            ("http://[::ffff:8.8.8.8]/", false),
            ("http://[2001:4860:4860::8888]/", false),
            ("not a url", true),
        ] {
            assert_eq!(private_url(url), private, "{url}");
        }
    }

    fn fixed(answers: &'static [(&'static str, &'static [&'static str])]) -> Lookup {
        Arc::new(move |host: String| {
            Box::pin(async move {
                answers
                    .iter()
                    .find(|(name, _)| *name == host)
                    .map(|(_, ips)| ips.iter().map(|ip| ip.parse().unwrap()).collect())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "NXDOMAIN"))
            })
        })
    }

    #[tokio::test]
    async fn names_resolving_to_private_addresses_are_refused() {
        const ANSWERS: &[(&str, &[&str])] = &[
            ("public.test", &["203.0.113.7"]),
            ("rebind.test", &["127.0.0.1"]),
            ("metadata.test", &["169.254.169.254"]),
            ("mixed.test", &["203.0.113.7", "10.0.0.1"]),
            ("v6.test", &["fd12::1"]),
        ];
        let strict = GuardedResolver::with_lookup(false, fixed(ANSWERS));
        let open = GuardedResolver::with_lookup(true, fixed(ANSWERS));
        for (host, refused) in [
            ("public.test", false),
            ("rebind.test", true),
            ("metadata.test", true),
            ("mixed.test", true),
            ("v6.test", true),
            ("127.0.0.1", true),
            ("[::1]", true),
            ("203.0.113.9", false),
        ] {
            let got = strict.resolve_checked(host).await;
            assert_eq!(
                matches!(got, Err(ResolveError::Private { .. })),
                refused,
                "{host}: {got:?}"
            );
            assert!(open.resolve_checked(host).await.is_ok(), "{host}");
        }
        assert!(matches!(
            strict.resolve_checked("nowhere.test").await,
            Err(ResolveError::Lookup { .. })
        ));
    }

    /// A client with the guarded resolver cannot reach a listener on loopback by name, and
    /// the error says why; with private targets allowed it can.
    #[tokio::test]
    async fn clients_are_refused_at_connect_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let _ = socket.read(&mut buf).await;
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                });
            }
        });
        // A public-looking name that resolves to loopback.
        let lookup = fixed(&[("internal.example.test", &["127.0.0.1"])]);
        let url = format!("http://internal.example.test:{port}/");
        for allow_private in [false, true] {
            let client = reqwest::Client::builder()
                .dns_resolver(Arc::new(GuardedResolver::with_lookup(
                    allow_private,
                    lookup.clone(),
                )))
                .build()
                .unwrap();
            let result = client.get(&url).send().await;
            if allow_private {
                assert_eq!(result.unwrap().text().await.unwrap(), "ok");
            } else {
                let err = result.unwrap_err();
                assert!(is_private_refusal(&err), "{err:?}");
            }
        }
        // The system resolver's answer for `localhost` is refused too.
        let client = reqwest::Client::builder()
            .dns_resolver(guarded_resolver(false))
            .build()
            .unwrap();
        let err = client
            .get(format!("http://localhost:{port}/"))
            .send()
            .await
            .unwrap_err();
        assert!(is_private_refusal(&err), "{err:?}");
    }
}
