//! Which recipe lines go to the cluster: a compile of a real source file.
//!
//! `mosmake-sh` sees every line make hands its shell — recipe lines and
//! `$(shell …)` calls alike, already expanded by make. A line is sent through
//! `mosrun` when one of its simple commands is a C/C++/assembler compiler
//! invocation with `-c`, a source file with a source suffix as input, and no
//! sign of a probe: Kbuild and autoconf probe the compiler with `/dev/null`
//! or `-` (stdin) as input or `-o /dev/null`, many times per make run, and
//! each takes milliseconds locally — sending them away would cost more than
//! they do, and a probe that reads stdin has nothing to compile remotely.
//! Everything else (links, archives, code generators, sub-makes, `echo`)
//! runs locally, exactly as make would run it.
//!
//! The whole line goes, not just the compiler: Kbuild's compile line also runs
//! `fixdep` on the `.d` file the compiler wrote, and that belongs with it.
//! A false positive costs only a remote start (every node sees the same
//! files); a false negative only a local compile.
//!
//! The lexer is a small subset of the POSIX shell grammar — quotes, backslash,
//! comments and the control operators that separate simple commands — which
//! is all it takes to find command words; it never executes or rewrites the
//! line.

/// Where a line runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Through `mosrun` on the best node.
    Remote,
    /// Here, by the real shell.
    Local,
}

/// Decide for one shell line; `extra_compilers` are more command names (or
/// paths) to treat as compilers, e.g. from `MOSMAKE_CC`.
pub fn classify(line: &str, extra_compilers: &[String]) -> Decision {
    for cmd in simple_commands(line) {
        if is_remote_compile(&cmd, extra_compilers) {
            return Decision::Remote;
        }
    }
    Decision::Local
}

/// Words that may precede the command word of a simple command.
const PREFIX_WORDS: &[&str] = &[
    "!", "{", "if", "then", "else", "elif", "do", "while", "until", "exec", "command", "time",
];

/// Compiler options whose value is the next word (so it is not an input).
const OPTS_WITH_VALUE: &[&str] = &[
    "-o",
    "-MF",
    "-MT",
    "-MQ",
    "-include",
    "-imacros",
    "-x",
    "-I",
    "-isystem",
    "-iquote",
    "-idirafter",
    "-D",
    "-U",
    "--param",
    "-Xassembler",
    "-Xpreprocessor",
    "-Xlinker",
    "-T",
    "-L",
    "-l",
    "-aux-info",
    "-specs",
];

const SOURCE_SUFFIXES: &[&str] = &[
    ".c", ".cc", ".cp", ".cpp", ".cxx", ".c++", ".C", ".S", ".s", ".sx", ".i", ".ii",
];

fn is_compiler(word: &str, extra: &[String]) -> bool {
    if extra.iter().any(|e| e == word) {
        return true;
    }
    let base = word.rsplit('/').next().unwrap_or(word);
    if extra
        .iter()
        .any(|e| e.rsplit('/').next().unwrap_or(e) == base)
    {
        return true;
    }
    const NAMES: &[&str] = &["cc", "gcc", "clang", "c++", "g++", "clang++", "c89", "c99"];
    if NAMES.contains(&base) {
        return true;
    }
    // Cross and versioned names: x86_64-linux-gnu-gcc, gcc-12, clang-16,
    // x86_64-linux-gnu-gcc-12.
    let unversioned = base.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    let unversioned = unversioned.strip_suffix('-').unwrap_or(base);
    NAMES.contains(&unversioned)
        || NAMES
            .iter()
            .any(|n| unversioned.ends_with(&format!("-{n}")))
}

fn is_assignment(word: &str) -> bool {
    match word.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        None => false,
    }
}

fn is_remote_compile(words: &[String], extra: &[String]) -> bool {
    let mut rest = words
        .iter()
        .skip_while(|w| PREFIX_WORDS.contains(&w.as_str()) || is_assignment(w));
    let Some(argv0) = rest.next() else {
        return false;
    };
    let mut argv0 = argv0.as_str();
    let args: Vec<&str> = rest.map(String::as_str).collect();
    let mut args = &args[..];
    // A compiler cache in front of the compiler: look at what it runs.
    if matches!(argv0.rsplit('/').next(), Some("ccache" | "distcc")) {
        let Some((first, more)) = args.split_first() else {
            return false;
        };
        argv0 = first;
        args = more;
    }
    if !is_compiler(argv0, extra) {
        return false;
    }
    let mut compile_only = false;
    let mut has_source = false;
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        match a {
            "-c" => compile_only = true,
            // Preprocess only or dependency listing: cheap, and often a probe.
            "-E" | "-M" | "-MM" => return false,
            // Stdin as input: there is nothing to compile on another node.
            "-" => return false,
            _ if OPTS_WITH_VALUE.contains(&a) => {
                let v = args.get(i + 1).copied().unwrap_or("");
                if a == "-o" && v == "/dev/null" {
                    return false;
                }
                i += 1;
            }
            _ if a.starts_with('-') => {}
            "/dev/null" => return false,
            _ => {
                if SOURCE_SUFFIXES.iter().any(|s| a.ends_with(s)) {
                    has_source = true;
                }
            }
        }
        i += 1;
    }
    compile_only && has_source
}

/// Split a shell line into simple commands (lists of words, quotes removed).
pub fn simple_commands(line: &str) -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    let mut word = String::new();
    // Whether `word` holds a word (it may be empty: `''`).
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    let end_word = |word: &mut String, in_word: &mut bool, cur: &mut Vec<String>| {
        if *in_word {
            cur.push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    word.push(q);
                }
            }
            '"' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => match chars.peek() {
                            Some(&n @ ('"' | '\\' | '$' | '`')) => {
                                word.push(n);
                                chars.next();
                            }
                            Some('\n') => {
                                chars.next();
                            }
                            _ => word.push('\\'),
                        },
                        _ => word.push(q),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') | None => {}
                Some(n) => {
                    in_word = true;
                    word.push(n);
                }
            },
            '#' if !in_word => {
                for q in chars.by_ref() {
                    if q == '\n' {
                        break;
                    }
                }
                end_word(&mut word, &mut in_word, &mut cur);
                if !cur.is_empty() {
                    cmds.push(std::mem::take(&mut cur));
                }
            }
            ';' | '&' | '|' | '\n' | '(' | ')' => {
                end_word(&mut word, &mut in_word, &mut cur);
                if !cur.is_empty() {
                    cmds.push(std::mem::take(&mut cur));
                }
            }
            c if c.is_whitespace() => end_word(&mut word, &mut in_word, &mut cur),
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut cur);
    if !cur.is_empty() {
        cmds.push(cur);
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(line: &str) -> Decision {
        classify(line, &[])
    }

    #[test]
    fn plain_compiles_go_remote() {
        assert_eq!(c("cc -O2 -c -o a.o a.c"), Decision::Remote);
        assert_eq!(c("gcc -c foo.c"), Decision::Remote);
        assert_eq!(
            c("/usr/bin/x86_64-linux-gnu-gcc-12 -c x.S -o x.o"),
            Decision::Remote
        );
        assert_eq!(c("ccache gcc -c a.c -o a.o"), Decision::Remote);
        assert_eq!(c("CCACHE_DISABLE=1 clang -c a.cpp"), Decision::Remote);
        assert_eq!(c("echo '  CC a.o'; gcc -c -o a.o a.c"), Decision::Remote);
        assert_eq!(c("mkdir -p obj && gcc -c -o obj/a.o a.c"), Decision::Remote);
    }

    #[test]
    fn kbuild_compile_line_goes_remote() {
        let line = "set -e;  echo '  CC      init/main.o'; trap 'rm -f init/main.o; trap - HUP; kill -s HUP $$' HUP; \
            gcc -Wp,-MMD,init/.main.o.d -nostdinc -I./arch/x86/include -include ./include/linux/kconfig.h \
            -D__KERNEL__ -O2 -DKBUILD_MODNAME='\"main\"' -c -o init/main.o init/main.c  ; \
            scripts/basic/fixdep init/.main.o.d init/main.o 'gcc -Wp,-MMD,init/.main.o.d -c -o init/main.o init/main.c' > init/.main.o.cmd; rm -f init/.main.o.d";
        assert_eq!(c(line), Decision::Remote);
    }

    #[test]
    fn probes_links_and_others_stay_local() {
        // Kbuild's cc-option and friends.
        assert_eq!(
            c("set -e; gcc -Werror -fno-pie -c -x c /dev/null -o \"$TMP\""),
            Decision::Local
        );
        assert_eq!(c("gcc -E -dM -x c - </dev/null"), Decision::Local);
        assert_eq!(c("printf 'int x;' | gcc -c -x c - -o x.o"), Decision::Local);
        assert_eq!(c("gcc -c a.c -o /dev/null"), Decision::Local);
        assert_eq!(c("gcc --version"), Decision::Local);
        assert_eq!(c("gcc -print-file-name=include"), Decision::Local);
        // Links, archives, host programs built in one step.
        assert_eq!(c("cc -o prog a.o b.o -lm"), Decision::Local);
        assert_eq!(
            c("gcc -o scripts/basic/fixdep scripts/basic/fixdep.c"),
            Decision::Local
        );
        assert_eq!(c("ar rcs libx.a a.o b.o"), Decision::Local);
        assert_eq!(
            c("make -f scripts/Makefile.build obj=init"),
            Decision::Local
        );
        // The compile command only inside quotes or a comment is not a command.
        assert_eq!(c("echo 'gcc -c a.c'"), Decision::Local);
        assert_eq!(c("true # gcc -c a.c"), Decision::Local);
        assert_eq!(c("gcc -MM a.c"), Decision::Local);
        assert_eq!(c(""), Decision::Local);
        // A source-looking value of an option is not an input.
        assert_eq!(c("gcc -c -include x.c -x c /dev/null"), Decision::Local);
    }

    #[test]
    fn extra_compilers_by_name_or_path() {
        let extra = vec!["/opt/tc/bin/mycc".to_string()];
        assert_eq!(classify("mycc -c a.c", &extra), Decision::Remote);
        assert_eq!(
            classify("/opt/tc/bin/mycc -c a.c", &extra),
            Decision::Remote
        );
        assert_eq!(classify("othercc -c a.c", &extra), Decision::Local);
    }

    #[test]
    fn lexer_keeps_quotes_and_operators_apart() {
        assert_eq!(
            simple_commands("a 'b c' \"d \\\"e\\\"\"; f&&g|h\nx\\\ny ''"),
            vec![
                vec!["a".to_string(), "b c".into(), "d \"e\"".into()],
                vec!["f".to_string()],
                vec!["g".to_string()],
                vec!["h".to_string()],
                vec!["xy".to_string(), "".into()],
            ]
        );
    }

    #[test]
    fn compiler_names() {
        for n in [
            "cc",
            "gcc",
            "gcc-12",
            "clang-16",
            "aarch64-linux-gnu-gcc",
            "g++",
            "/usr/bin/cc",
        ] {
            assert!(is_compiler(n, &[]), "{n}");
        }
        for n in ["ld", "gccgo-ish", "fixdep", "occ", "scc-12", "as"] {
            assert!(!is_compiler(n, &[]), "{n}");
        }
    }
}
