//! Fleet errors: each names its cause.

/// An error of the fleet layer.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
}

/// The cause of an [`Error`].
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// etcd could not be reached or refused a request.
    Etcd {
        /// What was asked.
        operation: String,
        /// etcd's (or the client's) message.
        message: String,
    },
    /// Something the command needs does not exist.
    NotFound {
        /// What.
        what: String,
    },
    /// The request is not valid (bad arguments, a state that does not allow it).
    Invalid {
        /// Why.
        reason: String,
    },
    /// A patch artifact could not be fetched, or failed verification.
    Artifact {
        /// The artifact's digest.
        sha256: String,
        /// Why.
        reason: String,
    },
    /// A file could not be read or written.
    Io {
        /// The file.
        path: String,
        /// The system's message.
        message: String,
    },
}

impl Error {
    /// An error of the given kind.
    pub fn new(kind: ErrorKind) -> Error {
        Error { kind }
    }

    /// The cause.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// An invalid request.
    pub fn invalid(reason: impl Into<String>) -> Error {
        Error::new(ErrorKind::Invalid {
            reason: reason.into(),
        })
    }

    /// A missing thing.
    pub fn not_found(what: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound { what: what.into() })
    }

    /// An etcd failure during `operation`.
    pub fn etcd(operation: impl Into<String>, e: impl std::fmt::Display) -> Error {
        Error::new(ErrorKind::Etcd {
            operation: operation.into(),
            message: e.to_string(),
        })
    }

    /// A file error.
    pub fn io(path: impl AsRef<std::path::Path>, e: impl std::fmt::Display) -> Error {
        Error::new(ErrorKind::Io {
            path: path.as_ref().display().to_string(),
            message: e.to_string(),
        })
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            ErrorKind::Etcd { operation, message } => write!(f, "etcd: {operation}: {message}"),
            ErrorKind::NotFound { what } => write!(f, "{what} not found"),
            ErrorKind::Invalid { reason } => f.write_str(reason),
            ErrorKind::Artifact { sha256, reason } => {
                write!(
                    f,
                    "artifact sha256:{}: {reason}",
                    &sha256[..sha256.len().min(12)]
                )
            }
            ErrorKind::Io { path, message } => write!(f, "{path}: {message}"),
        }
    }
}

impl std::error::Error for Error {}

/// The fleet's result type.
pub type Result<T> = std::result::Result<T, Error>;
