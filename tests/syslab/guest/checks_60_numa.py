"""Guest NUMA cells on the real systemd host's two NUMA nodes (the lab boots with CPUs 0-1
on node 0 and 2-3 on node 1): an exclusive domain whose two cells keep their memory on
opposite nodes (``<numatune><memnode>``), started by ``pinwarden start`` — each cell's
vCPU placed on the node of its memory, and the domain running under pinwarden's holder
partition with QEMU binding each cell's memory to its node as the XML says."""

from __future__ import annotations

from pathlib import Path

from guestlab import (
    Data,
    check,
    observe_domain,
    pinwarden,
    read,
    remove_domain,
    tiny_domain_xml,
)

CONFIG = Path("/run/pwtest-numa.toml")
NAME = "pwtest-cells"
META = "<pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/>"
#: cell 0 (vCPU 0) keeps its memory on node 1, cell 1 (vCPU 1) on node 0
CELLS = ("<numatune><memnode cellid='0' mode='strict' nodeset='1'/>"
         "<memnode cellid='1' mode='strict' nodeset='0'/></numatune>"
         "<cpu><numa><cell id='0' cpus='0' memory='32' unit='MiB'/>"
         "<cell id='1' cpus='1' memory='32' unit='MiB'/></numa></cpu>")


def nodes() -> dict[str, str | None]:
    return {p.name: read(p / "cpulist")
            for p in sorted(Path("/sys/devices/system/node").glob("node[0-9]*"))}


def cells_xml() -> str:
    xml = tiny_domain_xml(NAME, vcpus=2, metadata=META, memory_mib=64)
    return xml.replace("<os>", CELLS + "<os>", 1)


@check("numa_cells", needs=["install", "boot"])
def numa_cells() -> Data:
    out: Data = {"nodes": nodes()}
    CONFIG.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n')
    source = Path(f"/run/{NAME}.xml")
    source.write_text(cells_xml())
    conf = ("--config", str(CONFIG))
    try:
        out["plan"] = pinwarden("plan", *conf, "--json", str(source))
        out["define"] = pinwarden("define", *conf, str(source))
        out["start"] = pinwarden("start", *conf, NAME, "--json")
        dom = observe_domain(NAME)
        out["domain"] = dom
        pid = dom.get("pid")
        if pid:  # QEMU binds each cell's memory (mbind): its command line, the kernel's view
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            out["memory_backends"] = [a.decode() for a in cmdline if b"ram-node" in a]
            out["numa_maps_bind"] = [line for line in (read(f"/proc/{pid}/numa_maps") or "")
                                     .splitlines() if " bind:" in line]
        out["status"] = pinwarden("status", *conf, "--json")
    finally:
        remove_domain(NAME)
        out["sync"] = pinwarden("sync", *conf)
        out["status_after"] = pinwarden("status", *conf, "--json")
        CONFIG.unlink(missing_ok=True)
        source.unlink(missing_ok=True)
    return out
