"""libvirt domain XML ↔ the CPU-relevant request (:class:`DomainSpec`) and plan rendering.

Parsing is safe: no external entities, no DTDs, no entity expansion (defusedxml), and
documents larger than :data:`MAX_XML_BYTES` are refused before any parsing.

Rendering (:func:`render_plan`) edits the document *textually*: the elements it changes are
located by byte offset with expat and spliced, so comments, attribute order, quoting,
namespace prefixes, the XML declaration and every element pinwarden does not own come out
exactly as the user wrote them.
"""

from __future__ import annotations

import re
import xml.parsers.expat
from collections.abc import Mapping
from typing import Literal, NoReturn
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from pinwarden.cpuset import CpuSet, CpuSetError
from pinwarden.errors import InputError, shorten
from pinwarden.model import Plan
from pinwarden.record import field, record

PW_NS = "urn:pinwarden:domain:1"
#: Namespaces that look like pinwarden's but are not it (a typo or another version):
#: refused, so that a near miss never silently makes an exclusive domain shared.  Another
#: tool's namespace that merely starts so (``urn:pinwarden-ui:1``) is not one: it blocked
#: that tool's shared VMs (real-libvirt hunt).
_PW_NS_LIKE = re.compile(r"urn:pinwarden(?::.*)?", re.I)
#: Error code of invalid pinwarden metadata that does not say exclusive='no': the domain
#: may have asked for exclusive CPUs (the libvirt hook refuses it instead of running it
#: shared).
BAD_METADATA = "bad-metadata"

#: Largest domain XML accepted (libvirt's own domain documents are a few KiB).
MAX_XML_BYTES = 1 << 20

#: Largest vCPU / iothread count accepted (QEMU's limit is far lower).
MAX_VCPUS = 8192

#: SMT thread policies of exclusive holders.  ``whole`` (the default): whole physical cores,
#: never shared with another holder, an odd count holds the spare sibling empty.  Nova's
#: ``prefer`` (may share a core with another holder: an explicit opt-in), ``isolate`` (one
#: thread per core, the siblings held empty) and ``require`` (SMT siblings only).
ThreadPolicy = Literal["whole", "prefer", "isolate", "require"]
EmulatorPolicy = Literal["float", "isolate", "shared"]
DEFAULT_THREADS: ThreadPolicy = "whole"

_THREAD_POLICIES: tuple[ThreadPolicy, ...] = ("whole", "prefer", "isolate", "require")
_EMULATOR_POLICIES: tuple[EmulatorPolicy, ...] = ("float", "isolate", "shared")


@record
class GuestCell:
    """``<cpu><numa><cell id cpus memory/>``."""

    id: int
    cpus: CpuSet  # guest vCPU numbers
    memory_kib: int


@record
class DomainSpec:
    """What placement needs of one libvirt domain's XML."""

    name: str
    uuid: str | None
    vcpus: int  # <vcpu> maximum
    current: int | None = None  # <vcpu current=...>
    placement: str | None = None  # <vcpu placement=static|auto>
    cpuset: CpuSet | None = None  # <vcpu cpuset=...>
    vcpupins: Mapping[int, CpuSet] = field(default_factory=dict)
    emulatorpin: CpuSet | None = None
    iothreads: int = 0  # <iothreads>N</iothreads>
    iothreadpins: Mapping[int, CpuSet] = field(default_factory=dict)
    exclusive: bool = False  # <cputune exclusive='yes'> or <pw:cpu exclusive="yes"/>
    threads: ThreadPolicy = DEFAULT_THREADS
    emulator: EmulatorPolicy = "float"
    numa_mode: str | None = None  # <numatune><memory mode=...>
    numa_nodeset: CpuSet | None = None  # host NUMA nodes from <numatune><memory nodeset>
    guest_cells: tuple[GuestCell, ...] = ()
    # <numatune><memnode cellid nodeset>: guest cell -> the host nodes of its memory
    memnodes: Mapping[int, CpuSet] = field(default_factory=dict)
    partition: str | None = None  # <resource><partition>
    # additive: explicit <iothreadids><iothread id=N/> (libvirt fills up to iothreads)
    iothread_ids: tuple[int, ...] = ()
    domain_type: str | None = None  # <domain type=kvm|qemu|lxc|...>

    @property
    def has_affinity(self) -> bool:
        """True when the XML says anything about where threads may run."""
        return bool(self.cpuset is not None or self.vcpupins or self.emulatorpin is not None
                    or self.iothreadpins)

    @property
    def iothread_id_set(self) -> tuple[int, ...]:
        """The domain's iothread ids, sorted, as libvirt numbers them: the ``<iothreadids>``
        given, then the lowest free ids until there are ``<iothreads>``
        (``<iothreads>4</iothreads>`` with ids 1 and 5 is 1, 2, 3, 5)."""
        ids = set(self.iothread_ids)
        ident = 1
        while len(ids) < self.iothreads:
            if ident not in ids:
                ids.add(ident)
            ident += 1
        return tuple(sorted(ids))


# -- safe loading --------------------------------------------------------------------------


def _as_text(xml: str | bytes) -> str:
    """The document as ``str``, refusing oversized or non-UTF-8 input."""
    if len(xml) > MAX_XML_BYTES:
        raise InputError(f"domain XML is {len(xml)} bytes, more than the "
                         f"{MAX_XML_BYTES} accepted")
    if isinstance(xml, bytes | bytearray):
        try:
            text = bytes(xml).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InputError(f"domain XML is not UTF-8 (byte {exc.start})") from None
    else:
        text = xml.removeprefix("\ufeff")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # bytes read with 'surrogateescape' (stdin, hook)
        raise InputError(f"domain XML is not UTF-8 (character {exc.start})") from None
    if size > MAX_XML_BYTES:
        raise InputError(f"domain XML is more than the {MAX_XML_BYTES} bytes accepted")
    return text


def _load(text: str) -> Element:
    try:
        root = SafeET.fromstring(text, forbid_dtd=True, forbid_entities=True,
                                 forbid_external=True)
    except DefusedXmlException as exc:
        kind = type(exc).__name__
        what = {"DTDForbidden": "a DTD (<!DOCTYPE>)",
                "EntitiesForbidden": "an entity declaration",
                "ExternalReferenceForbidden": "an external reference"}.get(kind, kind)
        raise InputError(f"domain XML refused: it contains {what}, which pinwarden never "
                         "accepts (libvirt domain XML has none)") from None
    except SafeET.ParseError as exc:
        raise InputError(f"malformed domain XML: {exc}") from None
    return root


# -- value parsing -------------------------------------------------------------------------


def _bad(where: str, value: str, why: str) -> NoReturn:
    raise InputError(f"{where}={shorten(value)}: {why}")


def _int(where: str, value: str | None, *, minimum: int = 0, maximum: int = MAX_VCPUS,
         required: bool = True) -> int:
    if value is None:
        if required:
            raise InputError(f"{where} is missing")
        return minimum
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        _bad(where, value, "not a non-negative integer")
    digits = text.lstrip("0") or "0"
    bounds = f"must be at most {maximum}" if minimum == 0 else \
        f"must be between {minimum} and {maximum}"
    if len(digits) > len(str(maximum)):  # also keeps int() off hostile digit runs
        _bad(where, value, bounds)
    number = int(digits)
    if not minimum <= number <= maximum:
        _bad(where, value, bounds)
    return number


def _cpus(where: str, value: str | None) -> CpuSet:
    if value is None:
        raise InputError(f"{where} is missing")
    try:
        return CpuSet.parse(value)
    except CpuSetError as exc:
        raise InputError(f"{where}={shorten(value)}: {exc.message}",
                         code=exc.code) from None  # (bad-cpuset, as README's table says)


def _yes_no(where: str, value: str) -> bool:
    if value in ("yes", "no"):
        return value == "yes"
    _bad(where, value, "must be 'yes' or 'no'")


_UUID_HEX = re.compile(r"[0-9a-fA-F]")


def _uuid(value: str) -> str:
    """Canonical lowercase form; libvirt accepts hex pairs with optional '-' separators."""
    text = value.strip()
    digits = text.replace("-", "")
    if len(digits) != 32 or not all(_UUID_HEX.fullmatch(c) for c in digits):
        _bad("<uuid>", value, "not a UUID (32 hex digits)")
    hexa = digits.lower()  # str(uuid.UUID(hex=digits)), without loading uuid (and platform)
    return f"{hexa[:8]}-{hexa[8:12]}-{hexa[12:16]}-{hexa[16:20]}-{hexa[20:]}"


_SCALE = {"": 1024, "b": 1, "byte": 1, "bytes": 1}


def _memory_kib(where: str, value: str | None, unit: str | None) -> int:
    amount = _int(where, value, maximum=1 << 62)
    suffix = (unit or "KiB").strip()
    low = suffix.lower()
    if low in ("b", "byte", "bytes"):
        factor = 1
    else:
        powers = "kmgtpe"
        if not low or low[0] not in powers or low[1:] not in ("", "ib", "b"):
            _bad(f"{where} unit", suffix, "unknown unit (use KiB, MiB, GiB, ...)")
        base = 1000 if low[1:] == "b" else 1024
        factor = base ** (powers.index(low[0]) + 1)
    return (amount * factor) // 1024


def _only(parent: Element, tag: str, where: str) -> Element | None:
    found = parent.findall(tag)
    if len(found) > 1:
        raise InputError(f"{where}: more than one <{tag}> element")
    return found[0] if found else None


# -- parse_domain --------------------------------------------------------------------------


def _pw_metadata(metadata: Element | None, exclusive: bool | None,
                 ) -> tuple[bool | None, ThreadPolicy, EmulatorPolicy]:
    """(exclusive, threads, emulator) from pinwarden's ``<metadata>`` element, given
    ``<cputune exclusive>`` (None: absent).  An error that leaves open whether the domain
    asks for exclusive CPUs has the code :data:`BAD_METADATA`."""
    threads: ThreadPolicy = DEFAULT_THREADS
    emulator: EmulatorPolicy = "float"
    if metadata is not None:
        for child in metadata:
            namespace = child.tag[1:].partition("}")[0] if child.tag.startswith("{") else ""
            if namespace != PW_NS and _PW_NS_LIKE.fullmatch(namespace):
                raise InputError(
                    f"<metadata> element {shorten(child.tag)} is in namespace "
                    f"{shorten(namespace)}, not pinwarden's {PW_NS!r}: pinwarden would "
                    f"ignore it (an exclusive domain would run shared); use {PW_NS!r}",
                    code=BAD_METADATA)
            if namespace == PW_NS and child.tag != f"{{{PW_NS}}}cpu":
                # a misspelt <pw:cpus>, <pw:CPU>: ignored, an exclusive domain ran shared
                local = child.tag.partition("}")[2]
                named = f"<{local}>" if len(local) < 40 and local.isprintable() \
                    else shorten(local)
                raise InputError(
                    f"<metadata> element {named} "
                    f"in pinwarden's namespace {PW_NS!r} is not one pinwarden knows: it "
                    f"would be ignored (an exclusive domain would run shared); the element "
                    f"is <cpu>",
                    code=None if child.get("exclusive") == "no" else BAD_METADATA)
    pw = metadata.findall(f"{{{PW_NS}}}cpu") if metadata is not None else []
    if len(pw) > 1:
        raise InputError("<metadata>: more than one pinwarden <cpu> element",
                         code=BAD_METADATA)
    if not pw:
        return exclusive, threads, emulator
    meta = pw[0]
    says = meta.get("exclusive")

    def bad(attr: str, why: str, *, asked: bool) -> NoReturn:
        raise InputError(f"<pw:cpu {attr}>={shorten(meta.get(attr, ''))}: {why}",
                         code=BAD_METADATA if asked else None)

    unknown = sorted(set(meta.keys()) - {"exclusive", "threads", "emulator"})
    if unknown:  # a misspelt 'exclusive', maybe
        bad(unknown[0], "unknown attribute (exclusive, threads, emulator are understood)",
            asked=says != "no")
    if says is not None:
        if says not in ("yes", "no"):
            bad("exclusive", "must be 'yes' or 'no'", asked=True)
        if exclusive is not None and exclusive != (says == "yes"):
            raise InputError(
                f"<cputune exclusive={'yes' if exclusive else 'no'!r}> contradicts "
                f"<pw:cpu exclusive={says!r}>: make them agree", code=BAD_METADATA)
        exclusive = says == "yes"
    value = meta.get("threads")
    if value is not None:
        if value not in _THREAD_POLICIES:
            bad("threads", "must be whole, prefer, isolate or require", asked=bool(exclusive))
        threads = value
    value = meta.get("emulator")
    if value is not None:
        if value not in _EMULATOR_POLICIES:
            bad("emulator", "must be float, isolate or shared", asked=bool(exclusive))
        emulator = value
    return exclusive, threads, emulator


def parse_domain(xml: str | bytes, *, unclear_as_exclusive: bool = False) -> DomainSpec:
    """Parse the CPU-relevant parts of a libvirt domain XML document.
    ``unclear_as_exclusive``: pinwarden metadata that leaves open whether the domain asks
    for exclusive CPUs (an error of code :data:`BAD_METADATA`) reads as asking for them,
    with the default policies (what frees a domain's leases needs its identity only)."""
    root = _load(_as_text(xml))
    if root.tag != "domain":
        raise InputError(f"root element is <{root.tag}>, expected <domain>")
    domain_type = root.get("type")

    name_el = _only(root, "name", "<domain>")
    # exactly as libvirt keeps it: stripped, 'pinwarden define' stored the partition of
    # 'web' for a domain libvirt calls 'web ', which the hook then refused for good (hunt)
    name = (name_el.text or "") if name_el is not None else ""
    if not name.strip():
        raise InputError("<name> is missing or empty")
    if "/" in name or "\n" in name:
        _bad("<name>", name, "a domain name may not contain '/' or newlines")

    uuid_el = _only(root, "uuid", "<domain>")
    uuid = _uuid(uuid_el.text or "") if uuid_el is not None else None

    vcpu_el = _only(root, "vcpu", "<domain>")
    vcpus, current, placement, cpuset = 1, None, None, None  # libvirt: no <vcpu> → 1 vCPU
    if vcpu_el is not None:
        vcpus = _int("<vcpu>", vcpu_el.text or "")
        current_text = vcpu_el.get("current")
        if current_text is not None:
            current = _int("<vcpu current>", current_text, minimum=1, maximum=max(vcpus, 1))
            if current > vcpus:
                _bad("<vcpu current>", current_text, f"more than the {vcpus} vCPUs")
        placement = vcpu_el.get("placement")
        if placement is not None and placement not in ("static", "auto"):
            _bad("<vcpu placement>", placement, "must be 'static' or 'auto'")
        if vcpu_el.get("cpuset") is not None and placement != "auto":
            # libvirt ignores the cpuset of placement='auto' (numad chooses)
            cpuset = _cpus("<vcpu cpuset>", vcpu_el.get("cpuset"))

    vcpupins: dict[int, CpuSet] = {}
    iothreadpins: dict[int, CpuSet] = {}
    emulatorpin: CpuSet | None = None
    exclusive: bool | None = None
    tune = _only(root, "cputune", "<domain>")
    if tune is not None:
        if tune.get("exclusive") is not None:
            exclusive = _yes_no("<cputune exclusive>", tune.get("exclusive", ""))
        for pin in tune.findall("vcpupin"):
            vcpu = _int("<vcpupin vcpu>", pin.get("vcpu"), maximum=MAX_VCPUS - 1)
            if vcpu in vcpupins:
                _bad("<vcpupin vcpu>", str(vcpu), "vCPU pinned twice")
            vcpupins[vcpu] = _cpus(f"<vcpupin vcpu='{vcpu}' cpuset>", pin.get("cpuset"))
        emu = _only(tune, "emulatorpin", "<cputune>")
        if emu is not None:
            emulatorpin = _cpus("<emulatorpin cpuset>", emu.get("cpuset"))
        for pin in tune.findall("iothreadpin"):
            ident = _int("<iothreadpin iothread>", pin.get("iothread"), minimum=1,
                         maximum=MAX_VCPUS)
            if ident in iothreadpins:
                _bad("<iothreadpin iothread>", str(ident), "iothread pinned twice")
            iothreadpins[ident] = _cpus(f"<iothreadpin iothread='{ident}' cpuset>",
                                        pin.get("cpuset"))

    iothreads = 0
    io_el = _only(root, "iothreads", "<domain>")
    if io_el is not None:
        iothreads = _int("<iothreads>", io_el.text or "")
    ids: list[int] = []
    ids_el = _only(root, "iothreadids", "<domain>")
    if ids_el is not None:
        for thread in ids_el.findall("iothread"):
            ident = _int("<iothreadids><iothread id>", thread.get("id"), minimum=1,
                         maximum=MAX_VCPUS)
            if ident in ids:
                _bad("<iothreadids><iothread id>", str(ident), "duplicate iothread id")
            ids.append(ident)
        iothreads = max(iothreads, len(ids))

    numa_mode: str | None = None
    nodeset: CpuSet | None = None
    memnode_els: list[Element] = []
    numatune = _only(root, "numatune", "<domain>")
    if numatune is not None:
        memnode_els = numatune.findall("memnode")
        memory = _only(numatune, "memory", "<numatune>")
        if memory is not None:
            numa_mode = memory.get("mode", "strict")
            if numa_mode not in ("strict", "preferred", "interleave", "restrictive"):
                _bad("<numatune><memory mode>", numa_mode,
                     "must be strict, preferred, interleave or restrictive")
            if memory.get("placement") == "auto":
                # libvirt drops the nodeset (numad chooses) and, when the XML pins nothing,
                # places the vCPUs by numad too
                if cpuset is None and not vcpupins and emulatorpin is None \
                        and not iothreadpins:
                    placement = "auto"
            elif memory.get("nodeset") is not None:
                nodeset = _cpus("<numatune><memory nodeset>", memory.get("nodeset"))

    cells: list[GuestCell] = []
    cpu_el = _only(root, "cpu", "<domain>")
    numa_el = _only(cpu_el, "numa", "<cpu>") if cpu_el is not None else None
    if numa_el is not None:
        for index, cell in enumerate(numa_el.findall("cell")):
            ident = _int("<cell id>", cell.get("id", str(index)), maximum=MAX_VCPUS)
            cell_cpus = (_cpus(f"<cell id='{ident}' cpus>", cell.get("cpus"))
                         if cell.get("cpus") is not None else CpuSet())
            beyond = [c for c in cell_cpus if c >= vcpus]
            if beyond:
                _bad(f"<cell id='{ident}' cpus>", cell.get("cpus", ""),
                     f"vCPU {beyond[0]} does not exist (the domain has {vcpus})")
            cells.append(GuestCell(ident, cell_cpus,
                                   _memory_kib(f"<cell id='{ident}' memory>",
                                               cell.get("memory"), cell.get("unit"))))

    memnodes: dict[int, CpuSet] = {}
    cell_ids = {cell.id for cell in cells}
    for memnode in memnode_els:
        ident = _int("<numatune><memnode cellid>", memnode.get("cellid"), maximum=MAX_VCPUS)
        if ident not in cell_ids:
            _bad("<numatune><memnode cellid>", str(ident), "names no guest NUMA cell "
                 "(<cpu><numa><cell id>)")
        if ident in memnodes:
            _bad("<numatune><memnode cellid>", str(ident), "duplicate cellid")
        mode = memnode.get("mode", "strict")
        if mode not in ("strict", "preferred", "interleave", "restrictive"):
            _bad("<numatune><memnode mode>", mode,
                 "must be strict, preferred, interleave or restrictive")
        memnodes[ident] = _cpus(f"<numatune><memnode cellid='{ident}' nodeset>",
                                memnode.get("nodeset"))

    partition: str | None = None
    resource = _only(root, "resource", "<domain>")
    part_el = _only(resource, "partition", "<resource>") if resource is not None else None
    if part_el is not None:
        partition = (part_el.text or "").strip()
        if not partition.startswith("/") or "//" in partition or "\n" in partition:
            _bad("<resource><partition>", partition, "must be an absolute path like /machine")

    metadata = _only(root, "metadata", "<domain>")
    try:
        exclusive, threads, emulator = _pw_metadata(metadata, exclusive)
    except InputError as exc:
        if not unclear_as_exclusive or exc.code != BAD_METADATA:
            raise
        exclusive, threads, emulator = True, DEFAULT_THREADS, "float"

    return DomainSpec(
        name=name, uuid=uuid, vcpus=vcpus, current=current, placement=placement,
        cpuset=cpuset, vcpupins=vcpupins, emulatorpin=emulatorpin, iothreads=iothreads,
        iothreadpins=iothreadpins, exclusive=bool(exclusive), threads=threads,
        emulator=emulator, numa_mode=numa_mode, numa_nodeset=nodeset,
        # by id, as libvirt keeps and writes them: the placement works through the cells
        # in this order, and the hook gets libvirt's form
        guest_cells=tuple(sorted(cells, key=lambda cell: cell.id)), memnodes=memnodes,
        partition=partition,
        iothread_ids=tuple(ids),
        domain_type=domain_type)


# -- rendering -----------------------------------------------------------------------------


class _Node:
    """An element located in the document by byte offsets (UTF-8).  ``tag`` is the local
    name, ``ns`` its namespace URI ("" for libvirt's own, un-namespaced elements).  (A plain
    class: defining a record costs every command a compile at import.)"""

    __slots__ = ("attrs", "children", "end", "head_end", "ns", "start", "tag", "tail_start")

    def __init__(self, tag: str, ns: str, attrs: dict[str, str], start: int) -> None:
        self.tag = tag
        self.ns = ns
        self.attrs = attrs
        self.start = start  # offset of '<'
        self.head_end = 0  # offset just past the start tag's '>'
        self.tail_start = 0  # offset of the end tag's '<' (== head_end for <x/>)
        self.end = 0  # offset just past the element
        self.children: list[_Node] = []

    @property
    def empty(self) -> bool:
        return self.tail_start == self.end

    def child(self, tag: str) -> _Node | None:
        """The first child ``<tag>`` of libvirt's (no namespace): elements of other
        namespaces are never pinwarden's to edit."""
        return next((c for c in self.children if c.tag == tag and not c.ns), None)


def _tag_end(data: bytes, start: int) -> int:
    """Offset just past the '>' closing the start tag at ``start`` (quotes respected)."""
    i = start + 1
    quote = 0
    while i < len(data):
        c = data[i]
        if quote:
            if c == quote:
                quote = 0
        elif c in (0x22, 0x27):
            quote = c
        elif c == 0x3E:
            return i + 1
        i += 1
    raise InputError("malformed domain XML: unterminated tag")  # expat would have said


_NS_SEP = "\x1f"  # never in a URI nor a name


def _locate(data: bytes) -> _Node:
    """Element tree with byte offsets; the document was already validated by _load()."""
    parser = xml.parsers.expat.ParserCreate(namespace_separator=_NS_SEP)
    stack: list[_Node] = []
    roots: list[_Node] = []

    def forbid(*_args: object) -> None:
        raise InputError("domain XML refused: DTDs and entities are not accepted")

    def start(name: str, attrs: dict[str, str]) -> None:
        ns, _, tag = name.rpartition(_NS_SEP)
        node = _Node(tag, ns, {k.rpartition(_NS_SEP)[2]: v for k, v in attrs.items()
                               if _NS_SEP not in k}, parser.CurrentByteIndex)
        node.head_end = _tag_end(data, node.start)
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)

    def end(_tag: str) -> None:
        node = stack.pop()
        index = parser.CurrentByteIndex
        if data[node.head_end - 2:node.head_end] == b"/>":
            node.tail_start = node.end = node.head_end
        else:
            node.tail_start = index
            node.end = data.index(b">", index) + 1

    parser.StartDoctypeDeclHandler = forbid
    parser.EntityDeclHandler = forbid
    parser.UnparsedEntityDeclHandler = forbid
    parser.ExternalEntityRefHandler = forbid  # type: ignore[assignment]
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as exc:
        raise InputError(f"malformed domain XML: {exc}") from None
    return roots[0]


_ATTR = re.compile(rb"""\s+([^\s=/>]+)\s*=\s*("[^"]*"|'[^']*')""")


def _quote(value: str) -> str:
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
            .replace(">", "&gt;"))


def _quote_in(value: str, quote: str) -> str:
    """``value`` escaped for an attribute delimited by ``quote``."""
    escaped = _quote(value)
    return escaped if quote == '"' else escaped.replace("&quot;", '"').replace("'", "&apos;")


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _Editor:
    """Collects non-overlapping byte-range replacements and applies them in one pass."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.edits: list[tuple[int, int, bytes]] = []
        self.compact = False  # a one-line document stays on one line

    def nl(self, indent: str) -> str:
        """Line break plus ``indent``, or nothing in a one-line document."""
        return "" if self.compact else f"\n{indent}"

    def replace(self, start: int, end: int, text: str) -> None:
        self.edits.append((start, end, text.encode("utf-8")))

    def insert(self, at: int, text: str) -> None:
        self.replace(at, at, text)

    def set_attrs(self, node: _Node, values: Mapping[str, str]) -> None:
        """Set attributes in ``node``'s start tag, in place when present, else appended."""
        head = self.data[node.start:node.head_end]
        remaining = dict(values)
        for match in _ATTR.finditer(head):
            name = match.group(1).decode("utf-8")
            if name in remaining:
                quote = match.group(2)[:1].decode()
                value = _quote_in(remaining.pop(name), quote)
                a, b = match.span(2)
                self.replace(node.start + a, node.start + b, f"{quote}{value}{quote}")
        if remaining:
            close = node.head_end - (2 if head.endswith(b"/>") else 1)
            while close > node.start and self.data[close - 1:close].isspace():
                close -= 1
            first = _ATTR.search(head)
            quote = first.group(2)[:1].decode() if first else "'"
            extra = "".join(f" {k}={quote}{_quote_in(v, quote)}{quote}"
                            for k, v in remaining.items())
            self.insert(close, extra)

    def result(self) -> bytes:
        out: list[bytes] = []
        pos = 0
        for start, end, text in sorted(self.edits, key=lambda e: (e[0], e[1])):
            if start < pos:
                raise AssertionError("overlapping XML edits")  # a bug, not user input
            out.append(self.data[pos:start])
            out.append(text)
            pos = end
        out.append(self.data[pos:])
        return b"".join(out)

    # -- layout helpers --

    def indent_of(self, node: _Node) -> str:
        line_start = self.data.rfind(b"\n", 0, node.start) + 1
        prefix = self.data[line_start:node.start]
        return prefix.decode("utf-8") if prefix.strip() == b"" else ""

    def child_indent(self, node: _Node, unit: str) -> str:
        if node.children:
            return self.indent_of(node.children[0])
        return self.indent_of(node) + unit

    def append_children(self, node: _Node, lines: list[str], unit: str) -> None:
        """Add ``lines`` (one element each) as the last children of ``node``."""
        if not lines:
            return
        indent = self.child_indent(node, unit)
        outer = self.indent_of(node)
        if node.empty:
            head = self.data[node.start:node.head_end - 2].rstrip()
            body = "".join(f"{self.nl(indent)}{line}" for line in lines)
            self.replace(node.start, node.end,
                         f"{head.decode('utf-8')}>{body}{self.nl(outer)}</{node.tag}>")
            return
        # insert after the last child (or the start tag), keeping the closing tag's line
        anchor = node.children[-1].end if node.children else node.head_end
        self.insert(anchor, "".join(f"{self.nl(indent)}{line}" for line in lines))

    def prepend_child(self, node: _Node, line: str, unit: str) -> None:
        """Add ``line`` (one element) as the first child of ``node``."""
        if not node.children:
            self.append_children(node, [line], unit)
            return
        first = node.children[0]
        self.insert(first.start, f"{line}{self.nl(self.indent_of(first))}")


def _pin_line(tag: str, key: str, ident: int, cpus: CpuSet) -> str:
    return f"<{tag} {key}='{ident}' cpuset='{cpus}'/>"


def _memory_off_numad(ed: _Editor, root: _Node, nodes: CpuSet | None, unit: str,
                      top_lines: list[str]) -> None:
    """A domain numad was to place (``<vcpu placement='auto'>``, or a ``<numatune><memory
    placement='auto'>`` that the vCPUs follow), placed statically by pinwarden: its memory
    goes to ``nodes`` (the nodes of its CPUs, as numad's one advice places both), its mode
    kept — numad's placement left would need numad at every start (libvirt fails without
    it: "Failed to query numad") and could put the memory on other nodes than the CPUs.
    A ``<memory>`` with a nodeset of its own is the user's and stays; with no ``nodes``
    known, one that names neither placement nor nodeset keeps numad's placement, as libvirt
    writes it out (static without a nodeset is refused)."""
    numatune = root.child("numatune")
    memory = numatune.child("memory") if numatune is not None else None
    if memory is not None:
        if "nodeset" in memory.attrs or memory.attrs.get("placement", "auto") != "auto":
            return
        ed.set_attrs(memory, {"placement": "static", "nodeset": str(nodes)} if nodes
                     else {"placement": "auto"})
    elif nodes is None:
        return
    elif numatune is not None:
        ed.append_children(numatune, [f"<memory mode='strict' nodeset='{nodes}'/>"], unit)
    else:
        top_lines.append(f"<numatune><memory mode='strict' nodeset='{nodes}'/></numatune>")


def render_plan(xml: str | bytes, plan: Plan, *, partition: str | None = None) -> str:
    """Return ``xml`` with the plan applied (``<vcpu cpuset>``, vcpupin, emulatorpin,
    iothreadpin; ``<resource><partition>`` when given), everything else unchanged.

    Pins equal to ``plan.default_cpus`` are left implicit for shared domains (libvirt
    applies ``<vcpu cpuset>`` to every thread without a pin); exclusive domains get every
    pin written out.  Pins already in the document with the planned value stay untouched.
    """
    text = _as_text(xml)
    spec = parse_domain(text)  # validation (safe parse) before any offset work
    if partition is not None and (not partition.startswith("/") or "//" in partition):
        raise InputError(f"partition {partition!r} must be an absolute path like /machine")
    data = text.encode("utf-8")
    root = _locate(data)
    ed = _Editor(data)
    ed.compact = b"\n" not in data[root.head_end:root.tail_start]
    unit = (ed.child_indent(root, "  ")[len(ed.indent_of(root)):] or "  ") \
        if root.children else "  "
    top_lines: list[str] = []

    # <vcpu>
    vcpu = root.child("vcpu")
    cpuset = plan.default_cpus
    if spec.domain_type == "lxc" and plan.exclusive and plan.leases:
        # a container runs on <vcpu cpuset> alone (no pins): its leases, the sibling
        # threads held empty included, so that it plans again to the same leases (its
        # holder group, without the held threads, confines it to the others)
        cpuset = plan.leased()
    if cpuset is not None:
        attrs = {"cpuset": str(cpuset)}
        if vcpu is None:
            top_lines.append(f"<vcpu placement='static' cpuset='{cpuset}'>"
                             f"{len(plan.vcpus) or spec.vcpus}</vcpu>")
        else:
            if vcpu.attrs.get("placement") == "auto":  # numad would ignore our cpuset
                attrs["placement"] = "static"
            if spec.cpuset != cpuset or "placement" in attrs:
                ed.set_attrs(vcpu, attrs)
    elif vcpu is not None and vcpu.attrs.get("placement") == "auto":
        # every thread pinned: nothing is placed by <vcpu>, but libvirt asked numad all the
        # same and failed without it ("Failed to query numad": XML hunt)
        ed.set_attrs(vcpu, {"placement": "static"})
    if spec.placement == "auto":
        _memory_off_numad(ed, root, plan.memory_nodes, unit, top_lines)

    def wanted(cpus: CpuSet) -> bool:
        # An LXC container runs on <vcpu cpuset> and libvirt ignores its pins: none is
        # written (an exclusive one with pins is refused, by the hook at its start too)
        return spec.domain_type != "lxc" and (
            plan.exclusive or plan.default_cpus is None or cpus != plan.default_cpus)

    # <cputune>
    tune = root.child("cputune")
    new_pins: list[str] = []
    emu_node = tune.child("emulatorpin") if tune is not None else None

    def pins(tag: str, key: str, planned: Mapping[int, CpuSet],
             asked: Mapping[int, CpuSet]) -> None:
        """Rewrite the existing ``<tag key=N>`` pins that changed, add the missing ones."""
        existing = {int(n.attrs.get(key, "-1")): n for n in tune.children
                    if n.tag == tag and not n.ns} if tune is not None else {}
        for ident, cpus in sorted(planned.items()):
            node = existing.get(ident)
            if node is not None:
                if asked.get(ident) != cpus:
                    ed.set_attrs(node, {"cpuset": str(cpus)})
            elif wanted(cpus):
                new_pins.append(_pin_line(tag, key, ident, cpus))

    pins("vcpupin", "vcpu", plan.vcpus, spec.vcpupins)
    if plan.emulator:
        if emu_node is not None:
            if spec.emulatorpin != plan.emulator:
                ed.set_attrs(emu_node, {"cpuset": str(plan.emulator)})
        elif wanted(plan.emulator):
            new_pins.append(f"<emulatorpin cpuset='{plan.emulator}'/>")
    pins("iothreadpin", "iothread", plan.iothreads, spec.iothreadpins)
    if tune is not None:
        ed.append_children(tune, new_pins, unit)
    elif new_pins:
        indent = ed.child_indent(root, unit)
        inner = "".join(f"{ed.nl(indent + unit)}{line}" for line in new_pins)
        top_lines.append(f"<cputune>{inner}{ed.nl(indent)}</cputune>")

    # <resource><partition>
    if partition is not None:
        resource = root.child("resource")
        part = resource.child("partition") if resource is not None else None
        if part is not None:
            if spec.partition != partition:
                ed.replace(part.head_end if not part.empty else part.start,
                           part.tail_start if not part.empty else part.end,
                           _text(partition) if not part.empty
                           else f"<partition>{_text(partition)}</partition>")
        elif resource is not None:  # first: libvirt's schema wants it before <fibrechannel>
            ed.prepend_child(resource, f"<partition>{_text(partition)}</partition>", unit)
        else:
            indent = ed.child_indent(root, unit)
            top_lines.append(f"<resource>{ed.nl(indent + unit)}<partition>"
                             f"{_text(partition)}</partition>{ed.nl(indent)}</resource>")

    if top_lines:
        anchor = next((root.child(t) for t in ("cputune", "vcpu", "currentMemory",
                                                "memory", "uuid", "name")
                       if root.child(t) is not None), None)
        indent = ed.child_indent(root, unit)
        block = "".join(f"{ed.nl(indent)}{line}" for line in top_lines)
        if anchor is not None:
            ed.insert(anchor.end, block)
        else:
            ed.append_children(root, top_lines, unit)
    return ed.result().decode("utf-8")
