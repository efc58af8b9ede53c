use clap::Parser;

// One-shot commands: a single-threaded runtime starts faster and every
// command here waits on one thing at a time.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    mosix::cli::init_tracing_quiet();
    match mosix::cli::mosctl::run(mosix::cli::mosctl::Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosctl: {}", mosix::cli::common::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
