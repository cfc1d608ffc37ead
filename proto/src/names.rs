//! The stable lower-case names of the contract's enums, as the CLI prints them and as the
//! `--json` output and the CLI's filters spell them (`c2s`, `active`, `client`, `fin`, ...), and
//! the old text of an intercept verdict's reason.

use crate::{
    common::{CloseKind, ClosedBy, ConnStatus, Direction},
    intercept::{Verdict, verdict::Reason},
};

/// An enum with a stable user-facing name for each meaningful value.
pub trait Named: Sized + Copy + 'static {
    /// Every value that has a name (the unspecified value has none).
    const ALL: &'static [Self];
    /// The name, or `None` for the unspecified value.
    fn name(self) -> Option<&'static str>;
    /// The value with this name.
    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == Some(name))
    }
}

impl Named for Direction {
    const ALL: &'static [Self] = &[Direction::C2s, Direction::S2c];
    fn name(self) -> Option<&'static str> {
        match self {
            Direction::Unspecified => None,
            Direction::C2s => Some("c2s"),
            Direction::S2c => Some("s2c"),
        }
    }
}

impl Named for ConnStatus {
    const ALL: &'static [Self] = &[ConnStatus::Active, ConnStatus::Disconnected];
    fn name(self) -> Option<&'static str> {
        match self {
            ConnStatus::Unspecified => None,
            ConnStatus::Active => Some("active"),
            ConnStatus::Disconnected => Some("disconnected"),
        }
    }
}

impl Named for ClosedBy {
    const ALL: &'static [Self] = &[ClosedBy::Client, ClosedBy::Server, ClosedBy::Proxy];
    fn name(self) -> Option<&'static str> {
        match self {
            ClosedBy::Unspecified => None,
            ClosedBy::Client => Some("client"),
            ClosedBy::Server => Some("server"),
            ClosedBy::Proxy => Some("proxy"),
        }
    }
}

impl Named for CloseKind {
    const ALL: &'static [Self] = &[CloseKind::Fin, CloseKind::Rst, CloseKind::Error];
    fn name(self) -> Option<&'static str> {
        match self {
            CloseKind::Unspecified => None,
            CloseKind::Fin => Some("fin"),
            CloseKind::Rst => Some("rst"),
            CloseKind::Error => Some("error"),
        }
    }
}

/// A verdict's reason by its old text (`Verdict.reason`, which intercept-svc still fills in for
/// clients older than `Verdict.why`).
impl Named for Reason {
    const ALL: &'static [Self] = &[
        Reason::User,
        Reason::Timeout,
        Reason::InterceptOff,
        Reason::QueueFull,
        Reason::TooLarge,
        Reason::ConnectionClosed,
        Reason::Cancelled,
    ];
    fn name(self) -> Option<&'static str> {
        match self {
            Reason::Unspecified => None,
            Reason::User => Some("user"),
            Reason::Timeout => Some("timeout"),
            Reason::InterceptOff => Some("intercept_off"),
            Reason::QueueFull => Some("queue_full"),
            Reason::TooLarge => Some("too_large"),
            Reason::ConnectionClosed => Some("connection_closed"),
            Reason::Cancelled => Some("cancelled"),
        }
    }
}

impl Verdict {
    /// A verdict `action` for reason `why`, with the old `reason` text filled in too.
    pub fn because(action: crate::intercept::verdict::Action, why: Reason) -> Self {
        Self {
            action: action as i32,
            why: why as i32,
            reason: why.name().unwrap_or_default().to_string(),
            ..Self::default()
        }
    }

    /// Why: `why`, or, from an intercept-svc older than that field, the value its `reason`
    /// text names ([`Reason::Unspecified`] when neither says).
    pub fn cause(&self) -> Reason {
        match self.why() {
            Reason::Unspecified => Reason::from_name(&self.reason).unwrap_or(Reason::Unspecified),
            why => why,
        }
    }
}

/// The name of a raw enum value as carried in a message (`i32`), or `None` when it is
/// unspecified or unknown to this build.
pub fn name_of<T: Named + TryFrom<i32>>(raw: i32) -> Option<&'static str> {
    T::try_from(raw).ok().and_then(Named::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Direction::ALL {
            assert_eq!(Direction::from_name(d.name().unwrap()), Some(*d));
        }
        for s in ConnStatus::ALL {
            assert_eq!(ConnStatus::from_name(s.name().unwrap()), Some(*s));
        }
        for c in ClosedBy::ALL {
            assert_eq!(ClosedBy::from_name(c.name().unwrap()), Some(*c));
        }
        for k in CloseKind::ALL {
            assert_eq!(CloseKind::from_name(k.name().unwrap()), Some(*k));
        }
        for r in Reason::ALL {
            assert_eq!(Reason::from_name(r.name().unwrap()), Some(*r));
        }
        assert_eq!(Direction::from_name("both"), None);
        assert_eq!(name_of::<ClosedBy>(0), None);
        assert_eq!(name_of::<ClosedBy>(99), None);
        assert_eq!(name_of::<ClosedBy>(2), Some("server"));
    }

    #[test]
    fn a_verdict_carries_its_reason_as_a_value_and_as_the_old_text() {
        use crate::intercept::verdict::Action;
        let v = Verdict::because(Action::Forward, Reason::QueueFull);
        assert_eq!(
            (v.action(), v.why(), v.reason.as_str()),
            (Action::Forward, Reason::QueueFull, "queue_full")
        );
        assert_eq!(v.cause(), Reason::QueueFull);
        // From an intercept-svc older than `why`: the text says it.
        let old = Verdict {
            action: Action::Forward as i32,
            reason: "too_large".into(),
            ..Verdict::default()
        };
        assert_eq!(old.cause(), Reason::TooLarge);
        let unknown = Verdict {
            reason: "something new".into(),
            ..Verdict::default()
        };
        assert_eq!(unknown.cause(), Reason::Unspecified);
    }
}
