//! The settings reference of `docs/configuration.md`, rendered from the
//! command-line definition so that it cannot drift from `--help`: one
//! Markdown table per subcommand with every setting's environment variable,
//! flag, default and description. `runner docs` prints it and
//! `scripts/docs` puts it into the page between [`BEGIN`] and [`END`].

use std::fmt::Write;

use clap::{Arg, ArgAction, Command};

/// First line of the generated block.
pub const BEGIN: &str =
    "<!-- BEGIN settings generated from the command line by scripts/docs; do not edit -->";
/// Last line of the generated block.
pub const END: &str = "<!-- END settings generated from the command line -->";

/// The generated block, markers included, for the command line `cli`: a
/// section per visible subcommand (nested ones too) that has settings.
pub fn render(mut cli: Command) -> String {
    // Building propagates global arguments (LOG_LEVEL, …) to the subcommands
    // and gives flags their implicit defaults.
    cli.build();
    let mut out = format!("{BEGIN}\n");
    for sub in cli.get_subcommands() {
        section(&mut out, cli.get_name(), sub);
    }
    out.push_str(END);
    out.push('\n');
    out
}

fn section(out: &mut String, parent: &str, cmd: &Command) {
    if cmd.is_hide_set() {
        return;
    }
    let path = format!("{parent} {}", cmd.get_name());
    let args: Vec<&Arg> = cmd.get_arguments().filter(|a| documented(a)).collect();
    if !args.is_empty() {
        let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
        let _ = write!(out, "\n### `{path}`\n\n");
        if !about.is_empty() {
            let _ = write!(out, "{}\n\n", sentence(&about));
        }
        out.push_str("| variable | flag | default | meaning |\n|---|---|---|---|\n");
        for arg in args {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                variable(arg),
                flag(arg),
                default(arg),
                meaning(arg)
            );
        }
    }
    for sub in cmd.get_subcommands() {
        section(out, &path, sub);
    }
}

/// Every argument a user sets: not hidden, not `--help` or `--version`.
fn documented(arg: &Arg) -> bool {
    !arg.is_hide_set()
        && !matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        )
}

fn variable(arg: &Arg) -> String {
    match arg.get_env().and_then(|e| e.to_str()) {
        Some(env) => format!("`{env}`"),
        None => "—".to_string(),
    }
}

fn flag(arg: &Arg) -> String {
    let takes_values = arg.get_num_args().is_some_and(|n| n.takes_values());
    let names = match arg.get_value_names() {
        Some(names) => names
            .iter()
            .map(|n| format!("<{n}>"))
            .collect::<Vec<_>>()
            .join(" "),
        None => format!("<{}>", arg.get_id()),
    };
    let text = match (arg.get_long(), takes_values) {
        (Some(long), false) => format!("--{long}"),
        (Some(long), true) => format!("--{long} {names}"),
        (None, _) if arg.is_last_set() => format!("-- {names}…"),
        (None, _) => names,
    };
    format!("`{}`", cell(&text))
}

fn default(arg: &Arg) -> String {
    let values: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    match values.as_slice() {
        [] => "—".to_string(),
        [one] if one.is_empty() => "empty".to_string(),
        _ => format!("`{}`", cell(&values.join(","))),
    }
}

/// The argument's doc comment, and its values when they have their own.
fn meaning(arg: &Arg) -> String {
    let mut text = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|h| sentence(&h.to_string()))
        .unwrap_or_default();
    let values: Vec<String> = arg
        .get_possible_values()
        .into_iter()
        .filter(|v| !v.is_hide_set())
        .filter_map(|v| {
            let help = one_line(&v.get_help()?.to_string());
            Some(format!(
                "`{}`: {}",
                v.get_name(),
                help.trim_end_matches('.')
            ))
        })
        .collect();
    if !values.is_empty() && !arg.is_hide_possible_values_set() {
        let _ = write!(text, " Values: {}.", values.join("; "));
    }
    cell(&text)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Text on one line that ends with a full stop (clap drops the one a
/// one-paragraph doc comment ends with).
fn sentence(text: &str) -> String {
    let mut line = one_line(text);
    if !line.is_empty() && !line.ends_with('.') {
        line.push('.');
    }
    line
}

/// Text that cannot end a table cell early.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::builder::PossibleValue;

    fn cli() -> Command {
        Command::new("tool")
            .arg(
                Arg::new("log")
                    .long("log")
                    .env("LOG")
                    .value_name("LEVEL")
                    .default_value("INFO")
                    .help("Log level.")
                    .global(true),
            )
            .subcommand(
                Command::new("run")
                    .about("Run  one\nthing")
                    .arg(
                        Arg::new("mode")
                            .long("mode")
                            .env("MODE")
                            .default_value("a")
                            .value_parser([
                                PossibleValue::new("a").help("First | best"),
                                PossibleValue::new("b").help("Second."),
                            ])
                            .help("Which mode."),
                    )
                    .arg(
                        Arg::new("quiet")
                            .long("quiet")
                            .env("QUIET")
                            .action(ArgAction::SetTrue)
                            .help("Say less"),
                    )
                    .arg(
                        Arg::new("names")
                            .long("names")
                            .env("NAMES")
                            .default_value(""),
                    )
                    .arg(Arg::new("secret").long("secret").hide(true))
                    .arg(Arg::new("rest").value_name("REST").last(true).num_args(0..))
                    .subcommand(Command::new("list").about("List them.")),
            )
            .subcommand(
                Command::new("internal")
                    .hide(true)
                    .arg(Arg::new("x").long("x")),
            )
    }

    #[test]
    fn renders_a_table_per_visible_subcommand_between_the_markers() {
        let text = render(cli());
        assert!(text.starts_with(&format!("{BEGIN}\n")), "{text}");
        assert!(text.ends_with(&format!("{END}\n")), "{text}");
        let headings: Vec<&str> = text.lines().filter(|l| l.starts_with("###")).collect();
        assert_eq!(headings, ["### `tool run`", "### `tool run list`"]);
        assert!(
            text.contains("### `tool run`\n\nRun one thing.\n\n| variable |"),
            "{text}"
        );
        assert!(
            !text.contains("internal") && !text.contains("--secret"),
            "{text}"
        );
        assert!(!text.contains("--help"), "{text}");
    }

    #[test]
    fn each_row_has_variable_flag_default_and_meaning() {
        let text = render(cli());
        for row in [
            "| `LOG` | `--log <LEVEL>` | `INFO` | Log level. |",
            "| `MODE` | `--mode <mode>` | `a` | Which mode. Values: `a`: First \\| best; `b`: Second. |",
            "| `QUIET` | `--quiet` | `false` | Say less. |",
            "| `NAMES` | `--names <names>` | empty |  |",
            "| — | `-- <REST>…` | — |  |",
        ] {
            assert!(text.contains(row), "{row} missing from\n{text}");
        }
        // The global setting shows under every subcommand, nested ones too.
        assert_eq!(text.matches("| `LOG` |").count(), 2, "{text}");
    }

    #[test]
    fn the_runner_reference_names_every_setting_of_every_command() {
        use clap::CommandFactory;
        let text = render(crate::cli::Cli::command());
        let mut cli = crate::cli::Cli::command();
        cli.build();
        for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
            let vars: Vec<&str> = sub
                .get_arguments()
                .filter_map(|a| a.get_env()?.to_str())
                .collect();
            if vars.is_empty() {
                continue; // `help`
            }
            let section = text
                .split(&format!("### `runner {}`\n", sub.get_name()))
                .nth(1)
                .and_then(|s| s.split("\n### ").next())
                .unwrap_or_else(|| panic!("no section for {}", sub.get_name()));
            for env in vars {
                assert!(
                    section.contains(&format!("| `{env}` |")),
                    "{env} missing under runner {}",
                    sub.get_name()
                );
            }
        }
        assert!(text.contains("`yolo`: "), "the detectors are listed");
    }
}
