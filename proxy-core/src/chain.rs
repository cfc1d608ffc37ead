//! Upstream proxies, sans I/O: the `--upstream` URL, the ordered `--upstream-rule` list and
//! the choice of route for a target. The async shell that speaks to the chosen upstream is
//! [`dial`].
//!
//! Credentials given in a URL (`socks5://user:pass@host:port`) are kept apart from
//! everything printable: [`Upstream`]'s `Display` and `Debug` never show them, so neither
//! logs, records nor error messages can carry them.

pub mod dial;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use protocols::socks5::Addr;

/// Why an upstream URL or rule is unusable. No variant holds the credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The URL has no `scheme://`.
    #[error("an upstream is a URL: socks5://HOST:PORT, socks5h://HOST:PORT or http://HOST:PORT")]
    NoScheme,
    /// A scheme other than socks5, socks5h, http.
    #[error("unsupported upstream scheme {0:?} (use socks5://, socks5h:// or http://)")]
    Scheme(String),
    /// No host, or no valid port.
    #[error("upstream {0}: expected HOST:PORT after the scheme")]
    HostPort(String),
    /// A path, query or fragment after the authority.
    #[error("upstream {0}: nothing may follow HOST:PORT")]
    Trailing(String),
    /// `user:pass@` without both parts, or undecodable percent escapes.
    #[error("upstream {0}: credentials must be USER:PASS@ (percent-encoded), both non-empty")]
    Credentials(String),
    /// SOCKS5 carries at most 255 bytes of user name and of password.
    #[error("upstream {0}: SOCKS5 user name and password are at most 255 bytes each")]
    CredentialsTooLong(String),
    /// A rule without `=`.
    #[error("upstream rule {0:?}: expected PATTERN=URL or PATTERN=direct")]
    RuleShape(String),
    /// A rule pattern that does not parse.
    #[error("upstream rule pattern {0:?}: {1}")]
    Pattern(String, &'static str),
}

/// The protocol spoken to an upstream proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// SOCKS5 with names resolved by this proxy (the upstream gets an IP).
    Socks5,
    /// SOCKS5 with names resolved by the upstream.
    Socks5h,
    /// HTTP CONNECT (names resolved by the upstream).
    Http,
}

impl Scheme {
    /// The URL scheme.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Socks5 => "socks5",
            Scheme::Socks5h => "socks5h",
            Scheme::Http => "http",
        }
    }
}

/// An upstream proxy: where it is, how to speak to it, and the credentials it wants.
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The protocol.
    pub scheme: Scheme,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// User name and password, if the upstream wants them. Never printed.
    pub creds: Option<(String, String)>,
}

impl fmt::Display for Upstream {
    /// The URL without credentials, as records and logs show it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(
                f,
                "{}://[{}]:{}",
                self.scheme.as_str(),
                self.host,
                self.port
            )
        } else {
            write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
        }
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Upstream({self}")?;
        if self.creds.is_some() {
            f.write_str(" with credentials")?;
        }
        f.write_str(")")
    }
}

impl Upstream {
    /// Parses `SCHEME://[USER:PASS@]HOST:PORT`. USER and PASS may be percent-encoded (a
    /// `@` or `:` in a password is `%40`, `%3A`). Errors name the URL without credentials.
    pub fn parse(url: &str) -> Result<Upstream, ChainError> {
        let (scheme, rest) = url.split_once("://").ok_or(ChainError::NoScheme)?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "socks5" => Scheme::Socks5,
            "socks5h" => Scheme::Socks5h,
            "http" => Scheme::Http,
            other => return Err(ChainError::Scheme(other.to_string())),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (creds, authority) = match rest.rsplit_once('@') {
            Some((c, a)) => (Some(c), a),
            None => (None, rest),
        };
        // What an error may show: the URL with any credentials left out.
        let shown = format!("{}://{authority}", scheme.as_str());
        if authority.contains(['/', '?', '#']) {
            return Err(ChainError::Trailing(shown));
        }
        let (host, port) = split_host_port(authority).ok_or(ChainError::HostPort(shown.clone()))?;
        let creds = match creds {
            None => None,
            Some(c) => {
                let (u, p) = c
                    .split_once(':')
                    .ok_or(ChainError::Credentials(shown.clone()))?;
                let (u, p) = (percent_decode(u), percent_decode(p));
                let (Some(u), Some(p)) = (u, p) else {
                    return Err(ChainError::Credentials(shown));
                };
                if u.is_empty() || p.is_empty() {
                    return Err(ChainError::Credentials(shown));
                }
                if scheme != Scheme::Http && (u.len() > 255 || p.len() > 255) {
                    return Err(ChainError::CredentialsTooLong(shown));
                }
                Some((u, p))
            }
        };
        Ok(Upstream {
            scheme,
            host: host.to_string(),
            port,
            creds,
        })
    }
}

/// Splits `HOST:PORT` or `[V6]:PORT`; the host is returned without brackets.
fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once(']')?;
        (h, p.strip_prefix(':')?)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h, p)
    };
    if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((host, port.parse().ok().filter(|p| *p != 0)?))
}

/// Decodes `%XX` escapes; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Where a connection goes: straight to the target, or through an upstream proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Connect to the target directly.
    Direct,
    /// Connect through this upstream.
    Via(Arc<Upstream>),
}

impl Route {
    /// Parses `direct` or an upstream URL.
    pub fn parse(s: &str) -> Result<Route, ChainError> {
        if s.eq_ignore_ascii_case("direct") {
            Ok(Route::Direct)
        } else {
            Ok(Route::Via(Arc::new(Upstream::parse(s)?)))
        }
    }

    /// The upstream, if any.
    pub fn upstream(&self) -> Option<&Arc<Upstream>> {
        match self {
            Route::Direct => None,
            Route::Via(u) => Some(u),
        }
    }
}

/// What a rule's pattern matches on the host side.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// `*`: every target.
    Any,
    /// A glob over the host as the client named it (`*` spans any characters, dots
    /// included), case-insensitive; an IP literal pattern matches that IP.
    Glob(String),
    /// An IP network: matches targets given as IPs in it (names are not resolved to pick a
    /// route, so that `socks5h` upstreams keep name resolution).
    Cidr(IpAddr, u8),
}

/// One `--upstream-rule PATTERN=URL|direct`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    host: HostPattern,
    port: Option<u16>,
    /// Where matching targets go.
    pub route: Route,
}

impl Rule {
    /// Parses `PATTERN=URL` or `PATTERN=direct`. PATTERN is `HOST`, `HOST:PORT` or
    /// `[V6]:PORT`, where HOST is a glob (`*.corp.example`, `*`), an IP, or a CIDR
    /// (`10.0.0.0/8`, `fd00::/8`); PORT is a number or `*`.
    pub fn parse(s: &str) -> Result<Rule, ChainError> {
        let (pattern, route) = s
            .split_once('=')
            .ok_or_else(|| ChainError::RuleShape(s.split('@').next_back().unwrap_or("").into()))?;
        let route = Route::parse(route.trim())?;
        let pattern = pattern.trim();
        let bad = |why| ChainError::Pattern(pattern.to_string(), why);
        let (host, port) = if let Some(rest) = pattern.strip_prefix('[') {
            let (h, p) = rest.split_once(']').ok_or(bad("unclosed '['"))?;
            let p = p.strip_prefix(':').ok_or(bad("expected :PORT after ']'"))?;
            (h, Some(p))
        } else {
            match pattern.rsplit_once(':') {
                // Several colons and no brackets: an IPv6 address or network, no port.
                Some((h, _)) if h.contains(':') => (pattern, None),
                Some((h, p)) => (h, Some(p)),
                None => (pattern, None),
            }
        };
        let port = match port {
            None | Some("*") => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or(bad("the port is not a number from 1 to 65535 or *"))?,
            ),
        };
        if host.is_empty() {
            return Err(bad("empty host (use * for every host)"));
        }
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some((ip, len)) = host.split_once('/') {
            let ip: IpAddr = ip.parse().map_err(|_| bad("not an IP network"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or(bad("the prefix length is too long for the address"))?;
            HostPattern::Cidr(ip, len)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            HostPattern::Cidr(ip, if ip.is_ipv4() { 32 } else { 128 })
        } else {
            if !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'*' | b'.' | b'-' | b'_'))
            {
                return Err(bad(
                    "a host glob has letters, digits, '.', '-', '_' and '*'",
                ));
            }
            HostPattern::Glob(host.to_ascii_lowercase())
        };
        Ok(Rule { host, port, route })
    }

    /// Whether this rule applies to `target`.
    pub fn matches(&self, target: &Addr) -> bool {
        if self.port.is_some_and(|p| p != target.port()) {
            return false;
        }
        match (&self.host, target) {
            (HostPattern::Any, _) => true,
            (HostPattern::Glob(g), Addr::Domain(h, _)) => {
                glob(g.as_bytes(), h.to_ascii_lowercase().as_bytes())
            }
            (HostPattern::Glob(_), Addr::Ip(_)) => false,
            (HostPattern::Cidr(net, len), Addr::Ip(a)) => in_network(a.ip(), *net, *len),
            (HostPattern::Cidr(..), Addr::Domain(..)) => false,
        }
    }
}

/// Whether `ip` is in `net/len` (an IPv4-mapped IPv6 address counts as its IPv4 address).
fn in_network(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip.to_canonical(), net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Glob match where `*` matches any run of bytes (iterative, linear in practice).
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

/// The routing table: the rules in order, then the default (`--upstream`, or direct).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// `--upstream-rule`s, first match wins.
    pub rules: Vec<Rule>,
    /// `--upstream`, when no rule matches; `None` is direct.
    pub default: Option<Arc<Upstream>>,
}

impl Routes {
    /// Builds the table from `--upstream` and `--upstream-rule`s.
    pub fn parse(default: Option<&str>, rules: &[String]) -> Result<Routes, ChainError> {
        Ok(Routes {
            rules: rules
                .iter()
                .map(|r| Rule::parse(r))
                .collect::<Result<_, _>>()?,
            default: default.map(Upstream::parse).transpose()?.map(Arc::new),
        })
    }

    /// The upstream for `target` (`None`: direct). First matching rule wins.
    pub fn route(&self, target: &Addr) -> Option<&Arc<Upstream>> {
        match self.rules.iter().find(|r| r.matches(target)) {
            Some(r) => r.route.upstream(),
            None => self.default.as_ref(),
        }
    }

    /// Whether any connection can go through an upstream.
    pub fn any_upstream(&self) -> bool {
        self.default.is_some() || self.rules.iter().any(|r| r.route != Route::Direct)
    }
}

/// The socket address of `up` when its host is an IP literal.
pub fn literal_addr(up: &Upstream) -> Option<SocketAddr> {
    up.host
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, up.port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dom(h: &str, p: u16) -> Addr {
        Addr::Domain(h.into(), p)
    }
    fn ip(s: &str) -> Addr {
        Addr::Ip(s.parse().unwrap())
    }

    #[test]
    fn urls_parse_and_never_show_credentials() {
        let u = Upstream::parse("socks5h://al%40ice:p%3Ass@proxy.lab:1080").unwrap();
        assert_eq!(u.scheme, Scheme::Socks5h);
        assert_eq!((u.host.as_str(), u.port), ("proxy.lab", 1080));
        assert_eq!(u.creds, Some(("al@ice".into(), "p:ss".into())));
        assert_eq!(u.to_string(), "socks5h://proxy.lab:1080");
        assert_eq!(
            format!("{u:?}"),
            "Upstream(socks5h://proxy.lab:1080 with credentials)"
        );
        let u = Upstream::parse("HTTP://[::1]:3128/").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.creds.is_none()),
            (Scheme::Http, "::1", true)
        );
        assert_eq!(u.to_string(), "http://[::1]:3128");
        for (bad, want) in [
            ("proxy:1080", ChainError::NoScheme),
            ("ftp://u:secret@h:1", ChainError::Scheme("ftp".into())),
            (
                "socks5://u:secret@h",
                ChainError::HostPort("socks5://h".into()),
            ),
            ("socks5://h:0", ChainError::HostPort("socks5://h:0".into())),
            (
                "socks5://h:99999",
                ChainError::HostPort("socks5://h:99999".into()),
            ),
            (
                "http://u:secret@h:1/x",
                ChainError::Trailing("http://h:1/x".into()),
            ),
            (
                "socks5://secret@h:1",
                ChainError::Credentials("socks5://h:1".into()),
            ),
            (
                "socks5://u:@h:1",
                ChainError::Credentials("socks5://h:1".into()),
            ),
            (
                "socks5://u:%zz@h:1",
                ChainError::Credentials("socks5://h:1".into()),
            ),
        ] {
            let e = Upstream::parse(bad).expect_err(bad);
            assert_eq!(e, want, "{bad}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn rules_first_match_wins() {
        let r = Routes::parse(
            Some("socks5://u:p@10.0.0.1:1080"),
            &[
                "*.corp.example=http://proxy.corp:3128".into(),
                "10.0.0.0/8=direct".into(),
                "*:5432=socks5h://db-gw:1080".into(),
                "[fd00::/8]:443=direct".into(),
                "localhost=direct".into(),
                "127.0.0.1=direct".into(),
            ],
        )
        .unwrap();
        let name = |a: &Addr| r.route(a).map(|u| u.to_string());
        assert_eq!(
            name(&dom("git.corp.example", 443)).as_deref(),
            Some("http://proxy.corp:3128")
        );
        assert_eq!(
            name(&dom("GIT.Corp.Example", 5432)).as_deref(),
            Some("http://proxy.corp:3128")
        );
        assert_eq!(
            name(&dom("corp.example", 443)).as_deref(),
            Some("socks5://10.0.0.1:1080")
        );
        assert_eq!(name(&ip("10.1.2.3:5432")), None);
        assert_eq!(name(&ip("[::ffff:10.1.2.3]:80")), None);
        assert_eq!(
            name(&ip("11.1.2.3:5432")).as_deref(),
            Some("socks5h://db-gw:1080")
        );
        assert_eq!(name(&ip("[fd00::1]:443")), None);
        assert_eq!(
            name(&ip("[fd00::1]:80")).as_deref(),
            Some("socks5://10.0.0.1:1080")
        );
        assert_eq!(name(&dom("localhost", 80)), None);
        assert_eq!(name(&ip("127.0.0.1:80")), None);
        assert!(r.any_upstream());
        assert!(
            !Routes::parse(None, &["*=direct".into()])
                .unwrap()
                .any_upstream()
        );
        assert_eq!(Routes::default().route(&dom("x", 1)), None);
    }

    #[test]
    fn bad_rules_say_what_is_wrong_without_credentials() {
        for (bad, part) in [
            ("*.example", "PATTERN=URL"),
            ("*.ex ample=direct", "host glob"),
            ("10.0.0.0/33=direct", "prefix length"),
            ("x/8=direct", "IP network"),
            ("h:http=direct", "port"),
            ("[::1=direct", "unclosed"),
            (":80=direct", "empty host"),
            ("*=gopher://u:secret@h:1", "scheme"),
        ] {
            let e = Rule::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(part), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob(b"*", b""));
        assert!(glob(b"*.a.b", b"x.y.a.b"));
        assert!(!glob(b"*.a.b", b"a.b"));
        assert!(glob(b"a*c*e", b"abcde"));
        assert!(!glob(b"a*c*e", b"abcdf"));
        assert!(glob(b"host", b"host"));
        assert!(!glob(b"host", b"hostx"));
    }

    proptest! {
        #[test]
        fn parsing_anything_never_panics(s in "\\PC{0,80}") {
            let _ = Upstream::parse(&s);
            let _ = Rule::parse(&s);
        }

        #[test]
        fn credentials_round_trip_and_stay_hidden(
            user in "[a-zA-Z0-9@:%/ ]{1,20}",
            pass in "[a-zA-Z0-9@:%/ ]{1,20}",
            port in 1u16..,
        ) {
            let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
            let url = format!("socks5://{}:{}@h.example:{port}", enc(&user), enc(&pass));
            let u = Upstream::parse(&url).unwrap();
            prop_assert_eq!(u.creds.clone(), Some((user, pass)));
            prop_assert_eq!(u.to_string(), format!("socks5://h.example:{port}"));
        }

        #[test]
        fn star_globs_match_their_suffix(prefix in "[a-z0-9.-]{0,20}", suffix in "[a-z0-9.-]{1,20}") {
            let p = format!("*{suffix}");
            let host = format!("{prefix}{suffix}");
            prop_assert!(glob(p.as_bytes(), host.as_bytes()));
        }
    }
}
