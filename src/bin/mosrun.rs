use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mosix::cli::init_tracing_quiet();
    match mosix::cli::mosrun::run(mosix::cli::mosrun::Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosrun: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
