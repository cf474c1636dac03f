//! `eventtermq`: the broker (no subcommand) and its CLI (subcommands).

use clap::Parser;
use eventtermq_cli::{self as cli, args::Cli, Ctx};

fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    match args.command {
        None => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if args.broker.worker_threads > 0 {
                builder.worker_threads(args.broker.worker_threads);
            }
            let runtime = builder.enable_all().build().expect("tokio runtime");
            let tls = cli::run::TlsFiles { ca: args.tls_ca_file, cert: args.tls_cert_file, key: args.tls_key_file };
            let config = cli::run::node_config(&args.broker, &args.host, args.port).and_then(|c| {
                let otlp = cli::otlp::settings(&args.broker, &c.advertise_addr)?;
                Ok((c, cli::run::ports(&args.broker, args.port)?, cli::run::tls_settings(&args.broker, &tls)?, otlp))
            });
            let (config, ports, tls, otlp) = match config {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return std::process::ExitCode::from(cli::exit_status::USAGE);
                }
            };
            // The exporter's gRPC channel is made on the runtime.
            let exporter = match runtime
                .block_on(async { cli::otlp::init_broker_logging(args.broker.log_format, otlp.as_ref()) })
            {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: {e}");
                    return std::process::ExitCode::from(cli::exit_status::USAGE);
                }
            };
            let result = runtime.block_on(cli::run::run_broker(config, ports, tls));
            if let Some(e) = exporter {
                e.shutdown();
            }
            match result {
                Ok(()) => std::process::ExitCode::SUCCESS,
                // Refused to start (the directory is another process's, a port is
                // taken, damaged state) or stopped by a fatal error.
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::ExitCode::from(cli::exit_status::REJECTED)
                }
            }
        }
        Some(command) => {
            // A client is one conversation at a time: one thread, no hand-offs between
            // threads on every request and answer.
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            let tls = cli::run::TlsFiles { ca: args.tls_ca_file, cert: args.tls_cert_file, key: args.tls_key_file };
            let addr = cli::target_addr(&args.host, args.port);
            let run = async {
                let tls = cli::client_tls(&tls)?;
                let credentials = cli::Credentials::load(args.user.as_deref(), args.password_file.as_deref())?;
                let ctx = Ctx { addr, namespace: args.namespace, output: args.output, tls, credentials };
                cli::commands::execute(&ctx, command).await
            };
            match runtime.block_on(run) {
                Ok(()) => std::process::ExitCode::from(cli::exit_status::DONE),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::ExitCode::from(e.exit_status())
                }
            }
        }
    }
}
