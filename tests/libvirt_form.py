"""libvirt's own reading of a domain XML, through its test driver (``test:///default``: in
process, no daemon): the oracle the parsing tests compare pinwarden with."""

from __future__ import annotations


def domain_xml(inner: str, name: str = "pw-oracle") -> str:
    """A test-driver domain with ``inner`` (the elements after <memory>)."""
    return (f"<domain type='test'><name>{name}</name><memory>1024</memory>{inner}"
            "<os><type>hvm</type></os></domain>")


def libvirt_form(inner: str, name: str = "pw-oracle") -> str | None:
    """The XML libvirt makes of ``domain_xml(inner, name)``, or None when libvirt refuses
    it.  The domain is undefined again and the connection closed."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    try:
        try:
            dom = conn.defineXML(domain_xml(inner, name))
        except libvirt.libvirtError:
            return None
        try:
            return str(dom.XMLDesc())
        finally:
            dom.undefine()
    finally:
        conn.close()
