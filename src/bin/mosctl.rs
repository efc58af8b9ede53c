use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mosix::cli::init_tracing_quiet();
    match mosix::cli::mosctl::run(mosix::cli::mosctl::Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
