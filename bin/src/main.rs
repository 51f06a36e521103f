//! `ferry`: run a VM (`ferry run`) or say what this host can do
//! (`ferry check`). Every failure is one line on stderr and a non-zero
//! exit status: 1 when Ferry could not start or run the VM, 2 when the
//! guest ended abnormally (triple fault, KVM internal error, ...).

mod cli;
mod ctl;
mod logger;
mod progress;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    logger::init();
    let cli = match Cli::try_parse_from(std::env::args_os().map(qemu_spelling)) {
        Ok(cli) => cli,
        Err(e) => return cli::report_usage_error(e),
    };
    match cli.command {
        Command::Run(args) => run(args),
        Command::Check(args) => check(args),
        Command::Ctl(args) => ctl::run(args),
    }
}

/// QEMU's single-dash spelling of the options an orchestrator passes
/// (`-incoming defer`, `-object ...`); clap knows only `--incoming` and
/// `--object`.
fn qemu_spelling(arg: std::ffi::OsString) -> std::ffi::OsString {
    if arg == "-incoming" {
        "--incoming".into()
    } else if arg == "-object" {
        "--object".into()
    } else {
        arg
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("ferry: {message}");
    ExitCode::from(1)
}

fn run(args: cli::RunArgs) -> ExitCode {
    let seccomp = match args
        .seccomp
        .clone()
        .or_else(|| std::env::var("FERRY_SECCOMP").ok())
        .map(|s| s.parse::<vmm::seccomp::SeccompMode>())
        .transpose()
    {
        Ok(mode) => mode.unwrap_or_default(),
        Err(e) => return fail(e),
    };
    let built = match args.into_start() {
        Ok(cli::Start::Boot(config)) => vmm::Vm::new(&config),
        // Whatever a source sends is read under seccomp.
        Ok(cli::Start::Incoming(config)) => {
            vmm::seccomp::install_process(vmm::seccomp::ThreadKind::Arriving, seccomp)
                .map_err(vmm::VmmError::from)
                .and_then(|()| vmm::Vm::incoming(&config))
        }
        Err(e) => return fail(e),
    };
    let mut vm = match built {
        Ok(vm) => vm,
        Err(vmm::VmmError::QuitWhileArriving) => return ExitCode::SUCCESS,
        Err(e) => return fail(e),
    };
    vm.set_seccomp(seccomp);
    match vm.run() {
        Ok(exit) if exit.is_clean() => {
            if matches!(exit, vmm::VmExit::Signal(_)) {
                eprintln!("ferry: {exit}");
            }
            ExitCode::SUCCESS
        }
        Ok(exit) => {
            eprintln!("ferry: {exit}");
            ExitCode::from(2)
        }
        Err(e) => fail(e),
    }
}

fn check(args: cli::CheckArgs) -> ExitCode {
    let report = match vmm::check::probe() {
        Ok(r) => r,
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "kvm": false, "error": e.to_string() })
                );
            }
            return fail(e);
        }
    };
    let usable = report.missing_required().is_none();
    if args.json {
        let caps: serde_json::Map<String, serde_json::Value> = report
            .capabilities
            .iter()
            .map(|c| (c.name.to_string(), c.present.into()))
            .collect();
        let kind = match report.kind {
            vmm::check::KvmKind::Hardware => "hardware",
            vmm::check::KvmKind::Pvm => "kvm_pvm",
        };
        println!(
            "{}",
            serde_json::json!({
                "kvm": true,
                "usable": usable,
                "kind": kind,
                "api_version": report.api_version,
                "max_vcpus": report.max_vcpus,
                "linux_userspace": report.linux_userspace(),
                "capabilities": caps,
            })
        );
    } else {
        println!(
            "KVM:            /dev/kvm, API version {}",
            report.api_version
        );
        println!("Virtualization: {}", report.kind);
        println!("vCPUs:          up to {} per VM", report.max_vcpus);
        if report.linux_userspace() {
            println!("Linux guests:   boot to userspace");
        } else {
            println!(
                "Linux guests:   early boot only (banner, memory map, ACPI, CPUs); no userspace."
            );
            println!(
                "                Ferry refuses a Linux kernel here unless --allow-no-userspace;"
            );
            println!("                run the probe guest instead (see README).");
        }
        println!("Capabilities Ferry uses:");
        for c in &report.capabilities {
            let mark = if c.present { "yes" } else { "NO " };
            let need = if c.required { "required" } else { "optional" };
            println!("  {mark}  {:<44} {need}", c.name);
        }
    }
    if usable {
        ExitCode::SUCCESS
    } else {
        fail(format!(
            "KVM lacks a capability Ferry requires: {}",
            report.missing_required().unwrap_or("?")
        ))
    }
}
