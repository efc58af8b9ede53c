use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mosix::cli::init_tracing();
    match mosix::cli::mos_balance::run(mosix::cli::mos_balance::Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mos-balance: {}", mosix::cli::common::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
