//! The `edgeferry` command: parses arguments, sets up logging, and calls the
//! library. Exit codes: 0 ok, 1 runtime failure (or a failed rule test),
//! 2 invalid config or rules, 3 a config or rule file could not be read,
//! 4 the queue file is held by another daemon, 64 a usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgeferry::Config;
use edgeferry::config::DEFAULT_CONFIG;

#[derive(Parser)]
#[command(
    version,
    about = "MQTT edge router with store-and-forward",
    long_about = None,
    after_long_help = "Exit status: 0 ok; 1 runtime failure, a failed rule test, or (status) the daemon is not running; 2 invalid config or rules; 3 a file could not be read; 4 the queue file is held by another daemon; 64 a usage error."
)]
// (EXIT_CODES says the same for the man page.)
struct Cli {
    /// Config file; default: /etc/edgeferry/edgeferry.toml if it exists, else the embedded
    /// default. Before or after the command.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default when no command is given).
    Run,
    /// Load the config and rules, print every error, exit non-zero on any.
    Check,
    /// Run the [[test]] cases written in rule files; exit 1 if any fails.
    Test {
        /// Rule files or directories to test instead of the config's rules.dir.
        paths: Vec<PathBuf>,
    },
    /// Check a payload against a declared schema by hand, or list the
    /// schemas the rule files declare.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
    /// One screen on the running daemon (or, when it is down, its queue file).
    Status,
    /// Print the embedded default config (a starting point for your own).
    PrintDefaultConfig,
    /// Add or change a local broker user in a password file (Mosquitto's
    /// format); the password is read from standard input (asked twice, not
    /// echoed, on a terminal). The running daemon picks the change up.
    Passwd {
        /// The password file (broker.password_file); created if missing.
        file: PathBuf,
        user: String,
        /// Remove the user instead.
        #[arg(short = 'D', long)]
        delete: bool,
    },
    /// Inspect the queue file (read-only; safe while the daemon runs).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Watch events go through the running daemon: the rules each one
    /// matched and what they did, and where it went (at most 500 events a
    /// second are shown; the rest are counted).
    Tail {
        /// Only events on topics this MQTT filter matches, e.g. 'sensors/#'.
        filter: Option<String>,
        /// One JSON object per event, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script, e.g.
    /// `edgeferry completions bash > /etc/bash_completion.d/edgeferry`.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff; `edgeferry man | man -l -`), or write it
    /// and one page per command into a directory.
    Man {
        /// Write edgeferry.1 and edgeferry-<command>.1 here instead.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SchemaCommand {
    /// Check the JSON or CBOR payload in FILE (`-`: standard input)
    /// against schema NAME, listing every problem with its JSON pointer;
    /// exit 0 if it keeps it, 1 if not.
    Validate {
        name: String,
        file: PathBuf,
        /// The topic it came on (needed when the version is in the topic).
        #[arg(long)]
        topic: Option<String>,
    },
    /// Every declared schema version: its topics, whether enforced, its file.
    List,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Events, bytes and oldest age per upstream and priority.
    Stats {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Every queued event as JSON lines, in send order (for support).
    Export {
        #[command(flatten)]
        db: DbArgs,
        /// Only this upstream's events.
        #[arg(long)]
        upstream: Option<String>,
    },
}

#[derive(clap::Args)]
struct DbArgs {
    /// The queue file itself, instead of the config's queue.path (not
    /// with -c).
    #[arg(long)]
    db: Option<PathBuf>,
}

impl DbArgs {
    fn path(&self, config: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
        // By hand: clap's conflicts_with misses a global -c given before
        // the command.
        if let (Some(_), Some(_)) = (&self.db, &config) {
            use clap::CommandFactory;
            let e = Cli::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "the argument '--db <DB>' cannot be used with '--config <CONFIG>'",
            );
            return Err(usage(e));
        }
        if let Some(db) = &self.db {
            return Ok(db.clone());
        }
        match edgeferry::config::ConfigFile::read(installed_or(config).as_deref()) {
            Ok(file) => Ok(file.queue.path),
            Err(errors) => Err(config_errors(&errors)),
        }
    }
}

const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_UNREADABLE: u8 = 3;
/// Another daemon holds the queue file: nothing was started.
const EXIT_QUEUE_IN_USE: u8 = 4;

/// What each exit code means (the man page's EXIT STATUS).
const EXIT_CODES: [(u8, &str); 6] = [
    (0, "ok; for run, a clean stop"),
    (
        EXIT_FAILURE,
        "a runtime failure, a failed rule test, or (status) the daemon is not running",
    ),
    (EXIT_CONFIG, "the config or the rules are invalid"),
    (
        EXIT_UNREADABLE,
        "a file could not be read (the config, the rules directory, a file the config names)",
    ),
    (
        EXIT_QUEUE_IN_USE,
        "the queue file is held by another daemon",
    ),
    (EXIT_USAGE, "a usage error (an unknown command or option)"),
];

/// A command line clap could not take (EX_USAGE, sysexits.h): kept apart
/// from 2, which means the config or rules are invalid.
const EXIT_USAGE: u8 = 64;

/// `--help` and `--version` print and exit 0; any other parse error is a
/// usage error.
fn usage(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let _ = e.print();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_USAGE),
    }
}

/// Print every error and the exit code their kind calls for.
fn config_errors(errors: &edgeferry::diagnostic::Diagnostics) -> ExitCode {
    eprintln!("{errors}");
    eprintln!("{} error(s)", errors.0.len());
    ExitCode::from(if errors.any_unreadable() {
        EXIT_UNREADABLE
    } else {
        EXIT_CONFIG
    })
}

/// Where an installed edgeferry keeps its config (the Debian package's).
const INSTALLED_CONFIG: &str = "/etc/edgeferry/edgeferry.toml";

/// The config a command uses: `-c`, else the installed one if there is one
/// (so `edgeferry check`, `test` and `status` on a gateway mean its real
/// config), else the embedded default (`None`).
fn installed_or(config: Option<PathBuf>) -> Option<PathBuf> {
    config.or_else(|| {
        let installed = PathBuf::from(INSTALLED_CONFIG);
        installed.is_file().then_some(installed)
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage(e),
    };
    let config = cli.config;
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Check => match Config::load(installed_or(config).as_deref()) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} rules, {} upstreams)",
                    cfg.source
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or("the embedded default config".into()),
                    cfg.rules.len(),
                    cfg.file.upstream.len()
                );
                for w in &cfg.warnings {
                    eprintln!("warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(errors) => config_errors(&errors),
        },
        Command::Test { paths } => test(config, paths),
        Command::Schema { command } => schema(config, command),
        Command::Status => status(config),
        Command::Run => run(config),
        Command::Queue { command } => queue_command(command, config),
        Command::Passwd { file, user, delete } => passwd(&file, &user, delete),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cli = Cli::command();
            clap_complete::generate(shell, &mut cli, "edgeferry", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { out } => man(out),
        Command::Tail { filter, json } => tail(config, filter.as_deref(), json),
    }
}

fn tail(config: Option<PathBuf>, filter: Option<&str>, json: bool) -> ExitCode {
    let file = match edgeferry::config::ConfigFile::read(installed_or(config).as_deref()) {
        Ok(f) => f,
        Err(errors) => return config_errors(&errors),
    };
    let mut print = |line: &str| {
        use std::io::Write;
        let text = match json {
            true => format!("{line}\n"),
            false => match serde_json::from_str(line) {
                Ok(v) => edgeferry::ops::trace::human(&v),
                Err(_) => format!("{line}\n"),
            },
        };
        // A closed pipe (`| head`) ends it quietly.
        std::io::stdout().write_all(text.as_bytes()).is_ok()
    };
    match edgeferry::status::follow_trace(&file, filter, &mut print) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeferry tail: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn man(out: Option<PathBuf>) -> ExitCode {
    use clap::CommandFactory;
    let written = match &out {
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
            .and_then(|()| {
                let mut page = Vec::new();
                main_page(&mut page)?;
                std::fs::write(dir.join("edgeferry.1"), page)
            }),
        None => main_page(&mut std::io::stdout()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let to = out.map_or("standard output".into(), |d| d.display().to_string());
            eprintln!("edgeferry man: cannot write to {to}: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// edgeferry(1): clap_mangen's sections, with the exit codes under the
/// conventional EXIT STATUS heading rather than its EXTRA.
fn main_page(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    let man = clap_mangen::Man::new(Cli::command());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    writeln!(out, ".SH \"EXIT STATUS\"")?;
    for (code, means) in EXIT_CODES {
        writeln!(out, ".TP\n\\fB{code}\\fR\n{means}")?;
    }
    writeln!(
        out,
        ".SH FILES\n/etc/edgeferry/edgeferry.toml, /etc/edgeferry/rules/*.toml (and the *.json schemas they name), /var/lib/edgeferry/queue.db"
    )?;
    man.render_version_section(out)
}

fn passwd(file: &std::path::Path, user: &str, delete: bool) -> ExitCode {
    match edgeferry::passwd::command(file, user, delete) {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edgeferry passwd: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn test(config: Option<PathBuf>, paths: Vec<PathBuf>) -> ExitCode {
    use edgeferry::rules::testing;
    let file = match edgeferry::config::ConfigFile::read(installed_or(config).as_deref()) {
        Ok(f) => f,
        Err(errors) => return config_errors(&errors),
    };
    let files = if paths.is_empty() {
        None
    } else {
        match testing::files_under(&paths) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("edgeferry: {e}");
                return ExitCode::from(EXIT_UNREADABLE);
            }
        }
    };
    let rules = match file.load_rules(files.as_deref()) {
        Ok(r) => r,
        Err(errors) => return config_errors(&errors),
    };
    let outcomes = testing::run_all(&rules);
    for o in &outcomes {
        match &o.failure {
            None => println!("ok      {}", o.label),
            Some(why) => println!("FAILED  {}\n{why}", o.label),
        }
    }
    let (passed, failed) = testing::summary(&outcomes);
    println!("{passed} passed, {failed} failed");
    if outcomes.is_empty() {
        eprintln!("edgeferry: no [[test]] cases found in the rule files");
    }
    if failed > 0 {
        ExitCode::from(EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}

fn schema(config: Option<PathBuf>, command: SchemaCommand) -> ExitCode {
    use edgeferry::rules::sample::{self, SampleError};
    let file = match edgeferry::config::ConfigFile::read(installed_or(config).as_deref()) {
        Ok(f) => f,
        Err(errors) => return config_errors(&errors),
    };
    let rules = match file.load_rules(None) {
        Ok(r) => r,
        Err(errors) => return config_errors(&errors),
    };
    let (name, path, topic) = match command {
        SchemaCommand::List => {
            print!("{}", sample::list(&rules));
            return ExitCode::SUCCESS;
        }
        SchemaCommand::Validate { name, file, topic } => (name, file, topic),
    };
    match sample::validate(&rules, &name, &path, topic.as_deref()) {
        Ok(report) => {
            print!("{}", report.text);
            match report.ok {
                true => ExitCode::SUCCESS,
                false => ExitCode::from(EXIT_FAILURE),
            }
        }
        Err(e) => {
            eprintln!("edgeferry schema validate: {e}");
            ExitCode::from(match e {
                SampleError::UnknownSchema { .. } => EXIT_CONFIG,
                SampleError::Unreadable { .. } => EXIT_UNREADABLE,
                SampleError::NeedsTopic { .. } | SampleError::OtherTopic { .. } => EXIT_USAGE,
            })
        }
    }
}

fn status(config: Option<PathBuf>) -> ExitCode {
    use edgeferry::status::{ShowError, show};
    let file = match edgeferry::config::ConfigFile::read(installed_or(config).as_deref()) {
        Ok(f) => f,
        Err(errors) => return config_errors(&errors),
    };
    match show(&file) {
        Ok(screen) => {
            print!("{screen}");
            ExitCode::SUCCESS
        }
        Err(ShowError::Down(screen)) => {
            print!("{screen}");
            ExitCode::from(EXIT_FAILURE)
        }
        Err(e) => {
            eprintln!("edgeferry: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn queue_command(command: QueueCommand, config: Option<PathBuf>) -> ExitCode {
    use edgeferry::inspect::{Show, command as inspect};
    let (QueueCommand::Stats { db } | QueueCommand::Export { db, .. }) = &command;
    let path = match db.path(config) {
        Ok(path) => path,
        Err(code) => return code,
    };
    let show = match &command {
        QueueCommand::Stats { .. } => Show::Stats,
        QueueCommand::Export { upstream, .. } => Show::Export {
            upstream: upstream.as_deref(),
        },
    };
    match inspect(&path, show, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeferry: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    edgeferry::ops::memory::limit_arenas();
    raise_open_files_limit();
    let path = installed_or(path);
    // Before the rules are loaded: a remote rule install a crash cut short
    // is finished (or discarded), never run half done.
    let recovered = edgeferry::config::ConfigFile::read(path.as_deref())
        .ok()
        .and_then(|f| edgeferry::remote::recover(&f.rules.dir));
    let config = match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("edgeferry: not started: the configuration has errors");
            return config_errors(&errors);
        }
    };
    edgeferry::ops::logging::init(&config.file.log);
    if let Some(what) = recovered {
        tracing::warn!(dir = %config.file.rules.dir.display(), "{what}");
    }
    // A closing plain line for a person at a terminal, not in the journal
    // (it has the ERROR) nor among JSON lines (a shipper would choke).
    let plain_end = !edgeferry::ops::logging::under_journald()
        && config.file.log.format == edgeferry::config::LogFormat::Text;
    // Rule expressions evaluate recursively on the workers; the size
    // limits of `rules::expr` keep them well inside tokio's 2 MiB, and
    // 8 MiB (address space; only the pages used count) is the margin.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 << 20)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgeferry: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        // Install the handlers before anything starts, so a SIGTERM during
        // start-up is a clean stop rather than the default (die at once).
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("edgeferry: cannot install signal handlers: {e}");
                return Ok(());
            }
        };
        edgeferry::run(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "edgeferry failed");
            if plain_end {
                eprintln!("edgeferry: {e}");
            }
            ExitCode::from(match e {
                edgeferry::RunError::Queue(edgeferry::queue::QueueError::InUse { .. }) => {
                    EXIT_QUEUE_IN_USE
                }
                _ => EXIT_FAILURE,
            })
        }
    }
}

/// A future that resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
/// The handlers are installed when this is called, not when first polled.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Each local connection holds three file descriptors (the client's socket,
/// the front door's connection to the embedded broker, and the broker's
/// end of it), so `max_connections` = 1,000 needs more than the common soft
/// limit of 1,024: raise the soft limit to the hard one, as servers do.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer for getrlimit and a valid input
    // for setrlimit; both only read or write that struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
