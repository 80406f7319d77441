//! A whole run: check the arguments, set up the target (spawning a relay with its own PKI if
//! asked), run the phases of the chosen mode ([`crate::scenario`]), and write the reports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::{Cli, Command, RunArgs, TargetAddr, check_args, parse_fault, parse_target};
use crate::enlist::EnlistReport;
use crate::machine::{Machine, raise_nofile};
use crate::parity::{ParityConfig, Scope};
use crate::payload::SizeMix;
use crate::phase::{Ctx, Traffic};
use crate::pki::{Identities, NetworkRequest};
use crate::population::{Population, PopulationSpec};
use crate::relay_target::Harness;
use crate::report::{one_line, phase_json};
use crate::scenario::{Outcome, scenario};
use crate::spawn::{SpawnedRelay, find_relay_binary};

/// Exit status when something acknowledged was lost, duplicated, reordered or damaged.
pub const EXIT_INTEGRITY: u8 = 1;
/// Exit status for setup and usage errors.
pub const EXIT_SETUP: u8 = 2;
/// Exit status when the run was intact but parity failed.
pub const EXIT_PARITY: u8 = 3;

pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::TuneCheck { profile }) => {
            match crate::tune::check(&profile, crate::tune::read_sysctl) {
                Ok(checks) => {
                    if crate::tune::print_check(&profile, &checks) == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("loadgen: {e}");
                    ExitCode::from(EXIT_SETUP)
                }
            }
        }
        Some(Command::Pki {
            out,
            partners,
            idle_network,
        }) => match write_pki(&out, partners, idle_network) {
            Ok(config) => {
                println!("wrote {}", config.display());
                println!("start: relay serve --config {}", config.display());
                println!(
                    "then:  loadgen --pki {} --partners {partners} ...",
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("loadgen: {e}");
                ExitCode::from(EXIT_SETUP)
            }
        },
        Some(Command::Hostile {
            idle,
            push,
            flood_rate,
            rounds,
            relay_bin,
            relay_cores,
            relay_limit,
            json,
        }) => {
            let args = crate::hostile::HostileArgs {
                idle,
                push,
                flood_rate,
                rounds,
                relay_bin,
                relay_cores,
                relay_limits: relay_limit,
                json,
            };
            match crate::hostile::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("loadgen hostile: {e}");
                    ExitCode::from(EXIT_SETUP)
                }
            }
        }
        Some(Command::Compare { reports }) => {
            let mut loaded = Vec::new();
            for arg in &reports {
                let (label, path) = match arg.split_once('=') {
                    Some((label, path)) => (Some(label.to_string()), path),
                    None => (None, arg.as_str()),
                };
                let text = match std::fs::read_to_string(path) {
                    Ok(text) => text,
                    Err(e) => {
                        eprintln!("loadgen: {path}: {e}");
                        return ExitCode::from(EXIT_SETUP);
                    }
                };
                match serde_json::from_str::<Value>(&text) {
                    Ok(v) => {
                        let label = label
                            .unwrap_or_else(|| v["target"].as_str().unwrap_or(path).to_string());
                        loaded.push((label, v));
                    }
                    Err(e) => {
                        eprintln!("loadgen: {path}: {e}");
                        return ExitCode::from(EXIT_SETUP);
                    }
                }
            }
            print!("{}", crate::report::compare_table(&loaded));
            ExitCode::SUCCESS
        }
        None => match run(&cli.run) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("loadgen: {e}");
                ExitCode::from(EXIT_SETUP)
            }
        },
    }
}

/// Network requests for a population of `partners` partners (and the idle network).
pub fn network_requests(partners: u32, idle_network: bool) -> Vec<NetworkRequest> {
    let mut requests = vec![NetworkRequest {
        id: 1,
        name: "gatekeeper".into(),
        server_role: Some("gatekeeper_server"),
    }];
    for n in 0..partners {
        requests.push(NetworkRequest {
            id: n + 2,
            name: format!("partner-{}", n + 2),
            server_role: Some("partner_server"),
        });
    }
    if idle_network {
        requests.push(NetworkRequest {
            id: crate::scale::idle_network_id(partners),
            name: "idle-devices".into(),
            server_role: None,
        });
    }
    requests
}

fn write_pki(out: &Path, partners: u32, idle_network: bool) -> Result<PathBuf, String> {
    let (identities, server) = Identities::generate(&network_requests(partners, idle_network))?;
    identities.write(&server, out, &out.join("data"), &[])
}

fn run(args: &RunArgs) -> Result<ExitCode, String> {
    check_args(args)?;
    let target = parse_target(&args.target)?;
    let partners = args.partners;
    let spec = PopulationSpec {
        partners,
        users_per_network: args.users,
        multi_device_share: args.multi_device_share,
        devices_multi: args.devices_multi,
        direct_partners: args.direct_partners.unwrap_or(partners / 2),
        offline_share: args.offline_share,
        server_connections: args.server_connections,
        seed: args.seed,
    };
    let population = Population::build(&spec)?;
    let traffic = Traffic {
        interop_share: args.interop_share,
        outbound_share: args.outbound_share,
        typing_share: args.typing_share,
        sizes: SizeMix::parse(&args.payload)?,
        ttl_seconds: args.ttl_s,
    };
    let faults = parse_fault(args.fault.as_deref())?;
    let parity_config = ParityConfig {
        scope: if args.parity_scope == "all" {
            Scope::All
        } else {
            Scope::Matched
        },
        bound: args.parity_bound,
        floor_us: args.parity_floor_us,
        delivery_tolerance: args.parity_delivery_tolerance,
        tail_samples: args.parity_tail_samples,
    };
    // Every session is a file descriptor, here and in a spawned relay (which inherits the
    // limit): population sessions, idle sessions, and some slack for each process's own.
    let sessions = population.direct_devices().count() as u64
        + u64::from(spec.server_connections) * u64::from(partners + 1);
    let wanted_files = sessions + u64::from(args.idle_conns) + 200;
    let nofile = raise_nofile(wanted_files);
    if nofile < wanted_files {
        let message = format!(
            "this run needs about {wanted_files} open files per process ({sessions} population \
             sessions, {} idle), the limit is {nofile} and could not be raised (the hard limit; \
             raising it needs root with CAP_SYS_RESOURCE: `ulimit -Hn`, LimitNOFILE)",
            args.idle_conns
        );
        if args.idle_conns > 0 {
            return Err(format!("--idle-conns: {message}"));
        }
        eprintln!("loadgen: warning: {message}");
    }
    let machine = Machine::probe();
    let started_at = devkit::now_ms() / 1000;
    let population_summary = population.summary();
    let ctx = Arc::new(Ctx::new(population, traffic, faults, args.seed));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let outcome = match target {
        TargetAddr::Relay(addr) => run_relay(args, &runtime, ctx.clone(), addr, &parity_config)?,
        TargetAddr::Mqtt(addr) => {
            runtime.block_on(crate::mqtt::run(args, ctx.clone(), addr, &parity_config))?
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(1));
    let report = assemble(
        args,
        &parity_config,
        &outcome,
        &machine,
        population_summary,
        started_at,
        &ctx,
    );
    let code = exit_code(&outcome);
    let mut report = report;
    if let Some(map) = report.as_object_mut() {
        map.insert("exit_code".into(), json!(code));
    }
    for (_, result, parity) in &outcome.phases {
        println!("{}", one_line(result, parity));
    }
    if let Some(scale) = &outcome.scale {
        println!("connection scale: {scale}");
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("--json {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.html {
        let page = crate::html::render(&report, &outcome_curves(&outcome));
        std::fs::write(path, page).map_err(|e| format!("--html {}: {e}", path.display()))?;
    }
    Ok(ExitCode::from(code))
}

fn exit_code(outcome: &Outcome) -> u8 {
    let intact = outcome.phases.iter().all(|(_, r, _)| r.tally.intact());
    let parity = outcome.phases[outcome.main].2.pass
        && outcome.overload.is_none_or(|i| outcome.phases[i].2.pass);
    if !intact {
        EXIT_INTEGRITY
    } else if !parity {
        EXIT_PARITY
    } else {
        0
    }
}

/// Percentile curves of the main phase's classes, for the HTML report.
fn outcome_curves(outcome: &Outcome) -> crate::html::Curves {
    let main = &outcome.phases[outcome.main].1;
    crate::html::Curves {
        first_party: crate::stats::percentile_curve(&main.latencies.classes[0]),
        interop: crate::stats::percentile_curve(&main.latencies.classes[1]),
    }
}

fn run_relay(
    args: &RunArgs,
    runtime: &tokio::runtime::Runtime,
    ctx: Arc<Ctx>,
    addr: SocketAddr,
    parity: &ParityConfig,
) -> Result<Outcome, String> {
    let workdir = std::env::temp_dir().join(format!(
        "loadgen-{}-{:x}",
        std::process::id(),
        crate::rng::os_random_u64() & 0xFFFF_FFFF
    ));
    let (addr, identities, spawned) = if args.spawn {
        let bin = find_relay_binary(args.relay_bin.as_deref())?;
        let requests = network_requests(args.partners, args.idle_conns > 0);
        let (identities, server) = Identities::generate(&requests)?;
        let data = workdir.join("data");
        let limits: Vec<String> = args
            .relay_limit
            .iter()
            .map(|l| match l.split_once('=') {
                Some((k, v)) => format!("{} = {}", k.trim(), v.trim()),
                None => l.clone(),
            })
            .collect();
        let config = identities.write(&server, &workdir.join("pki"), &data, &limits)?;
        let relay = SpawnedRelay::start(
            &bin,
            Some(&config),
            &data,
            args.relay_cores,
            args.relay_durability.as_deref(),
            Some(args.relay_policy.as_str()),
            &workdir.join("relay.log"),
        )?;
        (relay.ready.tls, identities, Some(relay))
    } else {
        let identities = Identities::load(&args.pki)?;
        if identities.networks.len() < args.partners as usize + 1 {
            return Err(format!(
                "{} has identities for {} networks; --partners {} needs {} (use --partners {}, \
                 or `loadgen pki --out DIR --partners N` and start the relay with its relay.toml)",
                args.pki.display(),
                identities.networks.len(),
                args.partners,
                args.partners + 1,
                identities.networks.len().saturating_sub(1)
            ));
        }
        (addr, identities, None)
    };
    let mut identities = identities;
    if ctx.faults.network_key_mismatch {
        // The relay knows network 2 by the key its config (or PKI) named; loadgen now signs
        // with another.
        for network in identities.networks.iter_mut().filter(|n| n.id == 2) {
            network.token_key_pkcs8 = client::generate_network_key();
        }
    }
    let api = spawned.as_ref().map_or(args.api, |r| r.ready.http);
    if args.no_enlist && spawned.as_ref().is_some_and(|r| r.ready.policy != "off") {
        eprintln!(
            "loadgen: warning: --no-enlist with a spawned relay that enforces the interop \
             rules: it refuses interop traffic of users it does not know (SENDER_NOT_ENLISTED); \
             --relay-policy off measures the data plane alone"
        );
    }
    let relay_info = match &spawned {
        Some(r) => {
            json!({ "spawned": true, "pid": r.pid(), "ready": r.ready, "bin": find_relay_binary(args.relay_bin.as_deref()).ok() })
        }
        None => json!({ "spawned": false, "addr": addr, "api": api }),
    };
    let identities = Arc::new(identities);
    let result = runtime.block_on(async {
        // Before any session: the relay knows every user (and its devices) before the
        // first frame, as it would in production.
        let enlistment = if args.no_enlist {
            EnlistReport::skipped("--no-enlist")
        } else {
            crate::enlist::enlist(
                &ctx.population,
                &identities,
                api,
                crate::enlist::CONCURRENCY,
            )
            .await?
        };
        let harness = Harness::connect(ctx.clone(), addr, identities.clone()).await?;
        let setup = serde_json::to_value(&harness.setup).unwrap_or(Value::Null);
        let mut outcome = scenario(&harness, args, parity).await;
        outcome.setup = setup;
        outcome.enlistment = enlistment.to_json();
        if args.idle_conns > 0 {
            let pid = spawned.as_ref().map(SpawnedRelay::pid);
            outcome.scale = Some(
                crate::scale::run(
                    &harness,
                    args,
                    &identities,
                    addr,
                    pid,
                    parity,
                    &mut outcome.phases,
                )
                .await,
            );
        }
        harness.close().await;
        Ok::<Outcome, String>(outcome)
    });
    let mut relay_info = relay_info;
    if let Some(relay) = spawned {
        let rss = relay.rss_kib();
        let log = relay.log.clone();
        let stopped = relay.stop();
        if let Some(map) = relay_info.as_object_mut() {
            map.insert("rss_kib_at_end".into(), json!(rss));
            map.insert("stopped".into(), json!(stopped));
        }
        if result.is_err() {
            eprintln!("relay log:\n{}", crate::spawn::tail(&log));
        }
    }
    if !args.keep_relay_data {
        let _ = std::fs::remove_dir_all(&workdir);
    } else if args.spawn {
        eprintln!("loadgen: relay data and log kept in {}", workdir.display());
    }
    let mut outcome = result?;
    outcome.relay = relay_info;
    Ok(outcome)
}

fn assemble(
    args: &RunArgs,
    parity_config: &ParityConfig,
    outcome: &Outcome,
    machine: &Machine,
    population: Value,
    started_at: u64,
    ctx: &Ctx,
) -> Value {
    let (_, main, main_parity) = &outcome.phases[outcome.main];
    let mut report = phase_json(main, main_parity, parity_config, true);
    let intact = outcome.phases.iter().all(|(_, r, _)| r.tally.intact());
    let overload = outcome.overload.map(|i| {
        let (_, r, p) = &outcome.phases[i];
        phase_json(r, p, parity_config, true)
    });
    let max = outcome.max.as_ref().map(|s| {
        json!({
            "rate_per_s": s.result(),
            "p99_bound_us": s.p99_bound_us,
            "precision": s.precision,
            "steps": s.steps,
            "parity_rate_per_s": main.spec.rate_per_s,
        })
    });
    let phases: Vec<Value> = outcome
        .phases
        .iter()
        .map(|(role, r, p)| {
            let mut v = phase_json(r, p, parity_config, false);
            if let Some(map) = v.as_object_mut() {
                map.insert("role".into(), json!(role));
            }
            v
        })
        .collect();
    let parity_pass = main_parity.pass && outcome.overload.is_none_or(|i| outcome.phases[i].2.pass);
    if let Some(map) = report.as_object_mut() {
        map.insert("loadgen_version".into(), json!(env!("CARGO_PKG_VERSION")));
        map.insert("target".into(), json!(args.target));
        map.insert("mode".into(), json!(if args.max { "max" } else { "fixed" }));
        map.insert("started_at_unix".into(), json!(started_at));
        map.insert("overload".into(), overload.unwrap_or(Value::Null));
        map.insert("max".into(), max.unwrap_or(Value::Null));
        map.insert(
            "connection_scale".into(),
            outcome.scale.clone().unwrap_or(Value::Null),
        );
        map.insert("phases".into(), json!(phases));
        map.insert("population".into(), population);
        map.insert("setup".into(), outcome.setup.clone());
        map.insert(
            "enlistment".into(),
            if outcome.enlistment.is_null() {
                EnlistReport::skipped("not a relay target").to_json()
            } else {
                outcome.enlistment.clone()
            },
        );
        map.insert("relay".into(), outcome.relay.clone());
        map.insert("machine".into(), json!(machine));
        map.insert("config".into(), config_json(args, ctx));
        map.insert("pass".into(), json!(intact && parity_pass));
        map.insert("integrity_pass".into(), json!(intact));
        map.insert("parity_pass".into(), json!(parity_pass));
    }
    report
}

fn config_json(args: &RunArgs, ctx: &Ctx) -> Value {
    json!({
        "command_line": std::env::args().collect::<Vec<_>>(),
        "target": args.target,
        "spawn": args.spawn,
        "relay_cores": args.relay_cores,
        "relay_durability": args.relay_durability,
        "relay_policy": args.relay_policy,
        "api": (!args.spawn).then_some(args.api),
        "no_enlist": args.no_enlist,
        "relay_limits": args.relay_limit,
        "population": ctx.population.spec,
        "traffic": ctx.traffic,
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "drain_s": args.drain_s,
        "offline_return_s": args.offline_return_s.unwrap_or(args.duration / 2.0),
        "max": args.max,
        "p99_bound_ms": args.p99_bound_ms,
        "max_start": args.max_start,
        "max_step_s": args.max_step_s,
        "max_steps": args.max_steps,
        "overload_factor": args.overload_factor,
        "idle_conns": args.idle_conns,
        "parity": {
            "scope": args.parity_scope,
            "bound": args.parity_bound,
            "floor_us": args.parity_floor_us,
            "delivery_tolerance": args.parity_delivery_tolerance,
            "tail_samples": args.parity_tail_samples,
        },
        "threads": args.threads,
        "seed": args.seed,
        "faults": ctx.faults,
    })
}
