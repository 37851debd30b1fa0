//! The `flowd-rs` command line: parsing and dispatch only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use flowd::api::client::request;
use flowd::api::request::{FlowSpec, Request};
use flowd::cli;
use flowd::config::{Config, DEFAULT_CONFIG_PATH};

/// Tags the network traffic of scientific data transfers (SciTags) with no help from
/// the applications: marks IPv6 flow labels from a TC egress program.
#[derive(Debug, Parser)]
#[command(name = "flowd-rs", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML). Without it, /etc/flowd-rs/flowd-rs.toml is read if present.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive list.
    #[arg(long, global = true, default_value = "info", env = "FLOWD_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: attach the marker, serve the control socket, until SIGINT/SIGTERM.
    /// With pinning on (marker.pin_dir), an exit leaves the marker marking and the
    /// next start takes it over without a gap.
    Run {
        /// Remove the marker and its pins at exit (a real stop), as
        /// marker.detach_on_exit = true does.
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Remove the marker an earlier instance left: pinned links and maps, clsact
    /// filters, and the clsact qdiscs flowd-rs created.
    Clean,
    /// Show the running daemon's status and counters.
    Status,
    /// Check, without starting anything, whether this kernel runs the configuration:
    /// prints the kernel features and the fallbacks taken; exit code 1 if it cannot.
    Check,
    /// Show every socket the daemon tracks, its tag and why: live, or once for scripts.
    Inspect(flowd::inspect::InspectArgs),
    /// Reload the policy directory (as SIGHUP does); prints the new policy version.
    Reload,
    /// Validate and explain policy files.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Encode and decode SciTags flow labels.
    Label {
        #[command(subcommand)]
        action: LabelAction,
    },
    /// Manage the SciTags registry of experiment and activity names.
    Registry {
        #[command(subcommand)]
        action: RegistryAction,
    },
    /// Write a flowd-rs.toml, policy files and a report of what has no equivalent,
    /// from a flowd-go or flowd configuration.
    Import {
        #[command(subcommand)]
        from: ImportFrom,
    },
    /// Print the manual page (roff), e.g. `flowd-rs man > /usr/share/man/man1/flowd-rs.1`;
    /// with --dir, write flowd-rs.1 and one page per subcommand into DIR.
    Man {
        /// Write every page (flowd-rs.1, flowd-rs-run.1, flowd-rs-policy-check.1, ...) here.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Mark or unmark one flow by hand (internal: for tests until discovery decides marks).
    #[command(hide = true)]
    Mark {
        #[command(subcommand)]
        action: MarkAction,
    },
}

// Parsed once per run: the size of a variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum PolicyAction {
    /// Validate every policy file; errors name file:line:column. Exit code 1 on errors.
    Check {
        /// Policy directory (default: policy.dir of the configuration).
        dir: Option<PathBuf>,
        /// Accept user and group names this host does not know (checking a policy
        /// repository on a build machine).
        #[arg(long)]
        offline: bool,
    },
    /// Show which rule would tag a socket, and why each other rule did not.
    Explain {
        /// tcp or udp
        proto: String,
        /// Local address:port (this host's end).
        local: SocketAddr,
        /// Remote address:port.
        remote: SocketAddr,
        /// outbound (we connected) or inbound (we accepted).
        #[arg(long)]
        direction: Option<String>,
        /// Owner: user name or uid.
        #[arg(long)]
        uid: Option<String>,
        /// Process name (comm).
        #[arg(long)]
        comm: Option<String>,
        /// Executable path.
        #[arg(long)]
        exe: Option<PathBuf>,
        /// cgroup v2 path, e.g. /system.slice/xrootd@data.service
        #[arg(long)]
        cgroup: Option<String>,
        /// Policy directory (default: policy.dir of the configuration).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum LabelAction {
    /// Decode flow labels (decimal or 0x-hex) into experiment, activity and entropy.
    Decode {
        #[arg(required = true)]
        labels: Vec<String>,
    },
    /// The flow label for EXPERIMENT and ACTIVITY (names or ids).
    Encode {
        experiment: String,
        activity: String,
        /// The 5 entropy bits (0..=31).
        #[arg(long, default_value_t = 0)]
        entropy: u8,
    },
}

#[derive(Debug, Subcommand)]
enum RegistryAction {
    /// Download the registry, validate it, and replace OUTPUT atomically.
    Update {
        /// Where the published registry lives.
        #[arg(long, default_value = "https://www.scitags.org/api.json")]
        url: String,
        /// The file to write (point policy.registry at it).
        #[arg(long)]
        output: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ImportFrom {
    /// flowd-go's YAML configuration (e.g. /etc/flowd-go/conf.yaml).
    FlowdGo {
        conf: PathBuf,
        /// An empty (or new) directory for flowd-rs.toml, policies.d/ and import-report.txt.
        #[arg(long, short = 'o')]
        output: PathBuf,
    },
    /// flowd's key=value configuration (e.g. /etc/flowd/flowd.cfg).
    Flowd {
        conf: PathBuf,
        /// An empty (or new) directory for flowd-rs.toml, policies.d/ and import-report.txt.
        #[arg(long, short = 'o')]
        output: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum MarkAction {
    /// Mark PROTO LOCAL REMOTE with EXPERIMENT/ACTIVITY.
    Add {
        proto: String,
        local: SocketAddr,
        remote: SocketAddr,
        #[arg(long)]
        experiment: u16,
        #[arg(long)]
        activity: u8,
        /// The 5 entropy bits (0..=31); random when absent.
        #[arg(long)]
        entropy: Option<u8>,
    },
    /// Remove the mark of PROTO LOCAL REMOTE.
    Del {
        proto: String,
        local: SocketAddr,
        remote: SocketAddr,
    },
}

fn import(from: &ImportFrom) -> Result<()> {
    let (name, conf, output) = match from {
        ImportFrom::FlowdGo { conf, output } => ("flowd-go", conf, output),
        ImportFrom::Flowd { conf, output } => ("flowd", conf, output),
    };
    let text =
        std::fs::read_to_string(conf).with_context(|| format!("reading {}", conf.display()))?;
    let imported = match from {
        ImportFrom::FlowdGo { .. } => flowd::import::from_flowd_go(&text),
        ImportFrom::Flowd { .. } => flowd::import::from_flowd(&text),
    }
    .with_context(|| format!("{}", conf.display()))?;
    let file = conf.file_name().map_or(conf.as_os_str(), |f| f);
    let source = format!("{name} {}", file.to_string_lossy());
    print!("{}", imported.write(output, &source)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `<3>`: an error for journald (see JournalPriority).
            let prefix = if std::env::var_os("JOURNAL_STREAM").is_some() {
                "<3>"
            } else {
                ""
            };
            eprintln!("{prefix}flowd-rs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let is_tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Under systemd the journal stamps each line itself: no second timestamp.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(is_tty)
        .with_target(false);
    if under_journal {
        builder
            .event_format(JournalPriority(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_target(false)
                    .with_ansi(false),
            ))
            .init();
    } else {
        builder.init();
    }
}

/// Under systemd, each line starts with its syslog priority (`<4>` for a warning),
/// which journald takes from stderr: `journalctl -p warning` then shows the
/// daemon's warnings, not every line at the default "info".
struct JournalPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

fn load_config(cli: &Cli) -> Result<Config> {
    match &cli.config {
        Some(p) => Config::load(p, true),
        None => Config::load(DEFAULT_CONFIG_PATH.as_ref(), false),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The command as the manual pages show it: built, so every subcommand knows its
/// full name (`flowd-rs-policy-check`), and without clap's `help` subcommand.
fn man_command() -> clap::Command {
    use clap::CommandFactory;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// `man --dir DIR`: flowd-rs.1 and a page for every subcommand it names, so that
/// each `flowd-rs-NAME(1)` reference resolves.
fn man_pages(dir: &std::path::Path) -> Result<()> {
    fn sub_pages(cmd: &clap::Command, dir: &std::path::Path) -> Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = sub.get_display_name().unwrap_or(sub.get_name()).to_owned();
            let path = dir.join(format!("{name}.1"));
            let mut page = Vec::new();
            clap_mangen::Man::new(sub.clone()).render(&mut page)?;
            page.extend_from_slice(b".SH SEE ALSO\n\\fBflowd\\-rs\\fR(1)\n");
            std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
            sub_pages(sub, dir)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("flowd-rs.1");
    let mut page = Vec::new();
    man_page(&mut page)?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    sub_pages(&man_command(), dir)
}

/// The manual page: clap's own rendering of the command line, then the files and
/// signals an operator needs, which the options do not say.
fn man_page(out: &mut dyn std::io::Write) -> Result<()> {
    clap_mangen::Man::new(man_command()).render(out)?;
    out.write_all(
        br#".SH FILES
.TP
\fB/etc/flowd\-rs/flowd\-rs.toml\fR
The configuration (TOML); every key and its default in the packaged copy. Unknown keys are errors naming file, line and column.
.TP
\fB/etc/flowd\-rs/policies.d/*.toml\fR
One policy file per experiment; \fBflowd\-rs policy check\fR validates them.
.TP
\fB/run/flowd\-rs/control.sock\fR
The control socket \fBstatus\fR, \fBinspect\fR and \fBreload\fR talk to (JSON lines).
.TP
\fB/run/flowd\-rs/attachments.json\fR
What is attached where, so \fBflowd\-rs clean\fR can undo a crashed instance.
.SH SIGNALS
SIGHUP reloads the policy directory (a broken one is refused and the previous policy kept). SIGINT and SIGTERM stop the daemon; with the marker pinned (\fBmarker.pin_dir\fR, a bpf filesystem) the marker keeps marking and the next start takes it over without a gap (restarts, upgrades). \fB\-\-detach\-on\-exit\fR, \fBmarker.detach_on_exit\fR or \fBflowd\-rs clean\fR remove everything and leave each interface as found.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBjournalctl\fR(1); https://www.scitags.org; /usr/share/doc/flowd\-rs/README.md (operations: capabilities, metrics, upgrades).
"#,
    )?;
    Ok(())
}

fn dispatch(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Man { dir: None } => return man_page(&mut std::io::stdout().lock()),
        Command::Man { dir: Some(dir) } => return man_pages(dir),
        // Reads another daemon's configuration, not this one's.
        Command::Import { from } => return import(from),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "flowd-rs",
                &mut std::io::stdout().lock(),
            );
            return Ok(());
        }
        _ => {}
    }
    let mut cfg = load_config(&cli)?;
    match cli.command {
        Command::Run { detach_on_exit } => {
            cfg.marker.detach_on_exit |= detach_on_exit;
            runtime()?.block_on(flowd::daemon::run(cfg))
        }
        Command::Clean => runtime()?.block_on(flowd::daemon::clean(cfg)),
        Command::Status => {
            let path = cfg.control_socket();
            let status = request(&path, &Request::Status {})?;
            let counters = request(&path, &Request::Counters {})?;
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"status": status, "counters": counters})
                )?
            );
            Ok(())
        }
        Command::Check => {
            if !flowd::check::run(&cfg, &mut std::io::stdout().lock())? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Inspect(args) => flowd::inspect::run(args, &cfg.control_socket()),
        Command::Reload => {
            let r = request(&cfg.control_socket(), &Request::Reload {})?;
            println!(
                "policy reloaded: version {}",
                r["policy_version"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        Command::Policy { action } => {
            let reg = cli::registry(&cfg)?;
            let mut out = std::io::stdout().lock();
            match action {
                PolicyAction::Check { dir, offline } => {
                    let dir = match dir {
                        Some(d) => d,
                        // What the daemon would load: a missing directory means no
                        // policies (a fresh install), which it runs with.
                        None if !cfg.policy.dir.exists() => {
                            println!(
                                "{}: does not exist: no policies, nothing is tagged",
                                cfg.policy.dir.display()
                            );
                            return Ok(());
                        }
                        None => cfg.policy.dir.clone(),
                    };
                    if !cli::policy_check(
                        &dir,
                        &reg,
                        offline,
                        cfg.marker.in_kernel_decisions,
                        &mut out,
                    )? {
                        std::process::exit(1);
                    }
                    Ok(())
                }
                PolicyAction::Explain {
                    proto,
                    local,
                    remote,
                    direction,
                    uid,
                    comm,
                    exe,
                    cgroup,
                    dir,
                } => {
                    let args = cli::ExplainArgs {
                        proto,
                        local,
                        remote,
                        direction,
                        uid,
                        comm,
                        exe,
                        cgroup,
                    };
                    cli::policy_explain(
                        &dir.unwrap_or(cfg.policy.dir.clone()),
                        &reg,
                        &args,
                        &mut out,
                    )
                }
            }
        }
        Command::Label { action } => {
            let reg = cli::registry(&cfg)?;
            let mut out = std::io::stdout().lock();
            match action {
                LabelAction::Decode { labels } => cli::label_decode(&labels, &reg, &mut out),
                LabelAction::Encode {
                    experiment,
                    activity,
                    entropy,
                } => cli::label_encode(&experiment, &activity, entropy, &reg, &mut out),
            }
        }
        Command::Registry {
            action: RegistryAction::Update { url, output },
        } => cli::registry_update(&url, &output, &mut std::io::stdout().lock()),
        // Answered above, before the configuration is read.
        Command::Man { .. } | Command::Completions { .. } | Command::Import { .. } => {
            unreachable!("man and completions are dispatched before the configuration")
        }
        Command::Mark { action } => {
            let req = match action {
                MarkAction::Add {
                    proto,
                    local,
                    remote,
                    experiment,
                    activity,
                    entropy,
                } => Request::MarkAdd {
                    flow: FlowSpec {
                        proto,
                        local,
                        remote,
                    },
                    experiment,
                    activity,
                    entropy,
                },
                MarkAction::Del {
                    proto,
                    local,
                    remote,
                } => Request::MarkDel {
                    flow: FlowSpec {
                        proto,
                        local,
                        remote,
                    },
                },
            };
            let result = request(&cfg.control_socket(), &req)?;
            println!("{result}");
            Ok(())
        }
    }
}
