# libvirt's migration conversation, played with QEMU's own Python QMP
# library (`pip install qemu.qmp`) against two Ferry processes on
# loopback: a manual check that Ferry speaks to QEMU's client as QEMU
# does (the Rust test tests/tests/orchestrated.rs is the one CI runs).
# Run from the workspace root after `cargo build` and a test run (which
# builds the probe): python3 tests/scripts/libvirt_conversation.py
import asyncio, os, subprocess, sys, tempfile, time
from qemu.qmp import QMPClient, ExecuteError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FERRY = f"{ROOT}/target/debug/ferry"
PROBE = f"{ROOT}/target/probe/x86_64-unknown-linux-gnu/release/ferry-probe"
D = tempfile.mkdtemp(prefix="ferry-libvirt-")

def spawn(args, name):
    for f in (f"{D}/{name}.qmp",):
        if os.path.exists(f): os.unlink(f)
    p = subprocess.Popen([FERRY, "run", *args, "--qmp", f"unix:{D}/{name}.qmp", "--serial", f"file:{D}/{name}.log"],
                         stderr=open(f"{D}/{name}.err", "w"))
    for _ in range(400):
        if os.path.exists(f"{D}/{name}.qmp"): return p
        time.sleep(0.01)
    raise SystemExit(f"{name}: no QMP socket")

async def statuses(q, until, acc):
    with q.listener() as listener:
        async for ev in listener:
            acc.append((ev["event"], ev.get("data")))
            if ev["event"] == "MIGRATION" and ev["data"]["status"] in until:
                return

async def main():
    src = spawn(["--kernel", PROBE, "--memory", "256M", "--cmdline", "probe.heartbeat=100 probe.pattern=3,32M"], "src")
    dst = spawn(["-S", "-incoming", "defer"], "dst")
    s, d = QMPClient("src"), QMPClient("dst")
    await s.connect(f"{D}/src.qmp"); await d.connect(f"{D}/dst.qmp")
    print("dst query-status:", await d.execute("query-status"), flush=True)
    caps = [{"capability": "events", "state": True}, {"capability": "pause-before-switchover", "state": True}]
    await d.execute("migrate-set-capabilities", {"capabilities": caps})
    await d.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
    try:
        await d.execute("migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
    except ExecuteError as e:
        print("postcopy-ram refused:", str(e), flush=True)
    await d.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:47321"})
    try:
        await d.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:47322"})
    except ExecuteError as e:
        print("second migrate-incoming:", str(e), flush=True)
    print("dst query-migrate listening:", await d.execute("query-migrate"), flush=True)
    await s.execute("migrate-set-capabilities", {"capabilities": caps})
    await s.execute("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 1 << 30})
    sev, dev = [], []
    dwatch = asyncio.create_task(statuses(d, ("completed", "failed"), dev))
    swatch = asyncio.create_task(statuses(s, ("pre-switchover", "failed"), sev))
    await asyncio.sleep(0.1)
    await s.execute("migrate", {"uri": "tcp:127.0.0.1:47321"})
    await swatch
    print("src at pre-switchover:", await s.execute("query-status"), flush=True)
    swatch = asyncio.create_task(statuses(s, ("completed", "failed"), sev))
    await s.execute("migrate-continue", {"state": "pre-switchover"})
    await swatch; await dwatch
    print("src events:", sev, flush=True)
    print("dst events:", dev, flush=True)
    print("dst query-status:", await d.execute("query-status"), flush=True)
    info = await s.execute("query-migrate")
    print("src query-migrate keys:", sorted(info), sorted(info["ram"]), flush=True)
    await d.execute("cont")
    print("dst after cont:", await d.execute("query-status"), flush=True)
    print("src:", await s.execute("query-status"), flush=True)
    await s.execute("quit"); await d.execute("quit")
    for q in (s, d):
        try:
            await q.disconnect()
        except EOFError:
            pass  # the VMM closed the socket after `quit`, as QEMU does
    print("exit codes:", src.wait(timeout=10), dst.wait(timeout=10), flush=True)

asyncio.run(main())
