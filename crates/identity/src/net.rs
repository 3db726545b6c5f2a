//! Network address checks shared by the services that call URLs their users give (custom
//! model endpoints, git remotes, callbacks).

/// Whether `url` names this machine or a private network by its host: `localhost`, or a
/// loopback, private, link-local, unique-local or unspecified address literal. (A public name
/// that resolves to such an address is not caught here.) Unparseable URLs count as private.
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
        url::Host::Ipv4(ip) => {
            ip.is_loopback() || ip.is_private() || ip.is_link_local() || ip.is_unspecified()
        }
        url::Host::Ipv6(ip) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_unique_local()
                || ip.is_unicast_link_local()
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_private())
        }
    }
}

#[cfg(test)]
mod tests {
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
            ("http://[::1]:80/", true),
            ("http://[fd00::1]/", true),
            ("http://[::ffff:192.168.1.1]/", true),
            ("not a url", true),
        ] {
            assert_eq!(super::private_url(url), private, "{url}");
        }
    }
}
