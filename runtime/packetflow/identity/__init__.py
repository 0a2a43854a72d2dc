"""Workload identity: SPIFFE IDs, trust bundles per trust domain, X.509 certificates.

One model of identity for everything that authenticates with certificates (federation
between organizations now, zero trust inside the cluster later): a certificate's identity is
the SPIFFE ID in its URI SAN, and only the trust bundle of that ID's trust domain may vouch
for it.
"""
