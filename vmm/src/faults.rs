//! Fault injection for virtio-blk: which requests the device fails on purpose.
//!
//! A plan names requests by kind and by their 1-based count since boot
//! ("the 3rd FLUSH", "every WRITE from the 2nd on"). The device completes a
//! chosen request with `VIRTIO_BLK_S_IOERR` without touching the backend, so
//! a failed write leaves the disk as it was and a failed flush makes nothing
//! durable. See [`crate::devices::virtio::Block::set_faults`] for what counts
//! as a request.
//!
//! In scenario files (serde, kebab-case):
//!
//! ```json
//! { "fail-flushes": [{ "nth": 3 }, { "nth": 5, "onward": true }], "fail-writes": [] }
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A virtio-blk request kind that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlkRequest {
    /// `VIRTIO_BLK_T_OUT`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
}

impl fmt::Display for BlkRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlkRequest::Write => "write",
            BlkRequest::Flush => "flush",
        })
    }
}

/// Why a fault plan is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// Requests are counted from 1; a 0th request never comes.
    #[error("request counts start at 1 (the first request is 1), not 0")]
    ZeroNth,
    /// Not `N` or `N+`.
    #[error("`{0}` is not N or N+ (N a whole number from 1: `3` fails the 3rd request, `2+` the 2nd and every later one)")]
    BadSpec(String),
}

/// Which requests of one kind fail: the `nth` since boot (1-based) and, with
/// `onward`, every later one too. Written `N` or `N+` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "RawFaultWhen")]
pub struct FaultWhen {
    pub nth: u64,
    pub onward: bool,
}

/// The serde form before validation (so a scenario file cannot carry `nth: 0`).
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawFaultWhen {
    nth: u64,
    #[serde(default)]
    onward: bool,
}

impl TryFrom<RawFaultWhen> for FaultWhen {
    type Error = FaultError;
    fn try_from(r: RawFaultWhen) -> Result<Self, FaultError> {
        FaultWhen::new(r.nth, r.onward)
    }
}

impl FaultWhen {
    /// The `nth` request (1-based), and every later one when `onward`.
    pub fn new(nth: u64, onward: bool) -> Result<Self, FaultError> {
        if nth == 0 {
            return Err(FaultError::ZeroNth);
        }
        Ok(FaultWhen { nth, onward })
    }

    /// Exactly the `nth` request.
    pub fn nth(nth: u64) -> Result<Self, FaultError> {
        Self::new(nth, false)
    }

    /// The `nth` request and every later one.
    pub fn from_nth_on(nth: u64) -> Result<Self, FaultError> {
        Self::new(nth, true)
    }

    /// Whether the request numbered `count` (1-based) fails.
    pub fn matches(&self, count: u64) -> bool {
        count == self.nth || (self.onward && count > self.nth)
    }

    fn check(&self) -> Result<(), FaultError> {
        Self::new(self.nth, self.onward).map(|_| ())
    }
}

impl FromStr for FaultWhen {
    type Err = FaultError;
    /// `N` or `N+`, N decimal from 1.
    fn from_str(s: &str) -> Result<Self, FaultError> {
        let (digits, onward) = match s.strip_suffix('+') {
            Some(d) => (d, true),
            None => (s, false),
        };
        // u64::from_str accepts a leading `+`; "++3" or "+3" are typos, not counts.
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FaultError::BadSpec(s.to_string()));
        }
        let nth = digits
            .parse()
            .map_err(|_| FaultError::BadSpec(s.to_string()))?;
        Self::new(nth, onward)
    }
}

impl fmt::Display for FaultWhen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.nth, if self.onward { "+" } else { "" })
    }
}

/// The virtio-blk fault plan of a run. The default fails nothing; a request
/// fails when any entry of its kind matches it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct BlkFaults {
    /// Which OUT requests fail.
    pub fail_writes: Vec<FaultWhen>,
    /// Which FLUSH requests fail.
    pub fail_flushes: Vec<FaultWhen>,
}

impl BlkFaults {
    /// No request fails.
    pub fn is_empty(&self) -> bool {
        self.fail_writes.is_empty() && self.fail_flushes.is_empty()
    }

    /// Whether request number `count` (1-based, counted per kind) of `kind` fails.
    pub fn fails(&self, kind: BlkRequest, count: u64) -> bool {
        let list = match kind {
            BlkRequest::Write => &self.fail_writes,
            BlkRequest::Flush => &self.fail_flushes,
        };
        list.iter().any(|w| w.matches(count))
    }

    /// Refuses entries built by hand with `nth: 0` (the fields are public).
    pub fn validate(&self) -> Result<(), FaultError> {
        self.fail_writes
            .iter()
            .chain(&self.fail_flushes)
            .try_for_each(FaultWhen::check)
    }
}

/// A request the device failed on purpose, as the run reports it (field
/// names as in the run summary it is part of, like [`crate::MarkerRecord`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectedFault {
    pub kind: BlkRequest,
    /// Which request of its kind it was (1-based, since boot).
    pub nth: u64,
    /// The first sector of a failed write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sector: Option<u64>,
    /// `(window index, trace position)` when tracing was on: the number of
    /// events recorded before it (the request itself records none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_pos: Option<(usize, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nth_matches_once_and_onward_matches_from_nth() {
        let third = FaultWhen::nth(3).unwrap();
        let from2 = FaultWhen::from_nth_on(2).unwrap();
        let hits = |w: FaultWhen| (1..=6).filter(|&c| w.matches(c)).collect::<Vec<_>>();
        assert_eq!(hits(third), vec![3]);
        assert_eq!(hits(from2), vec![2, 3, 4, 5, 6]);
        assert!(from2.matches(u64::MAX));
    }

    #[test]
    fn plan_is_per_kind_and_a_union_of_its_entries() {
        let plan = BlkFaults {
            fail_writes: vec![FaultWhen::nth(1).unwrap()],
            fail_flushes: vec![
                FaultWhen::nth(2).unwrap(),
                FaultWhen::from_nth_on(5).unwrap(),
            ],
        };
        let flushes: Vec<_> = (1..=7)
            .filter(|&c| plan.fails(BlkRequest::Flush, c))
            .collect();
        assert_eq!(flushes, vec![2, 5, 6, 7]);
        let writes: Vec<_> = (1..=7)
            .filter(|&c| plan.fails(BlkRequest::Write, c))
            .collect();
        assert_eq!(writes, vec![1]);
        assert!(!plan.is_empty());
        let none = BlkFaults::default();
        assert!(none.is_empty());
        assert!((1..100)
            .all(|c| !none.fails(BlkRequest::Write, c) && !none.fails(BlkRequest::Flush, c)));
    }

    #[test]
    fn command_line_form_parses_and_round_trips() {
        assert_eq!(
            "3".parse(),
            Ok(FaultWhen {
                nth: 3,
                onward: false
            })
        );
        assert_eq!(
            "2+".parse(),
            Ok(FaultWhen {
                nth: 2,
                onward: true
            })
        );
        assert_eq!("0".parse::<FaultWhen>(), Err(FaultError::ZeroNth));
        assert_eq!("0+".parse::<FaultWhen>(), Err(FaultError::ZeroNth));
        for bad in [
            "",
            "+",
            "+3",
            "3++",
            "-1",
            "x",
            "3 ",
            "1.5",
            "99999999999999999999",
        ] {
            assert_eq!(
                bad.parse::<FaultWhen>(),
                Err(FaultError::BadSpec(bad.into())),
                "{bad:?}"
            );
        }
        for s in ["1", "7+", "18446744073709551615"] {
            assert_eq!(s.parse::<FaultWhen>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn serde_form_is_kebab_case_and_refuses_nth_zero() {
        let plan = BlkFaults {
            fail_writes: vec![],
            fail_flushes: vec![
                FaultWhen::nth(3).unwrap(),
                FaultWhen::from_nth_on(2).unwrap(),
            ],
        };
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(
            json,
            r#"{"fail-writes":[],"fail-flushes":[{"nth":3,"onward":false},{"nth":2,"onward":true}]}"#
        );
        assert_eq!(serde_json::from_str::<BlkFaults>(&json).unwrap(), plan);
        // Omitted lists and `onward` default to nothing.
        let short: BlkFaults = serde_json::from_str(r#"{"fail-flushes":[{"nth":3}]}"#).unwrap();
        assert_eq!(short.fail_flushes, vec![FaultWhen::nth(3).unwrap()]);
        assert!(short.fail_writes.is_empty());
        assert_eq!(
            serde_json::from_str::<BlkFaults>("{}").unwrap(),
            BlkFaults::default()
        );
        let zero = serde_json::from_str::<BlkFaults>(r#"{"fail-writes":[{"nth":0}]}"#);
        assert!(zero.unwrap_err().to_string().contains("start at 1"));
        assert!(serde_json::from_str::<BlkFaults>(r#"{"fail-flush":[]}"#).is_err());
        assert!(
            serde_json::from_str::<BlkFaults>(r#"{"fail-writes":[{"nth":1,"every":true}]}"#)
                .is_err()
        );
    }

    #[test]
    fn validate_catches_hand_built_zero() {
        let mut plan = BlkFaults::default();
        assert_eq!(plan.validate(), Ok(()));
        plan.fail_flushes.push(FaultWhen {
            nth: 0,
            onward: true,
        });
        assert_eq!(plan.validate(), Err(FaultError::ZeroNth));
    }
}
