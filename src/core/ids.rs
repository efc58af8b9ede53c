//! Validated identifiers. Every id that reaches a path on the shared root goes
//! through here first, so `../`, `/` or NUL can never escape it.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("invalid {kind} {value:?}: {why}")]
    Invalid {
        kind: &'static str,
        value: String,
        why: &'static str,
    },
}

fn validate(kind: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    let bad = |why| {
        Err(IdError::Invalid {
            kind,
            // Cap what we echo back so a huge bogus id does not flood logs.
            value: value.chars().take(80).collect(),
            why,
        })
    };
    if value.is_empty() {
        return bad("must not be empty");
    }
    if value.len() > max {
        return bad("too long");
    }
    let mut chars = value.chars();
    let first = chars.next().unwrap_or('-');
    if !first.is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return bad("may only contain letters, digits, '-', '_' and '.'");
    }
    if value.contains("..") {
        return bad("must not contain '..'");
    }
    Ok(())
}

macro_rules! id_type {
    ($name:ident, $kind:literal, $max:expr) => {
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, IdError> {
                validate($kind, value, $max)?;
                Ok(Self(value.to_string()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                validate($kind, &value, $max)?;
                Ok(Self(value))
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

id_type!(JobId, "job id", 64);
id_type!(NodeName, "node name", 63);
id_type!(MigrationId, "migration id", 64);
// A file name that travels over the wire (image files pushed from agent to
// agent when nothing is shared): a plain name, never a path.
id_type!(PlainFileName, "file name", 255);

impl JobId {
    /// A fresh job id: `j` and 10 hex digits of a v4 uuid.
    pub fn generate() -> Self {
        let u = uuid::Uuid::new_v4().simple().to_string();
        Self(format!("j{}", &u[..10]))
    }
}

impl MigrationId {
    pub fn generate() -> Self {
        Self(format!("m{}", uuid::Uuid::new_v4().simple()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids() {
        assert!(JobId::parse("j0123abcd").is_ok());
        assert!(NodeName::parse("node1").is_ok());
        assert!(NodeName::parse("node-1.rack_2").is_ok());
        assert!(JobId::generate().as_str().starts_with('j'));
    }

    #[test]
    fn refuses_traversal_and_junk() {
        for bad in [
            "", "../etc", "a/b", "..", "a..b", ".hidden", "-x", "a b", "a\0b", "é",
        ] {
            assert!(JobId::parse(bad).is_err(), "{bad:?} accepted");
            assert!(NodeName::parse(bad).is_err(), "{bad:?} accepted");
            assert!(PlainFileName::parse(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "pages-1.img",
            "MANIFEST.json",
            "tmpfs-dev-70.tar.gz.img",
            "stdout",
        ] {
            assert!(PlainFileName::parse(good).is_ok(), "{good:?} refused");
        }
        assert!(JobId::parse(&"a".repeat(65)).is_err());
    }

    #[test]
    fn serde_validates() {
        let ok: Result<JobId, _> = serde_json::from_str("\"j1\"");
        assert!(ok.is_ok());
        let bad: Result<JobId, _> = serde_json::from_str("\"../x\"");
        assert!(bad.is_err());
    }
}
