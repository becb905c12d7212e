//! Splitting a kernel command line into `key[=value]` parameters.
//!
//! Follows Linux's `next_arg`: parameters are separated by ASCII whitespace;
//! whitespace inside double quotes does not split; a value written as
//! `key="a b"` has its surrounding quotes removed. An unbalanced quote runs to
//! the end of the line (as in Linux).

/// One parameter: `key` alone, or `key=value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param<'a> {
    pub key: &'a str,
    pub value: Option<&'a str>,
}

/// Iterator over the parameters of a command line.
#[derive(Clone, Debug)]
pub struct Params<'a> {
    rest: &'a str,
}

/// The parameters of `cmdline`, in order.
pub fn params(cmdline: &str) -> Params<'_> {
    Params { rest: cmdline }
}

impl<'a> Iterator for Params<'a> {
    type Item = Param<'a>;

    fn next(&mut self) -> Option<Param<'a>> {
        let s = self
            .rest
            .trim_start_matches(|c: char| c.is_ascii_whitespace());
        if s.is_empty() {
            self.rest = s;
            return None;
        }
        let mut in_quote = false;
        let mut end = s.len();
        for (i, c) in s.char_indices() {
            if c == '"' {
                in_quote = !in_quote;
            } else if c.is_ascii_whitespace() && !in_quote {
                end = i;
                break;
            }
        }
        let (token, rest) = s.split_at(end);
        self.rest = rest;
        Some(match token.split_once('=') {
            None => Param {
                key: token,
                value: None,
            },
            Some((key, value)) => Param {
                key,
                value: Some(unquote(value)),
            },
        })
    }
}

fn unquote(v: &str) -> &str {
    match v.strip_prefix('"') {
        Some(inner) => inner.strip_suffix('"').unwrap_or(inner),
        None => v,
    }
}

/// Every value given for `key` (a bare `key` yields an empty value).
pub fn values<'a>(cmdline: &'a str, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    params(cmdline)
        .filter(move |p| p.key == key)
        .map(|p| p.value.unwrap_or(""))
}

/// A boolean flag: on when `key` appears bare or as `key=1|on|yes|true`
/// (the last occurrence decides), off when absent or given any other value.
pub fn flag(cmdline: &str, key: &str) -> bool {
    params(cmdline)
        .filter(|p| p.key == key)
        .last()
        .is_some_and(|p| matches!(p.value, None | Some("1" | "on" | "yes" | "true")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: &str) -> ([Option<Param<'_>>; 6], usize) {
        let mut out = [None; 6];
        let mut n = 0;
        for p in params(s) {
            out[n] = Some(p);
            n += 1;
        }
        (out, n)
    }

    fn p<'a>(key: &'a str, value: Option<&'a str>) -> Option<Param<'a>> {
        Some(Param { key, value })
    }

    #[test]
    fn splits_on_whitespace_and_equals() {
        let (ps, n) =
            all("  console=ttyS0 harness.console\tvirtio_mmio.device=4K@0xd0000000:5 a=b=c ");
        assert_eq!(n, 4);
        assert_eq!(ps[0], p("console", Some("ttyS0")));
        assert_eq!(ps[1], p("harness.console", None));
        assert_eq!(ps[2], p("virtio_mmio.device", Some("4K@0xd0000000:5")));
        assert_eq!(ps[3], p("a", Some("b=c")));
    }

    #[test]
    fn quotes_keep_spaces_and_are_removed() {
        let (ps, n) = all(r#"harness.test="console:hello world;message:x y" k=v"#);
        assert_eq!(n, 2);
        assert_eq!(
            ps[0],
            p("harness.test", Some("console:hello world;message:x y"))
        );
        assert_eq!(ps[1], p("k", Some("v")));
        // An unbalanced quote runs to the end, as in Linux.
        let (ps, n) = all(r#"a="b c d"#);
        assert_eq!(n, 1);
        assert_eq!(ps[0], p("a", Some("b c d")));
        // Empty value and empty line.
        assert_eq!(all("a=").0[0], p("a", Some("")));
        assert_eq!(all("   ").1, 0);
        assert_eq!(all("").1, 0);
    }

    #[test]
    fn values_and_flags() {
        let line = "x=1 harness.test=a harness.console=0 y harness.test=b";
        let mut v = values(line, "harness.test");
        assert_eq!(v.next(), Some("a"));
        assert_eq!(v.next(), Some("b"));
        assert_eq!(v.next(), None);
        assert!(!flag(line, "harness.console"));
        assert!(flag(line, "y"));
        assert!(flag("harness.console=on", "harness.console"));
        assert!(flag("harness.console=0 harness.console", "harness.console"));
        assert!(!flag("harness.consoles", "harness.console"));
        assert!(!flag("", "harness.console"));
    }
}
