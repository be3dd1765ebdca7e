use std::process::ExitCode;

use clap::Parser;
use iot_operator::cli::{Cli, CliError, Command, Context};

fn main() -> ExitCode {
    // Before any TLS client exists (kube's, the AWS SDK's, the relays').
    iot_operator::install_crypto_provider();
    let cli = Cli::parse();
    if let Err(e) = iot_operator::telemetry::logging::init(cli.log_format, &cli.log_level) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match iot_operator::cli::runtime(cli.worker_threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run(args) => iot_operator::cli::run::run(args).await,
        Command::Crd(args) => crd(args),
        Command::Attach(args) => iot_operator::cli::attach::attach(args).await,
        Command::Bridge(args) => iot_operator::cli::bridge::bridge(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", iot_operator::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn crd(args: iot_operator::cli::CrdArgs) -> Result<(), CliError> {
    use iot_operator::api::crd;
    match args.output_dir {
        None => {
            print!("{}", crd::all_crds_yaml().map_err(CliError::wrap)?);
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).context(|| dir.display().to_string())?;
            for (name, yaml) in crd::crd_files().map_err(CliError::wrap)? {
                let path = dir.join(name);
                std::fs::write(&path, yaml).context(|| path.display().to_string())?;
            }
        }
    }
    Ok(())
}
