//! `mosmake`: GNU make whose compile jobs start on the best nodes of the
//! cluster — the MPMake of the article, for today.
//!
//! **How make is hooked: the SHELL of object targets.** `mosmake ARGS…`
//! runs `make ARGS… '--eval=%.o: override SHELL := <mosmake-sh>'`. Make
//! hands every recipe line of an object target to `$(SHELL) -c LINE`,
//! already expanded, and passes `--eval` on to every sub-make through
//! `MAKEFLAGS`. Only object targets: every other recipe line and every
//! `$(shell …)` keeps `/bin/sh`, and with it make's own fast path (a simple
//! command is exec'd without any shell). Hooking every line (`SHELL=` on the
//! command line, as mosmake first did; `MOSMAKE_TARGETS=all` still does)
//! put one more exec in front of each of the kernel build's ~5,800 local
//! lines: `perf` showed `mosmake-sh` using more CPU than make and all its
//! shells together (3.5% of the machine), all of it on the home node, which
//! is the one that must keep every other node fed. `mosmake-sh`
//! decides per line ([`classify`]): a compile of a real source file is
//! exec'd as `mosrun --best --rerun-on-node-loss -- <real shell> -c LINE`,
//! anything else is exec'd as `<real shell> -c LINE` right here. Why SHELL and
//! not a `CC=` wrapper: it needs no cooperation from the Makefile (any
//! variable name, any compiler, no rebuild because the recorded command line
//! changed), make itself is unmodified, and a whole compile line — Kbuild's
//! compiler plus its `fixdep` — runs where the compiler runs. `exec` (not a
//! child) keeps make's view exact: the exit status, signals and file
//! descriptors are those of the shell or of `mosrun`, as if make had started
//! them itself.
//!
//! **Compiles yield to make.** The compiles run at nice 10 (`mosrun
//! --nice 10`). On the home node they share the CPU with make itself, the
//! shells of the local steps and the `mosrun` clients, which together decide
//! how fast work reaches every other node: at equal priority, six compiles
//! on a 0.6-core home left make a seventh of it, and the other nodes waited
//! below their caps (measured: the home at 100% of its cap, the others at
//! 80%). Elsewhere the compiles compete only with each other, so the nice
//! value changes nothing there, except that a node's own work comes first,
//! as MOSIX ran its guests.
//!
//! Compiles are safe to repeat (same inputs, same output file), so mosmake
//! turns on `--rerun-on-node-loss`: a compile whose node dies is started again
//! elsewhere, and `mosrun` says so on stderr. Objects are the same as a local
//! build's because the same compiler runs the same line in the same directory
//! (every node sees the same path).
//!
//! **The protocol between the two** (environment variables that `mosmake`
//! sets for make):
//!
//! | variable | meaning |
//! |---|---|
//! | `MOSMAKE_SH_SHELL` | the real shell (`/bin/sh`, or the user's `SHELL=` argument) |
//! | `MOSMAKE_SH_RUN` | the command that runs a line remotely, one argument per line (`\n`-separated), e.g. `/…/mosrun`, `--best`, `--rerun-on-node-loss`, `--` |
//! | `MOSMAKE_SH_LOG` | a file to which `mosmake-sh` appends `R` or `L` per line it decided (O_APPEND: one write each) |
//! | `MOSMAKE_SH_CC` | more compiler names, space-separated (from `MOSMAKE_CC`) |
//! | `MOSIX_RUN_STATS` | where `mosrun` appends one stats line per run ([`stats`]) |
//!
//! Without `MOSMAKE_SH_SHELL`, `mosmake-sh` is just `/bin/sh`.
//!
//! **User knobs** (environment, since every argument belongs to make):
//! `MOSMAKE_RUN` (default `mosrun --best --rerun-on-node-loss --nice 10 --`, with the
//! `mosrun` next to `mosmake` preferred), `MOSMAKE_MAKE` (default `make`),
//! `MOSMAKE_CC`, `MOSMAKE_STATS` (keep the stats lines in this file),
//! `MOSMAKE_TARGETS` (target patterns whose recipes may go remote, default
//! `%.o`; `all` for every recipe line and `$(shell …)`),
//! `MOSIX_CLUSTER` (as for every command).

pub mod args;
pub mod classify;
pub mod stats;

pub const ENV_SHELL: &str = "MOSMAKE_SH_SHELL";
pub const ENV_RUN: &str = "MOSMAKE_SH_RUN";
pub const ENV_LOG: &str = "MOSMAKE_SH_LOG";
pub const ENV_CC: &str = "MOSMAKE_SH_CC";
pub const ENV_RUN_STATS: &str = "MOSIX_RUN_STATS";

/// The remote-run prefix when `MOSMAKE_RUN` is not set (the program is
/// resolved by the caller).
pub const DEFAULT_RUN: &str = "mosrun --best --rerun-on-node-loss --nice 10 --";
