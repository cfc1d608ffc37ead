//! Host patterns for `--passthrough HOST` and `--client-cert HOST=CERT,KEY`.
//!
//! A pattern is `*` (every host), `*.example.com` (any name below `example.com`, at any
//! depth, but not `example.com` itself), an exact host name, or an IP address. Matching is
//! case-insensitive and ignores one trailing dot.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One host pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every host.
    Any,
    /// `*.suffix`: stored as `.suffix`, lowercase.
    Suffix(String),
    /// An exact host name, lowercase, without a trailing dot.
    Exact(String),
    /// An IP address.
    Ip(IpAddr),
}

/// A pattern that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host pattern {pattern:?}: {reason}")]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn normalize(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

fn valid_host_chars(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_')
}

impl FromStr for HostPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| PatternError {
            pattern: s.to_owned(),
            reason,
        };
        let t = s.trim();
        if t == "*" {
            return Ok(HostPattern::Any);
        }
        let unbracketed = t
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(t);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(HostPattern::Ip(ip));
        }
        if let Some(rest) = t.strip_prefix("*.") {
            let rest = normalize(rest);
            if !valid_host_chars(&rest) || rest.starts_with('.') {
                return Err(err("not a host name after '*.'"));
            }
            return Ok(HostPattern::Suffix(format!(".{rest}")));
        }
        if t.contains('*') {
            return Err(err("'*' is only allowed alone or as a leading '*.' label"));
        }
        let n = normalize(t);
        if !valid_host_chars(&n) {
            return Err(err("not a host name or IP address"));
        }
        Ok(HostPattern::Exact(n))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
            HostPattern::Exact(s) => f.write_str(s),
            HostPattern::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl HostPattern {
    /// Whether `host` (a name or an IP address literal) matches this pattern.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Ip(ip) => host
                .strip_prefix('[')
                .and_then(|x| x.strip_suffix(']'))
                .unwrap_or(host)
                .parse::<IpAddr>()
                .is_ok_and(|h| h == *ip),
            HostPattern::Exact(name) => {
                let h = host.strip_suffix('.').unwrap_or(host);
                h.eq_ignore_ascii_case(name)
            }
            HostPattern::Suffix(suffix) => {
                let h = host.strip_suffix('.').unwrap_or(host);
                h.len() > suffix.len()
                    && h.get(h.len() - suffix.len()..)
                        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
            }
        }
    }

    /// Whether this pattern matches an IP address.
    pub fn matches_ip(&self, ip: IpAddr) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Ip(p) => *p == ip,
            _ => false,
        }
    }
}

/// Whether any of `patterns` matches any of the given names or the IP address.
pub fn any_matches(patterns: &[HostPattern], names: &[Option<&str>], ip: Option<IpAddr>) -> bool {
    patterns.iter().any(|p| {
        names.iter().flatten().any(|n| p.matches(n)) || ip.is_some_and(|ip| p.matches_ip(ip))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> HostPattern {
        s.parse().expect("valid pattern")
    }

    #[test]
    fn wildcard_and_exact() {
        assert!(p("*.example.com").matches("a.example.com"));
        assert!(p("*.example.com").matches("A.B.Example.COM."));
        assert!(!p("*.example.com").matches("example.com"));
        assert!(!p("*.example.com").matches("badexample.com"));
        assert!(p("example.com").matches("EXAMPLE.com"));
        assert!(!p("example.com").matches("a.example.com"));
        assert!(p("*").matches("anything"));
        assert!(p("10.1.2.3").matches("10.1.2.3"));
        assert!(p("[::1]").matches("::1"));
        assert!(p("::1").matches_ip("::1".parse().expect("ip")));
        assert!(!p("example.com").matches_ip("10.1.2.3".parse().expect("ip")));
        assert_eq!(p("*.Example.com").to_string(), "*.example.com");
    }

    #[test]
    fn bad_patterns() {
        for s in ["", "a*.example.com", "*.", "foo bar", "*.*.x", "ex/ample"] {
            assert!(s.parse::<HostPattern>().is_err(), "{s:?}");
        }
    }

    #[test]
    fn any_of_names_or_ip() {
        let ps = vec![p("*.internal"), p("192.0.2.1")];
        assert!(any_matches(&ps, &[None, Some("db.internal")], None));
        assert!(any_matches(
            &ps,
            &[None],
            Some("192.0.2.1".parse().expect("ip"))
        ));
        assert!(!any_matches(&ps, &[Some("example.com")], None));
    }

    proptest! {
        #[test]
        fn parse_and_match_never_panic(s in ".{0,40}", h in ".{0,40}") {
            if let Ok(pat) = s.parse::<HostPattern>() {
                let _ = pat.matches(&h);
            }
        }
    }
}
