use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = keelson::Cli::parse();
    keelson::init_tracing(&cli.log);
    match keelson::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keelson: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
