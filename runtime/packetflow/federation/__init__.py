"""Federation: capabilities shared across organizations over mutual TLS.

Pure cores (authorization, rate limits, trust, SLA, pricing, the audit chain, catalogs,
contract compatibility) are plain functions over plain data; the gateway (``gateway``) and
the stores are the I/O edges. Certificates and SPIFFE identities live in
:mod:`packetflow.identity`.
"""
