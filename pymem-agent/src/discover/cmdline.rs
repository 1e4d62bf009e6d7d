//! `--cmdline`: how much of a process's command line the agent keeps, and
//! so shows. Arguments often carry secrets (`--password`, tokens, URLs
//! with credentials); the agent applies the choice when it reads a process,
//! so the rest never holds them: not the API, the metrics, the OOM
//! post-mortems nor `pymem top`.

/// What of a command line is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CmdlineMode {
    /// The executable and the script (or `-m module`), no arguments.
    #[default]
    Short,
    /// Every argument.
    Full,
    /// Nothing.
    None,
}

impl CmdlineMode {
    /// The default for an agent listening on `listen`: the whole command
    /// line only on loopback, where the reader is on this host already.
    pub fn default_for(listen: &std::net::SocketAddr) -> Self {
        if listen.ip().is_loopback() {
            Self::Full
        } else {
            Self::Short
        }
    }

    /// `argv` as this mode shows it, its words joined by spaces.
    pub fn show(self, argv: &[String]) -> String {
        match self {
            Self::Full => argv.join(" "),
            Self::None => String::new(),
            Self::Short => short(argv).join(" "),
        }
    }
}

/// CPython's options that take a value (`-W default`, `-Wdefault`).
const OPTIONS_WITH_VALUE: [char; 2] = ['W', 'X'];
const LONG_OPTIONS_WITH_VALUE: [&str; 1] = ["--check-hash-based-pycs"];

/// The executable and what it runs: `python3 app.py`, `python3 -m http.server`,
/// `python3 -c` (the code is an argument too), `python3 -` (stdin). A
/// program that is not started as `python … script` (`gunicorn`, an
/// embedding binary) keeps only its executable, since its arguments are
/// not known to be harmless.
fn short(argv: &[String]) -> Vec<&str> {
    let Some((executable, args)) = argv.split_first() else {
        return Vec::new();
    };
    let mut shown = vec![executable.as_str()];
    let program = executable.rsplit('/').next().unwrap_or(executable);
    if !program.starts_with("python") {
        return shown;
    }
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            if let Some(script) = args.next() {
                shown.push(script);
            }
            return shown;
        }
        if arg == "-" || !arg.starts_with('-') {
            shown.push(arg);
            return shown;
        }
        if LONG_OPTIONS_WITH_VALUE.contains(&arg.as_str()) {
            args.next();
            continue;
        }
        if arg.starts_with("--") {
            continue;
        }
        // A cluster of short options: `-u`, `-OO`, `-uc CODE`, `-mpkg`.
        for (at, option) in arg.char_indices().skip(1) {
            let value = &arg[at + option.len_utf8()..];
            match option {
                'c' => {
                    shown.push("-c");
                    return shown;
                }
                'm' => {
                    shown.push("-m");
                    if value.is_empty() {
                        if let Some(module) = args.next() {
                            shown.push(module);
                        }
                    } else {
                        shown.push(value);
                    }
                    return shown;
                }
                _ if OPTIONS_WITH_VALUE.contains(&option) => {
                    if value.is_empty() {
                        args.next();
                    }
                    break;
                }
                _ => {}
            }
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(mode: CmdlineMode, command: &str) -> String {
        let argv: Vec<String> = command.split(' ').map(String::from).collect();
        mode.show(&argv)
    }

    #[test]
    fn short_keeps_the_executable_and_the_script_and_drops_every_argument() {
        let short = |command| shown(CmdlineMode::Short, command);
        assert_eq!(
            short("/usr/bin/python3 -u app.py --password hunter2"),
            "/usr/bin/python3 app.py"
        );
        assert_eq!(short("python3 -W ignore -X dev app.py x"), "python3 app.py");
        assert_eq!(short("python3 -Wignore -OO app.py x"), "python3 app.py");
        assert_eq!(
            short("python3.11 -m http.server 8000"),
            "python3.11 -m http.server"
        );
        assert_eq!(
            short("python3 -um pkg.main --token t"),
            "python3 -m pkg.main"
        );
        assert_eq!(short("python3 -c import_os;SECRET=1"), "python3 -c");
        assert_eq!(short("python3 -uc import_os;SECRET=1"), "python3 -c");
        assert_eq!(short("python3 -- app.py --secret"), "python3 app.py");
        assert_eq!(
            short("python3 --check-hash-based-pycs always app.py s"),
            "python3 app.py"
        );
        assert_eq!(short("gunicorn --bind 0.0.0.0:80 app:wsgi"), "gunicorn");
        assert_eq!(short("python3"), "python3");
        assert_eq!(CmdlineMode::Short.show(&[]), "");
    }

    #[test]
    fn full_keeps_everything_and_none_nothing() {
        let command = "python3 app.py --password hunter2";
        assert_eq!(shown(CmdlineMode::Full, command), command);
        assert_eq!(shown(CmdlineMode::None, command), "");
    }

    #[test]
    fn the_default_is_full_only_on_loopback() {
        let at = |addr: &str| CmdlineMode::default_for(&addr.parse().unwrap());
        assert_eq!(at("127.0.0.1:9477"), CmdlineMode::Full);
        assert_eq!(at("[::1]:9477"), CmdlineMode::Full);
        assert_eq!(at("0.0.0.0:9477"), CmdlineMode::Short);
        assert_eq!(at("10.1.2.3:9477"), CmdlineMode::Short);
    }
}
