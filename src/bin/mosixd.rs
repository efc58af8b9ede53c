use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mosix::cli::init_tracing();
    match mosix::cli::mosixd::run(mosix::cli::mosixd::Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosixd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
