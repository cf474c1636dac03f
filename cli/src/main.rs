//! `eventtermq`: the broker (no subcommand) and its CLI (subcommands).

use clap::Parser;
use eventtermq_cli::{self as cli, args::Cli, args::LogFormat, Ctx};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        // Colour codes only on a terminal: a file or `kubectl logs` shows them raw.
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    match args.command {
        None => {
            init_logging(args.broker.log_format);
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if args.broker.worker_threads > 0 {
                builder.worker_threads(args.broker.worker_threads);
            }
            let runtime = builder.enable_all().build().expect("tokio runtime");
            let tls = cli::run::TlsFiles { ca: args.tls_ca_file, cert: args.tls_cert_file, key: args.tls_key_file };
            let config = cli::run::node_config(&args.broker, &args.host, args.port).and_then(|c| {
                Ok((c, cli::run::ports(&args.broker, args.port)?, cli::run::tls_settings(&args.broker, &tls)?))
            });
            let (config, ports, tls) = match config {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return std::process::ExitCode::from(cli::exit_status::USAGE);
                }
            };
            match runtime.block_on(cli::run::run_broker(config, ports, tls)) {
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
                let ctx = Ctx { addr, namespace: args.namespace, output: args.output, tls };
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
