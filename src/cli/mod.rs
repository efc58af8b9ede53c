//! User commands. Each binary in `src/bin` is a thin `main` over a module here.

pub mod common;
pub mod mos_balance;
pub mod mosctl;
pub mod mosgw;
pub mod mosixd;
pub mod mosmake;
pub mod mosmake_sh;
pub mod mosmon;
pub mod mosrun;

/// Log to stderr, filtered by `RUST_LOG` (default: info).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// For user commands: only warnings and errors, unless `RUST_LOG` says more.
pub fn init_tracing_quiet() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks every command's definition (conflicting flags, bad
    /// defaults) here instead of panicking at a user's first call.
    #[test]
    fn every_cli_definition_is_consistent() {
        super::mosctl::Args::command().debug_assert();
        super::mosrun::Args::command().debug_assert();
        super::mosixd::Args::command().debug_assert();
        super::mos_balance::Args::command().debug_assert();
        super::mosmon::Args::command().debug_assert();
        super::mosgw::Args::command().debug_assert();
    }
}
