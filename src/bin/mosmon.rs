use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mosix::cli::init_tracing_quiet();
    match mosix::cli::mosmon::run(mosix::cli::mosmon::Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosmon: {}", mosix::cli::common::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
