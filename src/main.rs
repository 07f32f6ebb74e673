use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches};
use vap_runner::cli::{Cli, Command};
use vap_runner::controller::{self, crd};
use vap_runner::{build_info, local, settings_doc, telemetry, worker};

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(err) => return parse_failure(err),
    };
    telemetry::init(cli.log_level, cli.log_format);
    // SAFETY: only this thread exists; every command starts its threads later.
    unsafe { telemetry::keep_ffmpeg_on_stderr() };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        command = command_name(&cli.command),
        "vap-runner starting"
    );
    let name = command_name(&cli.command);
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Worker(args) => match worker::main(*args) {
            Ok(worker::capture::CaptureEnd::Shutdown) => {
                return ExitCode::from(worker::STOPPED_EXIT_CODE);
            }
            Ok(worker::capture::CaptureEnd::EndOfFile) => Ok(()),
            Err(e) => Err(e.into()),
        },
        Command::Controller(args) => controller::main(*args, cli.log_level).map_err(Into::into),
        Command::Crd => print_crd(),
        Command::Docs => {
            print!("{}", settings_doc::render(Cli::command()));
            Ok(())
        }
        Command::Local(args) => {
            local::main(*args, cli.log_level, cli.log_format).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(command = name, "{err}");
            ExitCode::FAILURE
        }
    }
}

/// The command line, with `--version` naming the video stack the binary
/// was linked with (`-V` stays one line).
fn parse() -> Result<Cli, clap::Error> {
    let matches = Cli::command()
        .long_version(&*Box::leak(build_info::long_version().into_boxed_str()))
        .try_get_matches()?;
    Cli::from_arg_matches(&matches)
}

fn print_crd() -> Result<(), Box<dyn std::error::Error>> {
    print!("{}", crd::crd_yaml()?);
    Ok(())
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Controller(_) => "controller",
        Command::Worker(_) => "worker",
        Command::Local(_) => "local",
        Command::Crd => "crd",
        Command::Docs => "docs",
    }
}

/// Help and version go to stdout with status 0; a bad setting is reported in
/// one line naming the variable, the value and what is allowed.
fn parse_failure(err: clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::ValueValidation | ErrorKind::InvalidValue => {
            let rendered = err.to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or("invalid setting"));
            ExitCode::from(2)
        }
        _ => {
            let _ = err.print();
            ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2))
        }
    }
}
