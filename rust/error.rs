//! The one error type every kernel returns.
//!
//! Kernels know nothing of Python; `rust/python/` maps `Error::Value` to `ValueError` and
//! `Error::Type` to `TypeError`. Messages follow one convention: they open with the argument's name,
//! then say what was expected and what came.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A value outside what the kernel accepts (shape, range, NaN, ...): `ValueError`.
    Value { arg: String, msg: String },
    /// A value of the wrong kind (dtype, layout): `TypeError`.
    Type { arg: String, msg: String },
}

impl Error {
    pub fn value(arg: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Value {
            arg: arg.into(),
            msg: msg.into(),
        }
    }
    pub fn type_(arg: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Type {
            arg: arg.into(),
            msg: msg.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Value { arg, msg } | Error::Type { arg, msg } => write!(f, "{arg}: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// `Err(Error::value(..))` unless `cond` holds; keeps argument checks to one line each.
pub fn ensure(cond: bool, arg: &str, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::value(arg, msg()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_the_argument_first() {
        let e = Error::value("capacity", "expected a positive integer, got 0");
        assert_eq!(
            e.to_string(),
            "capacity: expected a positive integer, got 0"
        );
        assert!(ensure(true, "x", || unreachable!()).is_ok());
        assert_eq!(
            ensure(false, "x", || "bad".into()),
            Err(Error::value("x", "bad"))
        );
    }
}
