//! The SHELL `mosmake` gives make: see `mosix::cli::mosmake_sh`. No async
//! runtime and no logging set-up: make starts one per recipe line.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = mosix::cli::mosmake_sh::run(args);
    std::process::ExitCode::from(code.clamp(0, 255) as u8)
}
