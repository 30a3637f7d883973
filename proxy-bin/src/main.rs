//! `keelson`: parses the command line (with its `--config` file), starts
//! logging, runs the command.

fn main() -> std::process::ExitCode {
    let cli = match keelson::args::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => match e.downcast::<clap::Error>() {
            // Usage errors, --help and --version, as clap prints them.
            Ok(e) => e.exit(),
            Err(e) => {
                eprintln!("keelson: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        },
    };
    keelson::init_tracing(&cli.log);
    match keelson::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keelson: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
