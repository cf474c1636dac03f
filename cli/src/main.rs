//! `eventtermq`: the broker (no subcommand) and its CLI (subcommands).

use clap::Parser;
use eventtermq_cli::{self as cli, args::Cli, Ctx};

fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    match args.command {
        None => {
            // Before the runtime starts its threads, so that every thread's allocations
            // fall under the limit.
            if let Err(e) = limit_malloc_arenas(args.broker.malloc_arena_max) {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(cli::exit_status::USAGE);
            }
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
                // taken, damaged state, a format it does not read) or stopped by a
                // fatal error.
                Err(e) => {
                    eprintln!("error: {e:#}");
                    // A directory of a format this release does not read (a downgrade):
                    // its own status, so that scripts and operators can tell it apart.
                    if e.downcast_ref::<eventtermq_broker::node::NodeError>().is_some_and(|e| e.is_format_refusal()) {
                        return std::process::ExitCode::from(cli::exit_status::DATA_FORMAT_REFUSED);
                    }
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
            let (probe_addr, tls_used) = (addr.clone(), tls.ca.is_some());
            let run = async {
                let tls = cli::client_tls(&tls)?;
                let credentials = cli::Credentials::load(args.user.as_deref(), args.password_file.as_deref())?;
                let ctx = Ctx { addr, namespace: args.namespace, output: args.output, tls, credentials };
                cli::commands::execute(&ctx, command).await
            };
            match runtime.block_on(run) {
                Ok(()) => std::process::ExitCode::from(cli::exit_status::DONE),
                Err(e) => {
                    let e = e.diagnosed(&probe_addr, tls_used);
                    eprintln!("error: {e}");
                    std::process::ExitCode::from(e.exit_status())
                }
            }
        }
    }
}

/// `--malloc-arena-max`: caps glibc's malloc arenas (0 leaves glibc's default).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas(max: u32) -> Result<(), String> {
    if max == 0 {
        return Ok(());
    }
    let value = libc::c_int::try_from(max)
        .map_err(|_| format!("--malloc-arena-max: {max} is more than {} arenas", libc::c_int::MAX))?;
    // SAFETY: mallopt only changes a setting of glibc's allocator, which it guards with
    // its own lock; no pointer is passed. Measured worth it: 20-25 % less memory per
    // node at 10,000 topics and groups (see the flag's help).
    let changed = unsafe { libc::mallopt(libc::M_ARENA_MAX, value) };
    if changed == 1 {
        Ok(())
    } else {
        Err(format!("--malloc-arena-max: glibc refused {max} arenas"))
    }
}

/// Other C libraries have no arenas to cap.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas(_max: u32) -> Result<(), String> {
    Ok(())
}
