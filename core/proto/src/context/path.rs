//! Paths into a context: JSON Pointers (RFC 6901).
//!
//! `""` is the whole document, `/settings/theme` a key of a key, `/tabs/0`
//! the first element of a list and `/tabs/-` the end of a list (for
//! inserting). Inside a segment `~1` stands for `/` and `~0` for `~`, so
//! any key can be named: the key `a/b` is `/a~1b`.

use std::fmt;
use std::str::FromStr;

/// One step of a path: a map key, or a list position.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Segment {
    /// A map key, or a list index written in decimal (decided when the path
    /// meets the document).
    Key(String),
    /// The position after the last element of a list (`-`).
    End,
}

impl Segment {
    /// The segment as a list index, if it is one (`0`, `17`; not `01`).
    pub fn index(&self) -> Option<usize> {
        match self {
            Segment::Key(k) if k == "0" => Some(0),
            Segment::Key(k) if !k.starts_with('0') && !k.is_empty() => k.parse().ok(),
            _ => None,
        }
    }
}

/// A parsed JSON Pointer.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Path(pub Vec<Segment>);

/// A string that is not a JSON Pointer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a JSON Pointer (it must be empty or start with `/`; `~` must be followed by 0 or 1)")]
pub struct BadPath(pub String);

impl Path {
    /// The whole document.
    pub fn root() -> Path {
        Path(Vec::new())
    }

    /// The path with one more segment.
    pub fn child(&self, segment: Segment) -> Path {
        let mut p = self.clone();
        p.0.push(segment);
        p
    }

    /// The parent path and the last segment; `None` for the root.
    pub fn split_last(&self) -> Option<(Path, &Segment)> {
        let (last, parent) = self.0.split_last()?;
        Some((Path(parent.to_vec()), last))
    }

    /// Whether `self` is `prefix` or lies below it.
    pub fn starts_with(&self, prefix: &Path) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// Whether either path lies within the other (a change at one may
    /// affect the other).
    pub fn overlaps(&self, other: &Path) -> bool {
        self.starts_with(other) || other.starts_with(self)
    }
}

impl FromStr for Path {
    type Err = BadPath;

    fn from_str(s: &str) -> Result<Path, BadPath> {
        if s.is_empty() {
            return Ok(Path::root());
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Err(BadPath(s.to_owned()));
        };
        rest.split('/')
            .map(|raw| {
                if raw == "-" {
                    return Ok(Segment::End);
                }
                let mut out = String::with_capacity(raw.len());
                let mut chars = raw.chars();
                while let Some(c) = chars.next() {
                    if c == '~' {
                        match chars.next() {
                            Some('0') => out.push('~'),
                            Some('1') => out.push('/'),
                            _ => return Err(BadPath(s.to_owned())),
                        }
                    } else {
                        out.push(c);
                    }
                }
                Ok(Segment::Key(out))
            })
            .collect::<Result<_, _>>()
            .map(Path)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for seg in &self.0 {
            f.write_str("/")?;
            match seg {
                Segment::End => f.write_str("-")?,
                Segment::Key(k) => f.write_str(&k.replace('~', "~0").replace('/', "~1"))?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_parse_and_print_with_escapes() {
        let p: Path = "/a~1b/c~0d/0/-".parse().expect("valid");
        assert_eq!(
            p.0,
            vec![
                Segment::Key("a/b".into()),
                Segment::Key("c~d".into()),
                Segment::Key("0".into()),
                Segment::End
            ]
        );
        assert_eq!(p.to_string(), "/a~1b/c~0d/0/-");
        assert_eq!("".parse::<Path>(), Ok(Path::root()));
        assert!("a/b".parse::<Path>().is_err());
        assert!("/a~2".parse::<Path>().is_err());
        assert_eq!(Segment::Key("01".into()).index(), None);
        assert_eq!(Segment::Key("12".into()).index(), Some(12));
    }
}
