//! TLS migration of the populated guest beside plaintext, Ferry and QEMU
//! 7.2 with the same certificates (one CA, a server certificate for host
//! B's address, a client one for A; `verify-peer` on both ends), set up as
//! libvirt sets it up: `object-add tls-creds-x509` on each end, then
//! `migrate-set-parameters {"tls-creds": ...}`. The URI's host is what the
//! server's certificate must name (an IP SAN).

use std::path::PathBuf;
use std::sync::OnceLock;

use ferry_tests::bench_net::median;
use ferry_tests::hosts::B_ADDR;
use ferry_tests::tlscerts::{Side, TestCa};
use ferry_tests::vmms::{Guest, Vmm};
use serde_json::json;

use crate::populated::{rows, Run, Variant};
use crate::Env;

struct Dirs {
    server: PathBuf,
    client: PathBuf,
}

fn dirs() -> &'static Dirs {
    static DIRS: OnceLock<Dirs> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("ferry-bench-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let ca = TestCa::new("Ferry bench CA");
        Dirs {
            server: ca.write_dir(&root.join("server"), Side::Server, &[B_ADDR], false),
            client: ca.write_dir(&root.join("client"), Side::Client, &["source"], false),
        }
    })
}

/// Both ends' credentials and `tls-creds`.
pub fn configure(src: &mut Guest, dst: &mut Guest) {
    let d = dirs();
    for (guest, dir, endpoint) in [(src, &d.client, "client"), (dst, &d.server, "server")] {
        guest
            .exec(
                "object-add",
                json!({ "qom-type": "tls-creds-x509", "id": "tls0", "dir": dir,
                        "endpoint": endpoint, "verify-peer": true }),
            )
            .expect("object-add tls-creds-x509");
        guest
            .exec("migrate-set-parameters", json!({ "tls-creds": "tls0" }))
            .expect("tls-creds");
    }
}

/// FERRY_BENCH_TLS_GUEST=4096/2G (guest MiB / pattern), the unshaped
/// link; every VMM in plaintext and TLS, one stream and multifd
/// (FERRY_BENCH_CHANNELS, default 2), interleaved.
pub fn tls(env: &mut Env) {
    let guest = std::env::var("FERRY_BENCH_TLS_GUEST").unwrap_or_else(|_| "4096/2G".into());
    let Some((mib, pattern)) = guest.split_once('/') else {
        eprintln!("FERRY_BENCH_TLS_GUEST={guest:?}: expected MiB/PATTERN");
        return;
    };
    let Ok(mib) = mib.parse() else {
        eprintln!("FERRY_BENCH_TLS_GUEST={guest:?}: expected MiB/PATTERN");
        return;
    };
    let channels = crate::env_or("FERRY_BENCH_CHANNELS", 2u32);
    let mut variants = Vec::new();
    for &vmm in &env.vmms {
        for n in [0, channels] {
            variants.push(Variant::new(vmm, n));
            variants.push(Variant {
                tls: true,
                ..Variant::new(vmm, n)
            });
        }
    }
    let runs = rows(
        env,
        &variants,
        mib,
        pattern,
        "veth, unshaped, TLS beside plaintext",
    );
    let rate = |v: Variant| -> f64 {
        median(
            runs.iter()
                .filter(|r| r.0 == v)
                .map(|r| Run::gbytes_per_sec(&r.1))
                .collect(),
        )
    };
    println!();
    for &v in variants.iter().filter(|v| v.tls) {
        let plain = Variant { tls: false, ..v };
        let (t, p) = (rate(v), rate(plain));
        println!(
            "{}: {t:.2} GB/s, {:.0} % of its plaintext {p:.2} GB/s (TLS costs {:.0} %)",
            v.label(),
            100.0 * t / p,
            100.0 * (1.0 - t / p)
        );
        if v.vmm == Vmm::Ferry {
            let qemu = Variant {
                vmm: Vmm::Qemu,
                ..v
            };
            if variants.contains(&qemu) {
                println!(
                    "{} / {}: {:.2}× the throughput",
                    v.label(),
                    qemu.label(),
                    t / rate(qemu)
                );
            }
        }
    }
}
