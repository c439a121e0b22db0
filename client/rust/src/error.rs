//! The error type: the broker's refusals (one [`ErrorCode`] each) and the client's own failures.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// Every error code a broker answers with (`docs/protocol.md`, "Errors").
///
/// Stable: match on it rather than on the message. A code this crate does not
/// know yet (from a newer broker) is kept as [`ErrorCode::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// `bad-request`: not JSON, a missing or ill-typed field, a value out of bounds, an unknown field.
    BadRequest,
    /// `unknown-op`: the `op` names no operation this broker knows.
    UnknownOp,
    /// `version`: `hello` named a protocol version the broker does not speak.
    Version,
    /// `hello-required`: a request before a successful `hello`.
    HelloRequired,
    /// `line-too-long`: a request line over 8192 bytes; the broker closes the connection.
    LineTooLong,
    /// `too-large`: `count` is above the per-request limit or the size of the whole range.
    TooLarge,
    /// `exhausted`: no run of `count` free ports now; [`Error::largest`] says what would fit.
    Exhausted,
    /// `quota`: the caller's uid or connection holds as much as the limits allow.
    Quota,
    /// `not-found`: no lease has this token (never granted, released, or expired).
    NotFound,
    /// `in-use`: `reclaim` of a lease another live connection holds.
    InUse,
    /// `busy`: the broker is out of a resource (file descriptors, disk) or stopping; retry later.
    Busy,
    /// `internal`: a bug in the broker; the request was not carried out.
    Internal,
    /// A code this version of the crate does not know, as the broker sent it.
    Other(String),
}

impl ErrorCode {
    /// Every code the protocol defines, in the order of `docs/protocol.md`.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::Version,
        ErrorCode::HelloRequired,
        ErrorCode::LineTooLong,
        ErrorCode::TooLarge,
        ErrorCode::Exhausted,
        ErrorCode::Quota,
        ErrorCode::NotFound,
        ErrorCode::InUse,
        ErrorCode::Busy,
        ErrorCode::Internal,
    ];

    /// The code as it appears on the wire (`"not-found"`, …).
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::UnknownOp => "unknown-op",
            ErrorCode::Version => "version",
            ErrorCode::HelloRequired => "hello-required",
            ErrorCode::LineTooLong => "line-too-long",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::Exhausted => "exhausted",
            ErrorCode::Quota => "quota",
            ErrorCode::NotFound => "not-found",
            ErrorCode::InUse => "in-use",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
            ErrorCode::Other(code) => code,
        }
    }

    /// The code for a wire string; unknown strings become [`ErrorCode::Other`].
    pub fn from_wire(code: &str) -> ErrorCode {
        ErrorCode::ALL
            .iter()
            .find(|known| known.as_str() == code)
            .cloned()
            .unwrap_or_else(|| ErrorCode::Other(code.to_owned()))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Ok(ErrorCode::from_wire(&code))
    }
}

/// Everything that can go wrong talking to a broker.
///
/// Its `Display` is a whole sentence for people; match on the variant, or on
/// [`Error::code`] for the broker's refusals.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The broker refused the request (`{"reply":"error",…}`).
    Refused {
        /// The stable code.
        code: ErrorCode,
        /// The broker's message, for people.
        message: String,
        /// With [`ErrorCode::Exhausted`]: the largest count that would be granted now.
        largest: Option<u64>,
    },
    /// No broker answers at the socket. The message names the path and how to start one.
    Unavailable {
        /// The socket that was tried.
        path: PathBuf,
        /// What went wrong and what to do.
        message: String,
    },
    /// The socket was refused before anything was sent to it: someone else may own it.
    UnsafeSocket {
        /// The socket that was refused.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The connection to the broker closed (or timed out) with a request in flight.
    ConnectionLost(String),
    /// A lease could not be reclaimed after the broker restarted: stop using its ports.
    LeaseLost {
        /// The ports of the lost lease.
        ports: Vec<u16>,
        /// Why it was lost.
        message: String,
    },
    /// The broker sent something this client cannot read.
    Protocol(String),
}

impl Error {
    /// The broker's error code, for a refusal.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Error::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// With `exhausted`: the largest count the broker would grant now.
    pub fn largest(&self) -> Option<u64> {
        match self {
            Error::Refused { largest, .. } => *largest,
            _ => None,
        }
    }

    /// The socket path, when the error is about reaching the broker.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Unavailable { path, .. } | Error::UnsafeSocket { path, .. } => Some(path),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Refused { code, message, .. } => write!(f, "{code}: {message}"),
            Error::Unavailable { message, .. }
            | Error::UnsafeSocket { message, .. }
            | Error::LeaseLost { message, .. } => f.write_str(message),
            Error::ConnectionLost(why) => f.write_str(why),
            Error::Protocol(why) => write!(f, "unexpected reply from the portlease broker: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
