use clap::Parser;

// One-shot commands: a single-threaded runtime starts faster and every
// command here waits on one thing at a time.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    // mosrun's own start, for the per-start overhead it reports.
    let t0 = std::time::Instant::now();
    mosix::cli::init_tracing_quiet();
    let args = match mosix::cli::mosrun::Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not failures; bad usage is mosrun's
            // own failure (125), never a status the job could have given.
            return if e.use_stderr() {
                exit(mosix::cli::mosrun::EXIT_MOSRUN)
            } else {
                std::process::ExitCode::SUCCESS
            };
        }
    };
    match mosix::cli::mosrun::run(args, t0).await {
        Ok(code) => exit(code),
        Err(e) => {
            eprintln!("mosrun: {}", mosix::cli::common::error_chain(&e));
            exit(mosix::cli::mosrun::EXIT_MOSRUN)
        }
    }
}

fn exit(code: i32) -> std::process::ExitCode {
    std::process::ExitCode::from(code.clamp(0, 255) as u8)
}
