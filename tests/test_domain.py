"""Domain XML: parsing the CPU-relevant request, refusing bad and hostile XML, rendering."""

from __future__ import annotations

import re
from typing import Any

import defusedxml.ElementTree
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SEED_XML
from pinwarden.cpuset import CpuSet
from pinwarden.domain import (
    BAD_METADATA,
    MAX_XML_BYTES,
    PW_NS,
    GuestCell,
    parse_domain,
    render_plan,
)
from pinwarden.errors import InputError
from pinwarden.model import Plan
from pinwarden.record import replace

pytest.register_assert_rewrite("libvirt_env")
pytest_plugins = ["libvirt_env"]

SEED = SEED_XML

#: A realistic domain (as `virsh dumpxml` prints it, plus user comments and metadata).
RICH = """<?xml version="1.0" encoding="UTF-8"?>
<!-- managed by hand; do not regenerate -->
<domain type="kvm" id="3" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">
  <name>db-primary</name>
  <uuid>3E4A5B6C-7D8E-4F90-A1B2-C3D4E5F60718</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    <pw:cpu xmlns:pw="urn:pinwarden:domain:1" exclusive="yes" threads="isolate" emulator="isolate"/>
  </metadata>
  <memory unit="KiB">4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu   current="2"  placement="static">4</vcpu>
  <iothreads>2</iothreads>
  <cputune>
    <!-- shares first, please -->
    <shares>2048</shares>
    <iothreadpin iothread="2" cpuset="9"/>
  </cputune>
  <numatune>
    <memory mode="strict" nodeset="1"/>
    <memnode cellid="1" mode="preferred" nodeset="0"/>
  </numatune>
  <os><type arch="x86_64" machine="pc-q35-7.2">hvm</type></os>
  <cpu mode="host-passthrough">
    <topology sockets="1" dies="1" cores="2" threads="2"/>
    <numa>
      <cell id="0" cpus="0-1" memory="2" unit="GiB"/>
      <cell id="1" cpus="2-3" memory="2097152"/>
    </numa>
  </cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><source file='/var/lib/a&amp;b.qcow2'/><target dev='a'/></disk>
  </devices>
  <qemu:commandline><qemu:arg value="-no-user-config"/></qemu:commandline>
</domain>
"""


def test_seed_example_parses() -> None:
    spec = parse_domain(SEED)
    assert spec.name == "vm1" and spec.uuid is None
    assert spec.vcpus == 2 and spec.placement == "static"
    assert spec.cpuset == CpuSet.parse("4-6")
    assert spec.vcpupins == {0: CpuSet.of([5]), 1: CpuSet.of([6])}
    assert spec.emulatorpin == CpuSet.of([4])
    assert spec.exclusive and spec.has_affinity
    assert spec.domain_type == "kvm"


def test_rich_domain_parses_everything_cpu_related() -> None:
    spec = parse_domain(RICH.encode())
    assert spec.name == "db-primary"
    assert spec.uuid == "3e4a5b6c-7d8e-4f90-a1b2-c3d4e5f60718"
    assert (spec.vcpus, spec.current, spec.cpuset) == (4, 2, None)
    assert spec.exclusive and spec.threads == "isolate" and spec.emulator == "isolate"
    assert spec.iothreads == 2 and spec.iothread_id_set == (1, 2)
    assert spec.iothreadpins == {2: CpuSet.of([9])}
    assert (spec.numa_mode, spec.numa_nodeset) == ("strict", CpuSet.of([1]))
    assert spec.guest_cells == (GuestCell(0, CpuSet.parse("0-1"), 2 * 1024 * 1024),
                                GuestCell(1, CpuSet.parse("2-3"), 2097152))
    assert spec.memnodes == {1: CpuSet.of([0])}
    assert spec.partition is None and not spec.vcpupins


def test_defaults_without_cpu_elements() -> None:
    spec = parse_domain("<domain type='qemu'><name>plain</name></domain>")
    assert spec.vcpus == 1  # libvirt's default without <vcpu>
    assert not spec.has_affinity and not spec.exclusive
    assert (spec.threads, spec.emulator) == ("whole", "float")


def test_iothreadids_and_partition() -> None:
    spec = parse_domain("""<domain><name>io</name><vcpu>1</vcpu><iothreads>1</iothreads>
      <iothreadids><iothread id='4'/><iothread id='7'/></iothreadids>
      <resource><partition>/pinwarden/vm-io</partition></resource></domain>""")
    assert spec.iothread_id_set == (4, 7) and spec.iothreads == 2
    assert spec.partition == "/pinwarden/vm-io"


def test_uuid_forms_normalise() -> None:
    a = parse_domain("<domain><name>u</name><uuid>3e4a5b6c7d8e4f90a1b2c3d4e5f60718</uuid>"
                     "</domain>")
    b = parse_domain("<domain><name>u</name><uuid> 3E4A5B6C-7D8E-4F90-A1B2-C3D4E5F60718 "
                     "</uuid></domain>")
    assert a.uuid == b.uuid == "3e4a5b6c-7d8e-4f90-a1b2-c3d4e5f60718"


def test_metadata_and_cputune_exclusive_must_agree() -> None:
    xml = (f"<domain><name>c</name><metadata><pw:cpu xmlns:pw='{PW_NS}' exclusive='no'/>"
           "</metadata><cputune exclusive='yes'/></domain>")
    with pytest.raises(InputError, match="contradicts"):
        parse_domain(xml)


def _domain(body: str) -> str:
    return f"<domain><name>bad</name>{body}</domain>"


META = f"<metadata><pw:cpu xmlns:pw='{PW_NS}' %s/></metadata>"


@pytest.mark.parametrize(("body", "needle"), [
    ("<vcpu>two</vcpu>", "<vcpu>='two'"),
    ("<vcpu>-1</vcpu>", "<vcpu>='-1'"),
    ("<vcpu>99999</vcpu>", "<vcpu>='99999': must be at most 8192"),  # 0 is no bound
    ("<vcpu current='3'>2</vcpu>", "<vcpu current>='3'"),
    ("<vcpu placement='magic'>2</vcpu>", "<vcpu placement>='magic'"),
    ("<vcpu cpuset='4-x'>2</vcpu>", "<vcpu cpuset>='4-x'"),
    ("<vcpu cpuset='6-4'>2</vcpu>", "<vcpu cpuset>='6-4'"),
    ("<vcpu>2</vcpu><vcpu>2</vcpu>", "more than one <vcpu>"),
    ("<cputune exclusive='true'/>", "<cputune exclusive>='true'"),
    ("<cputune><vcpupin cpuset='1'/></cputune>", "<vcpupin vcpu> is missing"),
    ("<cputune><vcpupin vcpu='0'/></cputune>", "<vcpupin vcpu='0' cpuset> is missing"),
    ("<cputune><vcpupin vcpu='0' cpuset='1'/><vcpupin vcpu='0' cpuset='2'/></cputune>",
     "vCPU pinned twice"),
    ("<cputune><vcpupin vcpu='0' cpuset=''/></cputune>", "cpuset>=''"),
    ("<cputune><emulatorpin cpuset='a'/></cputune>", "<emulatorpin cpuset>='a'"),
    ("<cputune><emulatorpin cpuset='1'/><emulatorpin cpuset='2'/></cputune>",
     "more than one <emulatorpin>"),
    ("<cputune><iothreadpin iothread='0' cpuset='1'/></cputune>",
     "<iothreadpin iothread>='0'"),
    ("<iothreads>x</iothreads>", "<iothreads>='x'"),
    ("<numatune><memory mode='sticky'/></numatune>", "mode>='sticky'"),
    ("<numatune><memory nodeset='0-'/></numatune>", "nodeset>='0-'"),
    ("<vcpu>2</vcpu><cpu><numa><cell id='0' cpus='0-2' memory='1'/></numa></cpu>",
     "vCPU 2 does not exist"),
    ("<cpu><numa><cell id='0' cpus='0' memory='1' unit='parsecs'/></numa></cpu>",
     "unit='parsecs'"),
    ("<numatune><memnode cellid='1' nodeset='0'/></numatune><cpu><numa><cell id='0' "
     "cpus='0' memory='1'/></numa></cpu>", "cellid>='1': names no guest NUMA cell"),
    ("<numatune><memnode cellid='0' nodeset='0'/><memnode cellid='0' nodeset='1'/>"
     "</numatune><cpu><numa><cell id='0' cpus='0' memory='1'/></numa></cpu>",
     "duplicate cellid"),
    ("<numatune><memnode cellid='0' mode='sticky' nodeset='0'/></numatune><cpu><numa>"
     "<cell id='0' cpus='0' memory='1'/></numa></cpu>", "<memnode mode>='sticky'"),
    ("<numatune><memnode cellid='0'/></numatune><cpu><numa><cell id='0' cpus='0' "
     "memory='1'/></numa></cpu>", "<memnode cellid='0' nodeset> is missing"),
    ("<resource><partition>machine</partition></resource>", "<resource><partition>='machine'"),
    ("<uuid>not-a-uuid</uuid>", "<uuid>='not-a-uuid'"),
])
def test_bad_values_are_one_line_input_errors(body: str, needle: str) -> None:
    with pytest.raises(InputError) as info:
        parse_domain(_domain(body))
    assert needle in info.value.message
    assert "\n" not in info.value.message
    # a CPU or node list that does not parse: README's bad-cpuset
    lists = ("cpuset>=", "nodeset>=")
    assert info.value.code == ("bad-cpuset" if any(k in needle for k in lists)
                               else "bad-input"), (needle, info.value.code)


@pytest.mark.parametrize(("body", "needle", "asked"), [
    (META % "exclusive='si'", "<pw:cpu exclusive>='si'", True),
    (META % "exclusive='YES'", "<pw:cpu exclusive>='YES'", True),
    (META % "exclsive='yes'", "<pw:cpu exclsive>='yes'", True),  # a misspelt 'exclusive'
    (META % "exclusive='yes' threads='never'", "<pw:cpu threads>='never'", True),
    (META % "exclusive='yes' emulator='pinned'", "<pw:cpu emulator>='pinned'", True),
    (f"<metadata><pw:cpu xmlns:pw='{PW_NS}'/><pw:cpu xmlns:pw='{PW_NS}'/></metadata>",
     "more than one pinwarden", True),
    ("<cputune exclusive='yes'/>" + META % "exclusive='no'", "contradicts", True),
    ("<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:2' exclusive='yes'/></metadata>",
     "not pinwarden's", True),
    # a misspelt element in pinwarden's namespace was ignored: the domain ran shared
    (f"<metadata><pw:cpus xmlns:pw='{PW_NS}' exclusive='yes'/></metadata>",
     "<metadata> element <cpus> in pinwarden's namespace 'urn:pinwarden:domain:1' is not "
     "one pinwarden knows", True),
    (f"<metadata><pw:CPU xmlns:pw='{PW_NS}'/></metadata>", "is not one pinwarden knows",
     True),
    (f"<metadata><pw:cpu xmlns:pw='{PW_NS}' exclusive='yes'/><pw:note xmlns:pw='{PW_NS}'/>"
     "</metadata>", "<metadata> element <note> in pinwarden's", True),
    # what asks for nothing exclusive stays a plain input error
    (f"<metadata><pw:cpus xmlns:pw='{PW_NS}' exclusive='no'/></metadata>",
     "is not one pinwarden knows", False),
    (META % "threads='never'", "<pw:cpu threads>='never'", False),
    (META % "emulator='pinned'", "<pw:cpu emulator>='pinned'", False),
    (META % "exclusive='no' threads='never'", "<pw:cpu threads>='never'", False),
    (META % "exclusive='no' exclsive='yes'", "<pw:cpu exclsive>='yes'", False),
])
def test_invalid_pinwarden_metadata_that_may_ask_for_exclusive_cpus_says_so(
        body: str, needle: str, asked: bool) -> None:
    """The code BAD_METADATA (the libvirt hook refuses such a domain instead of running it
    shared) unless the element says exclusive='no' or asks nothing exclusive."""
    with pytest.raises(InputError) as info:
        parse_domain(_domain(body))
    assert needle in info.value.message and "\n" not in info.value.message
    assert info.value.code == (BAD_METADATA if asked else "bad-input")


@pytest.mark.parametrize(("xml", "needle"), [
    ("", "malformed"),
    ("<domain><name>x</name>", "malformed"),
    ("<domain><name>x</name></domian>", "malformed"),
    ("<vm><name>x</name></vm>", "expected <domain>"),
    ("<domain><name> </name></domain>", "<name> is missing"),
    ("<domain><name>a/b</name></domain>", "may not contain '/'"),
    (b"<domain><name>\xff</name></domain>", "not UTF-8"),
    # as the hook reads stdin ('surrogateescape'): a one-line error, not UnicodeEncodeError
    (b"<domain><name>\xff</name></domain>".decode("utf-8", "surrogateescape"), "not UTF-8"),
])
def test_malformed_documents(xml: str | bytes, needle: str) -> None:
    with pytest.raises(InputError, match=re.escape(needle)):
        parse_domain(xml)


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<domain><name>&lol9;</name></domain>
"""
XXE = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<domain><name>&xxe;</name></domain>
"""
EXTERNAL_DTD = """<?xml version="1.0"?>
<!DOCTYPE domain SYSTEM "http://attacker.invalid/evil.dtd">
<domain><name>x</name></domain>
"""
PARAMETER_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>
<domain><name>x</name></domain>
"""
HOSTILE = {"billion-laughs": BILLION_LAUGHS, "xxe": XXE, "external-dtd": EXTERNAL_DTD,
           "parameter-entity": PARAMETER_ENTITY}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_xml_is_refused(name: str) -> None:
    with pytest.raises(InputError, match="refused") as info:
        parse_domain(HOSTILE[name])
    assert "root:" not in info.value.message  # nothing from /etc/passwd leaks


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_render_refuses_hostile_xml(name: str) -> None:
    plan = Plan("x", None, False, {0: CpuSet.of([1])}, CpuSet.of([1]))
    with pytest.raises(InputError, match="refused"):
        render_plan(HOSTILE[name], plan)


def test_oversized_document_refused_before_parsing() -> None:
    filler = "<!--" + "x" * MAX_XML_BYTES + "-->"
    with pytest.raises(InputError, match="more than the"):
        parse_domain(f"<domain><name>big</name>{filler}</domain>")
    with pytest.raises(InputError, match="more than the"):
        parse_domain("<domain><name>é</name>" + "é" * (MAX_XML_BYTES // 2) + "</domain>")


def test_deep_nesting_within_the_cap_is_just_xml() -> None:
    depth = 50_000
    xml = "<domain><name>deep</name>" + "<a>" * depth + "</a>" * depth + "</domain>"
    assert parse_domain(xml).name == "deep"


# -- rendering --------------------------------------------------------------------------


def _plan(vcpus: dict[int, str], emulator: str, *, exclusive: bool,
          default: str | None = None, iothreads: dict[int, str] | None = None) -> Plan:
    return Plan("vm", None, exclusive, {k: CpuSet.parse(v) for k, v in vcpus.items()},
                CpuSet.parse(emulator),
                {k: CpuSet.parse(v) for k, v in (iothreads or {}).items()},
                default_cpus=CpuSet.parse(default) if default else None)


def test_render_seed_plan_is_identity() -> None:
    plan = _plan({0: "5", 1: "6"}, "4", exclusive=True, default="4-6")
    assert render_plan(SEED, plan) == SEED


def _strip_changed(xml: str, changed: tuple[str, ...]) -> list[str]:
    return [line for line in xml.splitlines() if not any(t in line for t in changed)]


def test_render_rich_keeps_everything_else_byte_for_byte() -> None:
    plan = _plan({0: "4", 1: "5", 2: "6", 3: "7"}, "8", exclusive=True, default="4-9",
                 iothreads={1: "8", 2: "9"})
    out = render_plan(RICH, plan, partition="/pinwarden/vm-db")
    # every original line survives, unchanged, except the <vcpu> line we edited
    kept = [line for line in RICH.splitlines() if "<vcpu " not in line]
    out_lines = out.splitlines()
    it = iter(out_lines)
    assert all(any(line == o for o in it) for line in kept), out  # order preserved too
    assert '<vcpu   current="2"  placement="static" cpuset="4-9">4</vcpu>' in out
    assert out.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<!-- managed by hand')
    assert "xmlns:libosinfo=" in out and "<qemu:arg value=" in out and "a&amp;b" in out
    spec = parse_domain(out)
    assert spec.vcpupins == plan.vcpus and spec.emulatorpin == plan.emulator
    assert spec.iothreadpins == plan.iothreads and spec.cpuset == plan.default_cpus
    assert spec.partition == "/pinwarden/vm-db"
    assert spec.exclusive and spec.threads == "isolate"  # metadata kept
    # new pins are indented like their siblings
    assert "\n    <vcpupin vcpu='0' cpuset='4'/>" in out


def test_render_shared_default_placement_only_sets_vcpu_cpuset() -> None:
    xml = "<domain type='kvm'>\n  <name>web</name>\n  <vcpu placement='auto'>2</vcpu>\n</domain>"
    plan = _plan({0: "2-3", 1: "2-3"}, "2-3", exclusive=False, default="2-3")
    out = render_plan(xml, plan)
    assert out == ("<domain type='kvm'>\n  <name>web</name>\n"
                   "  <vcpu placement='static' cpuset='2-3'>2</vcpu>\n</domain>")


def _defined_forms(inner: str, plan: Plan) -> list[tuple[str, str]]:
    """``(source, form)`` for the domain ``inner`` as written and in libvirt's own form
    (its test driver's): each rendered with ``plan`` and defined there (a libvirtError
    fails the test if refused), ``form`` the XML libvirt keeps of it."""
    import libvirt

    from libvirt_form import domain_xml, libvirt_form

    theirs = libvirt_form(inner, "pw-render-numad")
    assert theirs is not None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    out = []
    try:
        for source in (domain_xml(inner, "pw-render-numad"), theirs):
            dom = conn.defineXML(render_plan(source, plan))
            try:
                out.append((source, str(dom.XMLDesc())))
            finally:
                dom.undefine()
    finally:
        conn.close()
    return out


@pytest.mark.parametrize("memory", ["<memory mode='preferred'/>", "<memory/>",
                                    "<memory mode='strict' placement='auto'/>",
                                    "<memory mode='strict' nodeset='0'/>"])
def test_render_off_numad_keeps_the_memory_placement_libvirt_accepts(memory: str) -> None:
    """A <memory> with neither placement nor nodeset follows the vCPUs' placement: made
    static by the render, libvirt refused the document ("nodeset for NUMA memory tuning
    must be set if 'placement' is 'static'"; libvirt's own tests' numatune-auto-prefer).
    With no nodes planned for it, its memory stays numad's, as libvirt writes it out.
    libvirt takes the rendered XML, as written and from libvirt's own form, with the
    planned pins."""
    inner = f"<vcpu placement='auto'>2</vcpu><numatune>{memory}</numatune>"
    plan = _plan({0: "2", 1: "3"}, "2-3", exclusive=True, default="2-3")
    forms = _defined_forms(inner, plan)
    for _source, form in forms:
        assert parse_domain(form).vcpupins == plan.vcpus
        assert parse_domain(form).cpuset == CpuSet.parse("2-3")
    # the memory as asked: numad's, or the nodeset given
    assert ("nodeset='0'" if "nodeset" in memory else "placement='auto'") in forms[0][1]


@pytest.mark.parametrize(("inner", "memory"), [
    ("<vcpu placement='auto'>2</vcpu>", "<memory mode='strict' nodeset='0'/>"),
    ("<vcpu placement='auto'>2</vcpu><numatune><memory mode='preferred'/></numatune>",
     "<memory mode='preferred' nodeset='0'/>"),
    ("<vcpu placement='auto'>2</vcpu><numatune><memory mode='strict' placement='auto'/>"
     "</numatune>", "<memory mode='strict' nodeset='0'/>"),
    ("<vcpu placement='auto'>2</vcpu><numatune><memory mode='strict' nodeset='1'/>"
     "</numatune>", "<memory mode='strict' nodeset='1'/>"),
    ("<vcpu>2</vcpu><numatune><memory mode='interleave' placement='auto'/></numatune>",
     "<memory mode='interleave' nodeset='0'/>"),
], ids=["vcpu-auto", "mode-only", "memory-auto", "user-nodeset", "memory-auto-vcpus"])
def test_render_off_numad_puts_the_memory_on_the_nodes_of_the_cpus(inner: str,
                                                                   memory: str) -> None:
    """A domain numad was to place (<vcpu placement='auto'>, or a <memory placement='auto'>
    its vCPUs follow), placed statically by pinwarden: its memory goes to the NUMA nodes
    of its CPUs (``plan.memory_nodes``), its mode kept, as numad's one advice would place
    both.  Left numad's, libvirt queried numad at every start and failed without it
    ("Failed to query numad for the advisory nodeset"), which 'pinwarden define' did not
    foresee.  A nodeset the user gave stays.  libvirt (its test driver) takes the rendered
    XML, from the document as written and from libvirt's own form."""
    plan = replace(_plan({0: "2", 1: "3"}, "2-3", exclusive=True, default="2-3"),
                   memory_nodes=CpuSet.parse("0"))
    for _source, form in _defined_forms(inner, plan):
        got = parse_domain(form)
        assert got.vcpupins == plan.vcpus and got.placement == "static", form
        assert "placement='auto'" not in form and memory in form, form


def test_render_off_numad_when_every_thread_is_pinned() -> None:
    """A shared domain with <vcpu placement='auto'> and every thread pinned: nothing is
    placed by <vcpu>, so the render left placement='auto' alone, and libvirt asked numad
    all the same: 'pinwarden start' failed with "Failed to query numad for the advisory
    nodeset" (XML hunt).  Its placement is static now, its memory on its CPUs' nodes
    (test_policy: the plan has them); libvirt takes the rendered XML."""
    inner = ("<vcpu placement='auto'>2</vcpu><cputune><vcpupin vcpu='0' cpuset='2'/>"
             "<vcpupin vcpu='1' cpuset='3'/><emulatorpin cpuset='2-3'/></cputune>")
    plan = replace(_plan({0: "2", 1: "3"}, "2-3", exclusive=False),
                   memory_nodes=CpuSet.parse("0"))
    for _source, form in _defined_forms(inner, plan):
        got = parse_domain(form)
        assert got.vcpupins == plan.vcpus and got.placement == "static", form
        assert "placement='auto'" not in form, form
        assert "<memory mode='strict' nodeset='0'/>" in form, form


def test_render_creates_missing_elements() -> None:
    xml = "<domain>\n  <name>new</name>\n  <memory>1024</memory>\n</domain>\n"
    plan = _plan({0: "2", 1: "3"}, "2-3", exclusive=True, default="2-3")
    out = render_plan(xml, plan, partition="/machine")
    spec = parse_domain(out)
    assert spec.vcpus == 2 and spec.cpuset == CpuSet.parse("2-3")
    assert spec.vcpupins == plan.vcpus and spec.emulatorpin == plan.emulator
    assert spec.partition == "/machine"
    assert out.startswith("<domain>\n  <name>new</name>\n  <memory>1024</memory>\n"
                          "  <vcpu placement='static' cpuset='2-3'>2</vcpu>\n  <cputune>\n"
                          "    <vcpupin vcpu='0' cpuset='2'/>\n")


def test_render_replaces_partition_and_changed_pins_in_place() -> None:
    xml = ("<domain><name>p</name><vcpu cpuset=\"1\">1</vcpu>"
           "<cputune><vcpupin vcpu='0' cpuset='1'/></cputune>"
           "<resource><partition>/machine</partition><fibrechannel appid='x'/></resource>"
           "</domain>")
    plan = _plan({0: "3"}, "3", exclusive=True, default="3")
    out = render_plan(xml, plan, partition="/pinwarden/vm-p")
    assert "<vcpu cpuset=\"3\">1</vcpu>" in out
    assert "<vcpupin vcpu='0' cpuset='3'/>" in out
    assert "<partition>/pinwarden/vm-p</partition><fibrechannel appid='x'/>" in out
    spec = parse_domain(out)
    assert spec.emulatorpin == CpuSet.of([3])


def test_render_keeps_a_one_line_document_on_one_line() -> None:
    xml = "<domain type='kvm'><name>x</name><vcpu>2</vcpu></domain>"
    out = render_plan(xml, _plan({0: "2", 1: "3"}, "2", exclusive=True, default="2-3"),
                      partition="/pinwarden/vm-x")
    assert out == ("<domain type='kvm'><name>x</name><vcpu cpuset='2-3'>2</vcpu><cputune>"
                   "<vcpupin vcpu='0' cpuset='2'/><vcpupin vcpu='1' cpuset='3'/>"
                   "<emulatorpin cpuset='2'/></cputune><resource>"
                   "<partition>/pinwarden/vm-x</partition></resource></domain>")


def test_render_into_empty_cputune_and_resource() -> None:
    xml = "<domain><name>e</name><cputune/><resource/></domain>"
    plan = _plan({0: "1"}, "1", exclusive=True, default="1")
    spec = parse_domain(render_plan(xml, plan, partition="/m"))
    assert spec.vcpupins == {0: CpuSet.of([1])} and spec.partition == "/m"


def test_render_refuses_relative_partition() -> None:
    with pytest.raises(InputError, match="absolute path"):
        render_plan(SEED, _plan({0: "5", 1: "6"}, "4", exclusive=True), partition="vm")


cpu_lists = st.sets(st.integers(0, 63), min_size=1, max_size=6).map(CpuSet.of)


@settings(max_examples=150, deadline=None)
@given(vcpus=st.lists(cpu_lists, min_size=1, max_size=5), emulator=cpu_lists,
       exclusive=st.booleans(), source=st.sampled_from([SEED, RICH,
                                                         "<domain><name>z</name></domain>"]))
def test_render_then_parse_round_trips_the_plan(vcpus: list[CpuSet], emulator: CpuSet,
                                                exclusive: bool, source: str) -> None:
    spec0 = parse_domain(source)
    n = max(len(vcpus), spec0.vcpus) if source != RICH else 4
    pins = {i: vcpus[i % len(vcpus)] for i in range(n)}
    default = CpuSet.of([c for s in pins.values() for c in s]) | emulator
    plan = Plan("vm", None, exclusive, pins, emulator, default_cpus=default)
    spec = parse_domain(render_plan(source, plan))
    assert spec.cpuset == default
    for i, cpus in pins.items():
        assert spec.vcpupins.get(i, spec.cpuset) == cpus
    assert (spec.emulatorpin or spec.cpuset) == emulator


# -- faithful rendering (issue #10) ------------------------------------------------------------

HOST16 = None


def _host16() -> Any:
    """16 CPUs, 2-way SMT (siblings n, n+8), 2 nodes, isolcpus 2-7,10-15."""
    from pinwarden.partition import Host, Partition
    from pinwarden.topology import Cpu, Topology

    cpus = {c: Cpu(id=c, online=True, package=0, die=0, cluster=None, core=c % 8,
                   siblings=CpuSet.of([c % 8, c % 8 + 8]), node=(c % 8) // 4)
            for c in range(16)}
    every = CpuSet.range(0, 15)
    vm = CpuSet.parse("2-7,10-15")
    topo = Topology(cpus=cpus, present=every, online=every, isolated=vm, nohz_full=CpuSet(),
                    nodes={n: CpuSet.of(c for c in cpus if cpus[c].node == n) for n in (0, 1)})
    return Host(topo, Partition("isolcpus", vm, every - vm, "test"))


@settings(max_examples=200, deadline=None)
@given(vcpus=st.integers(1, 5), threads=st.sampled_from(["whole", "prefer", "isolate",
                                                          "require"]),
       emulator=st.sampled_from(["float", "isolate", "shared"]), iothreads=st.integers(0, 2),
       held=st.sets(st.integers(2, 15), max_size=4), exclusive=st.booleans(),
       kind=st.sampled_from(["kvm", "lxc"]))
def test_emitted_xml_plans_again_to_the_same_leases(vcpus: int, threads: str, emulator: str,
                                                    iothreads: int, held: set[int],
                                                    exclusive: bool, kind: str) -> None:
    """``plan --emit-xml`` is faithful: planning its output again gives the same leases and
    the same placement, whatever the thread and emulator policies.  An LXC container's
    too: its exclusive plan was rendered with pins, which pinwarden refuses for containers
    (libvirt ignores them), so 'pinwarden start' of one failed at the hook (hunt)."""
    from pinwarden.errors import Refusal
    from pinwarden.model import Lease, domain_holder
    from pinwarden.policy import decide

    host = _host16()
    other = domain_holder("qemu", "other", None)
    leases = [Lease(c, other, "vcpu0", 0.0) for c in held]
    xml = (f"<domain type='{kind}'><name>vm</name><vcpu>{vcpus}</vcpu>"
           f"<iothreads>{iothreads}</iothreads>"
           f"<metadata><pw:cpu xmlns:pw='{PW_NS}' exclusive='{'yes' if exclusive else 'no'}' "
           f"threads='{threads}' emulator='{emulator}'/></metadata></domain>")
    try:
        plan = decide(parse_domain(xml), host, leases)
    except Refusal:
        return
    emitted = render_plan(xml, plan, partition="/pinwarden/vm-vm")
    again = decide(parse_domain(emitted), host, leases)
    assert again.leases == plan.leases
    if kind == "lxc":
        assert "pin " not in emitted, emitted
    assert (again.vcpus, again.emulator, again.iothreads) == \
        (plan.vcpus, plan.emulator, plan.iothreads)


def test_the_partition_comes_first_in_resource() -> None:
    """libvirt's schema has <partition> before <fibrechannel> in <resource>: appended after
    it, 'virsh define --validate' refused what pinwarden rendered (corpus hunt)."""
    from pinwarden.libvirt.start import with_pinwarden_metadata

    for xml in ("<domain type='kvm'><name>f</name><vcpu>1</vcpu>\n  <resource>\n"
                "    <fibrechannel appid='userid'/>\n  </resource>\n</domain>",
                "<domain type='kvm'><name>f</name><vcpu>1</vcpu><resource>"
                "<fibrechannel appid='userid'/></resource></domain>"):
        plan = Plan("f", None, False, {0: CpuSet.parse("1")}, CpuSet.parse("1"),
                    default_cpus=CpuSet.parse("1"))
        out = render_plan(xml, plan, partition="/pinwarden-vm-f")
        assert out.index("<partition>/pinwarden-vm-f</partition>") < out.index("<fibrechannel"), \
            out
        assert parse_domain(out).partition == "/pinwarden-vm-f"
        stored = with_pinwarden_metadata(xml, parse_domain(xml), "u", "/pinwarden-vm-f")
        assert stored.index("<partition>") < stored.index("<fibrechannel"), stored
    indented = render_plan("<domain><name>f</name><vcpu>1</vcpu>\n  <resource>\n    "
                           "<fibrechannel appid='u'/>\n  </resource>\n</domain>",
                           Plan("f", None, False, {0: CpuSet.parse("1")}, CpuSet.parse("1"),
                                default_cpus=CpuSet.parse("1")), partition="/p")
    assert "  <resource>\n    <partition>/p</partition>\n    <fibrechannel appid='u'/>\n" \
        "  </resource>" in indented, indented


def test_elements_of_other_namespaces_are_never_edited() -> None:
    foreign = ("<domain><name>f</name><vcpu>2</vcpu>"
               "<x:vcpu xmlns:x='urn:other'>7</x:vcpu>"
               "<cputune xmlns='urn:other'><vcpupin vcpu='0' cpuset='9'/></cputune>"
               "<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/>"
               "</metadata></domain>")
    plan = Plan("f", None, True, {0: CpuSet.of([2]), 1: CpuSet.of([3])}, CpuSet.of([2, 3]),
                leases={2: "vcpu0", 3: "vcpu1"}, default_cpus=CpuSet.of([2, 3]))
    out = render_plan(foreign, plan)
    assert "<x:vcpu xmlns:x='urn:other'>7</x:vcpu>" in out
    assert "<cputune xmlns='urn:other'><vcpupin vcpu='0' cpuset='9'/></cputune>" in out
    spec = parse_domain(out)  # libvirt's own <cputune> was added beside the foreign one
    assert spec.vcpupins == {0: CpuSet.of([2]), 1: CpuSet.of([3])}
    assert spec.cpuset == CpuSet.of([2, 3])


def test_other_tools_metadata_keeps_its_prefixes_when_pinwarden_adds_its_own() -> None:
    """``pinwarden define`` of a domain carrying Nova's metadata stored it as
    ``<ns0:instance xmlns:ns0=…>`` (ElementTree's own prefixes): equal XML, but what reads
    the stored document by prefix no longer found it (hunt)."""
    from pinwarden.libvirt.start import with_pinwarden_metadata

    nova = "http://openstack.org/xmlns/libvirt/nova/1.1"
    xml = (f"<domain type='kvm'><name>f</name><vcpu>1</vcpu><metadata>"
           f"<nova:instance xmlns:nova='{nova}'><nova:name>f</nova:name>"
           f"<nova:owner><nova:user uuid='u'>admin</nova:user></nova:owner></nova:instance>"
           f"<app xmlns='urn:app'><ns1:x xmlns:ns1='urn:x'/></app>"
           f"</metadata></domain>")
    stored = with_pinwarden_metadata(xml, parse_domain(xml),
                                     "11111111-2222-3333-4444-555555555555", None)
    # (ElementTree declares every prefix on the root; libvirt puts each on its element)
    assert f'xmlns:nova="{nova}"' in stored and "ns0" not in stored, stored
    assert "<nova:instance><nova:name>f</nova:name>" in stored, stored
    assert '<nova:user uuid="u">admin</nova:user>' in stored, stored
    assert '<pw:cpu exclusive="no"' in stored, stored
    # a default namespace and ElementTree's own nsN form are written as before, unchanged
    # in meaning
    again = defusedxml.ElementTree.fromstring(stored).find("metadata")
    assert again is not None and again.find("{urn:app}app/{urn:x}x") is not None, stored
    assert parse_domain(stored).exclusive is False


@pytest.mark.parametrize("namespace", ["urn:pinwarden:domain", "urn:pinwarden:domain:2",
                                       "URN:PINWARDEN:domain:1"])
def test_a_near_miss_pinwarden_namespace_is_refused(namespace: str) -> None:
    with pytest.raises(InputError, match="not pinwarden's 'urn:pinwarden:domain:1'"):
        parse_domain(f"<domain><name>n</name><metadata><pw:cpu xmlns:pw='{namespace}' "
                     f"exclusive='yes'/></metadata></domain>")


@pytest.mark.parametrize("namespace", ["urn:pinwarden-ui:1", "urn:pinwarden.example:x",
                                       "urn:pinwardenish"])
def test_another_tools_namespace_that_starts_like_pinwardens_is_its_own(
        namespace: str) -> None:
    """Metadata of another tool whose namespace only starts with ``urn:pinwarden``: a
    shared VM carrying it was refused as a near miss of pinwarden's (hunt)."""
    spec = parse_domain(f"<domain><name>n</name><metadata><ui:x xmlns:ui='{namespace}' "
                        f"a='b'/></metadata></domain>")
    assert not spec.exclusive


def test_hostile_sizes_stay_linear() -> None:
    """8,192 iothread pins: planning time grows linearly (a quadratic check took 1.5 s).
    The ratio of two sizes, measured side by side, says it: ×8 work may take ~×8 time,
    never ~×64.  CPU time of this thread, best of five: other processes busy on the same
    CPUs (the test session's VM guests run meanwhile) slow the wall clock, not the work.
    The garbage collector is off while it is timed (collected before): a full collection
    walks every object the test session holds, a cost of the session, not of planning."""
    import gc
    import time

    from pinwarden.policy import decide

    host = _host16()

    def seconds(n: int) -> float:
        pins = "".join(f"<iothreadpin iothread='{i}' cpuset='2'/>" for i in range(1, n + 1))
        spec = parse_domain(f"<domain><name>h</name><vcpu>1</vcpu><iothreads>{n}</iothreads>"
                            f"<cputune>{pins}</cputune></domain>")
        best = float("inf")
        for _ in range(5):
            gc.collect()
            gc.disable()
            try:
                start = time.thread_time()
                decide(spec, host, [])
                best = min(best, time.thread_time() - start)
            finally:
                gc.enable()
        return best

    small, big = seconds(1024), seconds(8192)
    assert big / small < 16, (small, big)  # linear: ~8; the quadratic check: ~30


# -- against the real libvirt parser ---------------------------------------------------------


@pytest.mark.libvirt
def test_libvirt_accepts_rendered_xml_and_keeps_pins_and_metadata(domains: Any) -> None:
    """libvirtd (qemu:///system) parses what render_plan writes; on define it drops the
    RFC's cputune exclusive attribute but keeps pinwarden's metadata, so the metadata form
    is what survives ``virsh define``/``dumpxml``."""
    import libvirt_env

    name = domains.track("pwtest-domain-render")
    source = libvirt_env.tiny_domain_xml(name, vcpus=2, exclusive=True)
    source = source.replace("<os>", "<!-- user comment --><cputune exclusive='yes'>"
                            "<shares>512</shares></cputune><os>")
    plan = _plan({0: "0", 1: "1"}, "0", exclusive=True, default="0-1")
    rendered = render_plan(source, plan)
    assert "<!-- user comment -->" in rendered and "<shares>512</shares>" in rendered
    domains.conn.defineXML(rendered)
    dumped = domains.conn.lookupByName(name).XMLDesc(0)
    spec = parse_domain(dumped)
    assert spec.vcpupins == plan.vcpus and spec.emulatorpin == plan.emulator
    assert spec.cpuset == plan.default_cpus
    assert spec.exclusive  # from the metadata
    assert "exclusive=" not in dumped.split("<cputune", 1)[1].split(">", 1)[0]
    # rendering a new plan into libvirt's own output and redefining works too
    again = render_plan(dumped, _plan({0: "1", 1: "1"}, "1", exclusive=True, default="1"))
    domains.conn.defineXML(again)
    spec = parse_domain(domains.conn.lookupByName(name).XMLDesc(0))
    assert spec.vcpupins == {0: CpuSet.of([1]), 1: CpuSet.of([1])}
    assert spec.emulatorpin == CpuSet.of([1]) and "<shares>512</shares>" in again


@pytest.mark.parametrize(("count", "ids"), [(4, (1, 5)), (1, (3, 7)), (3, (2,)), (3, (3, 1))])
def test_iothread_ids_match_libvirts(count: int, ids: tuple[int, ...]) -> None:
    """The I/O thread ids pinwarden plans for are the ones libvirt gives the domain (its
    test driver, no daemon): the <iothreadids> given, filled with the lowest free ids."""
    import re

    from libvirt_form import domain_xml, libvirt_form

    listed = "".join(f"<iothread id='{i}'/>" for i in ids)
    inner = f"<vcpu>1</vcpu><iothreads>{count}</iothreads><iothreadids>{listed}</iothreadids>"
    xml = domain_xml(inner, "pw-iothread-oracle")
    form = libvirt_form(inner, "pw-iothread-oracle")
    assert form is not None
    theirs = sorted(int(i) for i in re.findall(r"<iothread id='(\d+)'", form))
    assert list(parse_domain(xml).iothread_id_set) == theirs


@pytest.mark.parametrize("inner", [
    "<vcpu placement='auto' cpuset='2-3'>2</vcpu>",
    "<vcpu>2</vcpu><numatune><memory mode='strict' placement='auto'/></numatune>",
    "<vcpu placement='static'>2</vcpu>"
    "<numatune><memory mode='strict' placement='auto' nodeset='0'/></numatune>",
    "<vcpu cpuset='1'>2</vcpu><numatune><memory placement='auto'/></numatune>",
    "<vcpu>2</vcpu><cputune><vcpupin vcpu='0' cpuset='1'/></cputune>"
    "<numatune><memory placement='auto'/></numatune>",
    "<vcpu>2</vcpu><cputune><emulatorpin cpuset='1'/></cputune>"
    "<numatune><memory placement='auto'/></numatune>",
    "<vcpu>2</vcpu><numatune><memory mode='strict' nodeset='0'/></numatune>",
    "<vcpu cpuset='^1,0-2'>2</vcpu><iothreads>3</iothreads>"
    "<iothreadids><iothread id='4'/></iothreadids>",
])
def test_placement_is_read_as_libvirt_reads_it(inner: str) -> None:
    """What pinwarden reads from a domain XML equals what it reads from the XML libvirt
    makes of it (its test driver, no daemon; libvirt's own form is what the hook gets):
    numad placement drops the cpuset and nodeset, and turns on for the vCPUs when a
    memory placement='auto' meets an XML that pins nothing."""
    from libvirt_form import domain_xml, libvirt_form

    xml = domain_xml(inner, "pw-placement-oracle")
    form = libvirt_form(inner, "pw-placement-oracle")
    assert form is not None
    theirs = parse_domain(form)
    ours = parse_domain(xml)
    assert (ours.placement == "auto", ours.cpuset, ours.numa_nodeset, ours.vcpupins,
            ours.emulatorpin, ours.iothread_id_set) == \
        (theirs.placement == "auto", theirs.cpuset, theirs.numa_nodeset, theirs.vcpupins,
         theirs.emulatorpin, theirs.iothread_id_set)


def test_guest_cells_are_read_in_libvirts_order() -> None:
    """Cells written out of order (libvirt's own tests' cpu-numa-disordered) are kept by
    id, as libvirt keeps and writes them: the placement works through them in that order,
    so ``plan FILE`` and the hook (which gets libvirt's form) place the vCPUs alike."""
    from libvirt_form import domain_xml, libvirt_form

    inner = ("<vcpu>4</vcpu><cpu><numa><cell id='1' cpus='2-3' memory='512'/>"
             "<cell id='0' cpus='0-1' memory='512'/></numa></cpu>")
    form = libvirt_form(inner, "pw-cell-order")
    assert form is not None
    ours, theirs = parse_domain(domain_xml(inner, "pw-cell-order")), parse_domain(form)
    assert [c.id for c in ours.guest_cells] == [0, 1]
    assert ours.guest_cells == theirs.guest_cells


_CELLS = ("<cpu><numa><cell id='0' cpus='0' memory='512'/><cell id='1' cpus='1' "
          "memory='512'/></numa></cpu>")


@pytest.mark.parametrize("memnodes", [
    "<memnode cellid='1' mode='preferred' nodeset='0'/>",
    "<memnode cellid='0' mode='restrictive' nodeset='0-1'/><memnode cellid='1' nodeset='1'/>",
    "<memnode cellid='2' nodeset='0'/>",  # no such cell
    "<memnode cellid='0' nodeset='0'/><memnode cellid='0' nodeset='1'/>",
    "<memnode cellid='0' mode='sticky' nodeset='0'/>",
    "<memnode cellid='0'/>",
])
def test_memnodes_are_read_as_libvirt_reads_them(memnodes: str) -> None:
    """pinwarden refuses the <memnode>s libvirt refuses (its test driver, no daemon) and
    reads the same cells' nodes from the rest, in the XML as written and in libvirt's."""
    from libvirt_form import domain_xml, libvirt_form

    inner = f"<vcpu>2</vcpu><numatune>{memnodes}</numatune>{_CELLS}"
    form = libvirt_form(inner, "pw-memnode-oracle")
    try:
        ours = parse_domain(domain_xml(inner, "pw-memnode-oracle")).memnodes
    except InputError:
        assert form is None
        return
    assert form is not None and ours and parse_domain(form).memnodes == ours


@pytest.mark.parametrize("name", ["web ", " web", "my vm"])
def test_a_name_is_kept_exactly_as_libvirt_keeps_it(name: str) -> None:
    """libvirt keeps a name's surrounding spaces ('virsh list' shows 'web '): stripped,
    'pinwarden define' stored the partition of 'web' and the hook, given libvirt's name,
    refused the domain's every start (hunt)."""
    spec = parse_domain(f"<domain><name>{name}</name><metadata><pw:cpu "
                        f"xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/></metadata>"
                        f"</domain>")
    assert spec.name == name
    for empty in ("", "  "):
        with pytest.raises(InputError, match="<name> is missing or empty"):
            parse_domain(f"<domain><name>{empty}</name></domain>")


def test_metadata_nested_too_deeply_for_libvirt_is_an_input_error() -> None:
    """5,000 nested elements of another tool's metadata: 'pinwarden define' exited 70
    ("internal error: RecursionError": ElementTree writes a level a call) where libvirt
    refuses its own "Excessive depth" (XML hunt).  One line, exit 1."""
    from pinwarden.libvirt.start import with_pinwarden_metadata

    deep = "<a:x xmlns:a='urn:a'>" * 5000 + "</a:x>" * 5000
    xml = f"<domain type='kvm'><name>deep</name><vcpu>1</vcpu><metadata>{deep}</metadata>" \
        "</domain>"
    with pytest.raises(InputError, match="nests elements too deeply"):
        with_pinwarden_metadata(xml, parse_domain(xml), "u", None)
