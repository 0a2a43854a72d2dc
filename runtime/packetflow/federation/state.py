"""What the gateway runs on, loaded as one unit: the settings, our credentials, each peer's
trust bundle and the TLS context built from them. Reloaded whole when the config file or any
file it names changes; an invalid new version keeps the running one (see ``Watched``)."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from packetflow.federation.settings import ConfigError, FederationSettings, load_settings, resolve
from packetflow.federation.trust import TrustParams
from packetflow.identity.files import Watched
from packetflow.identity.tls import Credentials, load_credentials, server_context
from packetflow.identity.x509 import AuthenticationError, BundleError, TrustBundle
from packetflow.manifests import ManifestError
from packetflow.spec import FederationExport, FederationImport, FederationPeer, FederationSpec


@dataclass(frozen=True)
class GatewayState:
    """One consistent version of everything the gateway decides with."""

    settings: FederationSettings
    config_path: Path
    credentials: Credentials
    bundles: dict[str, TrustBundle]  # trust domain -> bundle, one per peer
    bundle_files: dict[str, Path]  # peer name -> its bundle file
    server_context: ssl.SSLContext
    peers: dict[str, FederationPeer] = field(init=False)
    peer_by_domain: dict[str, FederationPeer] = field(init=False)
    exports: dict[str, FederationExport] = field(init=False)
    imports: dict[str, FederationImport] = field(init=False)
    trust: TrustParams = field(init=False)

    def __post_init__(self) -> None:
        spec = self.spec
        set_ = object.__setattr__  # frozen: derived lookups are computed once here
        set_(self, "peers", {p.name: p for p in spec.peers})
        set_(self, "peer_by_domain", {p.trust_domain: p for p in spec.peers})
        set_(self, "exports", {e.capability: e for e in spec.exports})
        set_(self, "imports", {i.local_name: i for i in spec.imports})
        set_(self, "trust", TrustParams.of(spec.trust))

    @property
    def spec(self) -> FederationSpec:
        """The Federation's spec."""
        return self.settings.federation

    @property
    def files(self) -> list[Path]:
        """Every file this state was read from."""
        identity = self.spec.identity
        assert identity.cert_file is not None and identity.key_file is not None
        base = self.config_path.parent
        return [self.config_path, resolve(base, identity.cert_file),
                resolve(base, identity.key_file), *self.bundle_files.values()]

    def authority_trusted(self, peer: str, authority: str) -> bool:
        """Whether ``peer`` is still configured and ``authority`` still in its bundle."""
        found = self.peers.get(peer)
        return found is not None and authority in self.bundles[found.trust_domain].fingerprints


def load_state(config_path: Path) -> GatewayState:
    """Read the config and every file it names; :class:`ConfigError` says what is wrong."""
    settings = load_settings(config_path)
    spec, base, source = settings.federation, config_path.parent, str(config_path)
    errors: list[ManifestError] = []
    identity = spec.identity
    if identity.cert_file is None or identity.key_file is None:
        raise ConfigError([ManifestError(source, "spec.identity", "certFile and keyFile "
                                         "are required (a Secret is for the operator)")])
    try:
        credentials = load_credentials(resolve(base, identity.cert_file),
                                       resolve(base, identity.key_file))
    except BundleError as exc:
        raise ConfigError([ManifestError(source, "spec.identity", str(exc))]) from None
    if credentials.spiffe_id.trust_domain != spec.trust_domain:
        errors.append(ManifestError(source, "spec.identity", f"the certificate is "
                                    f"{credentials.spiffe_id}, not in our trust domain "
                                    f"{spec.trust_domain!r}"))
    bundles: dict[str, TrustBundle] = {}
    files: dict[str, Path] = {}
    for index, peer in enumerate(spec.peers):
        where = f"spec.peers[{index}].trustBundle"
        if peer.trust_bundle.file is None:
            errors.append(ManifestError(source, where, "a file here (the operator mounts the "
                                        "ConfigMap as one)"))
            continue
        path = files[peer.name] = resolve(base, peer.trust_bundle.file)
        try:
            bundles[peer.trust_domain] = TrustBundle.from_pem(
                peer.trust_domain, path.read_bytes(), str(path))
        except OSError as exc:
            errors.append(ManifestError(source, where, f"{path}: {exc.strerror}"))
        except BundleError as exc:
            errors.append(ManifestError(source, where, str(exc)))
    if errors:
        raise ConfigError(errors)
    authorities = b"".join(bundle.pem() for bundle in bundles.values())
    try:
        context = server_context(credentials, authorities)
    except ssl.SSLError as exc:
        raise ConfigError([ManifestError(source, "spec.identity", str(exc))]) from None
    return GatewayState(settings, config_path, credentials, bundles, files, context)


def watch_state(config_path: Path, interval: float = 1.0) -> Watched[GatewayState]:
    """The state, re-read whenever the config or a file it names changes."""
    return Watched([config_path], lambda: load_state(config_path),
                   paths_of=lambda state: state.files, interval=interval)


def check_identity(state: GatewayState, peer: str, authority: str,
                   not_after: datetime.datetime, now: datetime.datetime) -> None:
    """:class:`AuthenticationError` if a connection authenticated earlier no longer would:
    its peer removed, its authority rotated out of the bundle, its certificate expired."""
    if peer not in state.peers:
        raise AuthenticationError("peer-removed", f"peer {peer} is no longer configured")
    if not state.authority_trusted(peer, authority):
        raise AuthenticationError("authority-rotated", f"the authority that vouched for "
                                  f"{peer}'s certificate is no longer in its trust bundle")
    if now > not_after:
        raise AuthenticationError("expired", f"{peer}'s certificate expired at "
                                  f"{not_after.isoformat()}")
