//! `mosmake [make args…]`: see `mosix::cli::mosmake`.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match mosix::cli::mosmake::run(args) {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("mosmake: {}", mosix::cli::common::error_chain(&e));
            std::process::ExitCode::from(2)
        }
    }
}
