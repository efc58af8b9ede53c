use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before the runtime starts its threads, so that they all inherit it
    // (see core::MIGRATION_NICE); jobs are started at the nice value the
    // agent had.
    mosix::core::raise_own_priority(mosix::core::MIGRATION_NICE);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mosixd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve())
}

async fn serve() -> std::process::ExitCode {
    mosix::cli::init_tracing();
    match mosix::cli::mosixd::run(mosix::cli::mosixd::Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosixd: {}", mosix::cli::common::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
