//! The agent's typed error. Each variant maps to one gRPC status code (see
//! `api::convert`), so a caller can tell "bad input" from "CRIU failed".

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AgentError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    /// CRIU (or a step of the protocol) failed; the message says where the job is.
    #[error("{0}")]
    Aborted(String),
    /// Images failed verification.
    #[error("{0}")]
    DataLoss(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
}

impl From<crate::core::ids::IdError> for AgentError {
    fn from(e: crate::core::ids::IdError) -> Self {
        AgentError::InvalidArgument(e.to_string())
    }
}

impl From<crate::core::registry::RegistryError> for AgentError {
    fn from(e: crate::core::registry::RegistryError) -> Self {
        use crate::core::registry::RegistryError as R;
        if e.is_disk_full() {
            return AgentError::ResourceExhausted(format!("disk is full: {e}"));
        }
        match e {
            R::NotFound(id) => AgentError::NotFound(format!("no job {id} in the cluster")),
            f @ R::Fenced(_) => AgentError::Unavailable(f.to_string()),
            other => AgentError::Internal(other.to_string()),
        }
    }
}

impl From<crate::criu::CriuError> for AgentError {
    fn from(e: crate::criu::CriuError) -> Self {
        use crate::criu::CriuError as C;
        match e {
            C::Missing(_) => AgentError::Unavailable(e.to_string()),
            C::DiskFull { .. } => AgentError::ResourceExhausted(e.to_string()),
            C::Refused(why) => AgentError::DataLoss(format!("images refused: {why}")),
            C::Io { ref source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                AgentError::ResourceExhausted(e.to_string())
            }
            _ => AgentError::Aborted(e.to_string()),
        }
    }
}

impl AgentError {
    /// Prefix the message with context, keeping the kind.
    pub fn context(self, ctx: &str) -> Self {
        use AgentError::*;
        match self {
            InvalidArgument(m) => InvalidArgument(format!("{ctx}: {m}")),
            NotFound(m) => NotFound(format!("{ctx}: {m}")),
            FailedPrecondition(m) => FailedPrecondition(format!("{ctx}: {m}")),
            PermissionDenied(m) => PermissionDenied(format!("{ctx}: {m}")),
            Unavailable(m) => Unavailable(format!("{ctx}: {m}")),
            Aborted(m) => Aborted(format!("{ctx}: {m}")),
            DataLoss(m) => DataLoss(format!("{ctx}: {m}")),
            ResourceExhausted(m) => ResourceExhausted(format!("{ctx}: {m}")),
            Internal(m) => Internal(format!("{ctx}: {m}")),
        }
    }
}

pub type AgentResult<T> = Result<T, AgentError>;
