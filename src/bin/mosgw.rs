use clap::Parser;

// A proxy allocates and frees small buffers for every request (bodies, the
// table's scratch vectors); glibc's malloc cost ~7% of the gateway's CPU at full load
// (perf, `make bench-gw`), mimalloc's per-thread free lists far less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mosix::cli::init_tracing();
    let args = mosix::cli::mosgw::Args::parse();
    let threads = match args.threads {
        Some(0) => {
            eprintln!("mosgw: --threads must be at least 1");
            return std::process::ExitCode::from(2);
        }
        Some(n) => n,
        // Respects taskset/cpusets: the CPUs we may actually use.
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let rt = if threads == 1 && std::env::var_os("MOSGW_MT1").is_none() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mosgw: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(mosix::cli::mosgw::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosgw: {}", mosix::cli::common::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
