use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mosix::cli::init_tracing();
    match mosix::cli::mosgw::run(mosix::cli::mosgw::Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosgw: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
